"""Residual-stream statistics per layer, from a trace or streamed over a whole data set.

Per position ``t`` (real tokens only) and layer ``l``, with ``r`` a sub-layer's read and ``w`` its write:

* norms ``‖resid_pre‖``, ``‖resid_post‖``, ``‖r‖``, ``‖norm(r)‖``, ``‖w‖``;
* relative update ``‖w‖ / ‖r‖`` per sub-layer, and ``‖resid_post − resid_pre‖ / ‖resid_pre‖`` per block;
* ``cos(resid_pre, resid_post)``.

Each is averaged over the real positions of the data. :func:`trace_stats` streams a data set through
the model and adds each layer's statistics as soon as the layer ends, so it holds one layer of one
batch at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from streamlens.errors import StreamlensError
from streamlens.model.layouts import SUBLAYERS
from streamlens.model.loading import Model, as_model
from streamlens.present.results import Result
from streamlens.stream.engine import capture
from streamlens.stream.inputs import as_sequences, batches, encode, recorded


def _norm(x: Tensor) -> Tensor:
    return x.float().norm(dim=-1)


def layer_statistics(named: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per-position statistics ``(batch, pos)`` of one layer's named tensors (see the module docstring)."""
    stats: dict[str, Tensor] = {}
    pre, post = named["resid_pre"], named["resid_post"]
    stats["resid_pre_norm"], stats["resid_post_norm"] = _norm(pre), _norm(post)
    co = [k[:-4] for k in named if k.endswith("_out") and f"{k[:-4]}_read_normed" in named and k[:-4] not in SUBLAYERS]
    for s in (*SUBLAYERS, *co):  # co-writers beside the token mixer (Falcon-H1's mamba) too
        if f"{s}_out" in named:
            r, w = _norm(named[f"{s}_read"]), _norm(named[f"{s}_out"])
            stats[f"{s}_read_norm"], stats[f"{s}_normed_norm"] = r, _norm(named[f"{s}_read_normed"])
            stats[f"{s}_write_norm"], stats[f"{s}_rel_update"] = w, w / r.clamp_min(1e-12)
    stats["block_rel_update"] = _norm(post.float() - pre.float()) / stats["resid_pre_norm"].clamp_min(1e-12)
    stats["cos_pre_post"] = torch.nn.functional.cosine_similarity(pre.float(), post.float(), dim=-1)
    return stats


class StatAccumulator:
    """Sums of per-position statistics per layer, masked to real tokens, and per-layer maxima.

    ``frame()`` gives one row per layer with the means (sum / number of positions counted), the
    maxima and the count. Used by :meth:`ResidualTrace.to_dataframe`, :func:`trace_stats` (which adds
    each layer as soon as it ends) and :func:`streamlens.dynamics`.
    """

    def __init__(self):
        self.sums: dict[int, dict[str, float]] = {}
        self.counts: dict[int, int] = {}
        self.maxima: dict[int, dict[str, float]] = {}

    def add(self, layer: int, stats: Mapping[str, Tensor], mask: Tensor) -> None:
        """Add the masked sums of ``stats`` (each ``(batch, pos)``) and count the positions of ``mask``."""
        into = self.sums.setdefault(layer, {})
        for k, v in stats.items():
            into[k] = into.get(k, 0.0) + float(v[mask.to(v.device)].double().sum())
        self.counts[layer] = self.counts.get(layer, 0) + int(mask.sum())

    def add_layer(self, layer: int, named: Mapping[str, Tensor], mask: Tensor,
                  extra: Mapping[str, Tensor] | None = None) -> None:
        """Add :func:`layer_statistics` of one layer's named tensors (and ``extra`` statistics)."""
        self.add(layer, {**layer_statistics(named), **(extra or {})}, mask)

    def maximum(self, layer: int, name: str, value: float) -> None:
        into = self.maxima.setdefault(layer, {})
        into[name] = max(into.get(name, 0.0), value)

    def frame(self, count_name: str = "n_positions") -> pd.DataFrame:
        rows = []
        for layer in sorted(self.sums):
            n = self.counts.get(layer, 0)
            rows.append({"layer": layer, **{k: v / n if n else float("nan") for k, v in self.sums[layer].items()},
                         **self.maxima.get(layer, {}), count_name: n})
        return pd.DataFrame(rows)


@dataclass(frozen=True, eq=False)
class TraceStats(Result):
    """Per-layer residual-stream statistics over a whole data set (see :func:`trace_stats`)."""

    model_name: str
    table: pd.DataFrame
    rows_key = "layers"

    def to_dataframe(self) -> pd.DataFrame:
        return self.table.copy()

    def plot(self):
        from streamlens.present import figures

        return figures.trace_summary(self.table, title=f"Residual stream of {self.model_name} (data set)")

    def metadata(self) -> dict[str, Any]:
        return {"model": self.model_name}

    def describe(self) -> str:
        n = int(self.table["n_positions"].iloc[0]) if len(self.table) else 0
        return f"of {self.model_name} over {n} positions"


@recorded
def trace_stats(
    model: Model | Any,
    data: Sequence[str],
    *,
    batch_size: int = 8,
    max_tokens: int | None = 256,
    layers: int | Sequence[int] | None = None,
    progress: bool = True,
    prepend_bos: bool | None = None,
) -> TraceStats:
    """Stream ``data`` through ``model`` in batches and reduce to per-layer statistics.

    Nothing but one layer's activations for one batch is held at a time, so the data set can be
    any size. The table has the columns of :meth:`ResidualTrace.to_dataframe`.
    """
    from tqdm.auto import tqdm

    model = as_model(model)
    data = as_sequences(data)  # a data file (streamlens.stream.inputs.is_file) is read
    if len(data) == 0:
        raise StreamlensError("the data set is empty: give at least one text")
    layers_t = model.check_layers(layers)
    acc = StatAccumulator()
    bar = tqdm(total=len(data), desc="trace_stats", unit="doc", disable=not progress)
    for _, chunk in batches(list(data), batch_size):
        batch = encode(model, chunk, max_tokens=max_tokens, prepend_bos=prepend_bos)
        capture(model, batch, None, layers=layers_t, on_layer=lambda l, named: acc.add_layer(l, named, batch.mask))
        bar.update(len(chunk))
    bar.close()
    return TraceStats(model.name, acc.frame())
