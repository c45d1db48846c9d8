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
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from streamlens.capture import SUBLAYERS, _run_capture
from streamlens.errors import StreamlensError
from streamlens.inputs import encode, select_positions
from streamlens.model import Model, as_model


def _norm(x: Tensor) -> Tensor:
    return x.float().norm(dim=-1)


class StatAccumulator:
    """Sums of per-position statistics per layer, masked to real tokens; ``frame()`` gives the means.

    Used by :meth:`ResidualTrace.to_dataframe` and by :func:`trace_stats`, which streams a data set
    through the model and adds each layer's statistics as soon as the layer ends.
    """

    def __init__(self):
        self.sums: dict[int, dict[str, float]] = {}
        self.counts: dict[int, int] = {}

    def add(self, layer: int, named: Mapping[str, Tensor], mask: Tensor) -> None:
        m = mask.to(named["resid_pre"].device)
        stats: dict[str, Tensor] = {}
        pre, post = named["resid_pre"], named["resid_post"]
        stats["resid_pre_norm"], stats["resid_post_norm"] = _norm(pre), _norm(post)
        for s in SUBLAYERS:
            if f"{s}_out" in named:
                r, w = _norm(named[f"{s}_read"]), _norm(named[f"{s}_out"])
                stats[f"{s}_read_norm"], stats[f"{s}_normed_norm"] = r, _norm(named[f"{s}_read_normed"])
                stats[f"{s}_write_norm"], stats[f"{s}_rel_update"] = w, w / r.clamp_min(1e-12)
        stats["block_rel_update"] = _norm(post.float() - pre.float()) / stats["resid_pre_norm"].clamp_min(1e-12)
        stats["cos_pre_post"] = torch.nn.functional.cosine_similarity(pre.float(), post.float(), dim=-1)
        into = self.sums.setdefault(layer, {})
        for k, v in stats.items():
            into[k] = into.get(k, 0.0) + float(v[m].double().sum())
        self.counts[layer] = self.counts.get(layer, 0) + int(m.sum())

    def frame(self) -> pd.DataFrame:
        rows = []
        for layer in sorted(self.sums):
            n = self.counts[layer]
            rows.append({"layer": layer, **{k: v / max(n, 1) for k, v in self.sums[layer].items()}, "n_positions": n})
        return pd.DataFrame(rows)


@dataclass(frozen=True)
class TraceStats:
    """Per-layer residual-stream statistics over a whole data set (see :func:`trace_stats`)."""

    model_name: str
    table: pd.DataFrame

    def to_dataframe(self) -> pd.DataFrame:
        return self.table.copy()

    def plot(self):
        from streamlens import plots

        return plots.trace_summary(self.table, title=f"Residual stream of {self.model_name} (data set)")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix == ".json":
            path.write_text(self.table.to_json(orient="records", indent=2))
        else:
            self.table.to_csv(path, index=False)
        return path

    def _repr_html_(self) -> str:
        n = int(self.table["n_positions"].iloc[0]) if len(self.table) else 0
        return f"<b>TraceStats</b> of <code>{self.model_name}</code> over {n} positions" + self.table.to_html(index=False)



def iter_batches(texts: Sequence[str], batch_size: int):
    if batch_size < 1:
        raise StreamlensError(f"batch_size must be at least 1, got {batch_size}")
    for i in range(0, len(texts), batch_size):
        yield texts[i : i + batch_size]


def trace_stats(
    model: Model | Any,
    data: Sequence[str],
    *,
    batch_size: int = 8,
    max_tokens: int | None = 256,
    layers: int | Sequence[int] | None = None,
    progress: bool = True,
) -> TraceStats:
    """Stream ``data`` through ``model`` in batches and reduce to per-layer statistics.

    Nothing but one layer's activations for one batch is held at a time, so the data set can be
    any size. The table has the columns of :meth:`ResidualTrace.to_dataframe`.
    """
    from tqdm.auto import tqdm

    model = as_model(model)
    if isinstance(data, str):
        data = [data]
    if len(data) == 0:
        raise StreamlensError("the data set is empty: give at least one text")
    layers_t = model.check_layers(layers)
    acc = StatAccumulator()
    bar = tqdm(total=len(data), desc="trace_stats", unit="doc", disable=not progress)
    for chunk in iter_batches(list(data), batch_size):
        batch = encode(model, chunk, max_tokens=max_tokens)
        pos_idx, mask = select_positions(batch, None)
        _run_capture(model, batch, pos_idx, layers=layers_t, sublayers=SUBLAYERS, heads=False,
                     store=lambda t: t, on_layer=lambda l, named: acc.add(l, named, mask), all_positions=True)
        bar.update(len(chunk))
    bar.close()
    return TraceStats(model.name, acc.frame())
