"""Residual-stream dynamics: test the classic claims about residual connections on a real model.

Every explanation of residual connections makes the same claims: each layer writes a small
refinement of the stream; the skip path is a gradient highway (``∂resid_post/∂resid_pre = I + J_f``,
so the gradient keeps an unattenuated identity term); a randomly initialised network starts near
the identity; the stream preserves what the embedding put into it; and without the skip connections
the gradient reaching early layers collapses. :func:`dynamics` measures each of them per layer over
a data set, for the model as it is (``"trained"``), a freshly initialised copy (``"init"``,
``compare_init=True``), the model with skip connections removed (``"dropped"``,
``drop_residual=[...]``) and, with both options, the fresh copy with them removed
(``"init_dropped"``, the setting of the training-time claim); :meth:`Dynamics.claims` turns the
table into verdicts.

Forward statistics per layer ``l``, averaged over real (non-padding) positions:

* ``attn_rel_update = ‖attn_out‖/‖attn_read‖``, ``mlp_rel_update``, ``block_rel_update =
  ‖resid_post − resid_pre‖/‖resid_pre‖`` (from :class:`~streamlens.stats.StatAccumulator`);
* ``cos_pre_post = cos(resid_pre, resid_post)``;
* ``resid_norm_growth = mean‖resid_post_l‖ / mean‖resid_pre_0‖`` (the stream's growth with depth);
* ``cos_embed = cos(resid_post_l, resid_pre_0)``: how much of the embedding direction (block 0's
  input at the same position) survives.

Gradient statistics (see :mod:`streamlens.gradients`), averaged over the positions that carry loss:
``grad_full_norm = ‖∂L/∂resid_pre_l‖``, ``grad_identity_norm = ‖g_post‖``, ``grad_sublayer_norm =
‖g_post · J_f‖``, ``grad_sub_to_identity`` (ratio of those means), ``grad_stream_scaled =
‖∂L/∂resid_pre_l‖·‖resid_pre_l‖`` (the gradient per unit of stream: a norm divides its input gradient
by ``‖x‖``, so raw gradient norms at different depths mostly compare stream sizes; this product does
not) and ``split_error`` (max ``‖identity + sublayer − full‖ / max‖full‖``, a check that the split is
exact). Each claim of :meth:`Dynamics.claims` says in its ``measured`` column what exactly it measured.

Example:
    >>> d = streamlens.dynamics(model, texts, compare_init=True, drop_residual=[1, 2], max_tokens=32, progress=False)
    >>> d.to_dataframe()        # one row per variant × layer
    >>> d.claims()              # each claim, the number that tests it, supported or not
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from streamlens.depth import gradients as grad
from streamlens.errors import StreamlensError
from streamlens.intervene.removal import drop_residual_hooks
from streamlens.model import hooks
from streamlens.model.loading import Model, as_model, load
from streamlens.present.results import Result
from streamlens.stream.engine import capture
from streamlens.stream.inputs import (as_sequences, batches, check_max_tokens, check_prepend_bos, encode, load_texts, recorded,
                                      resolve_bos)
from streamlens.stream.stats import StatAccumulator

VARIANTS = ("trained", "init", "dropped", "init_dropped")

#: Thresholds behind each verdict of :meth:`Dynamics.claims` (stated there with the claim).
SMALL_UPDATE = 0.5      # median block_rel_update below this: "each layer is a small refinement"
HIGHWAY_SHARE = 1.0     # median ‖g_sub‖/‖g_id‖ below this: "the identity path carries most of the gradient"
NOT_VANISHED = 0.5      # ‖g‖·‖x‖ at layer 0 / at the last layer above this: "gradient reaches early layers"
NEAR_IDENTITY = 0.9     # init's median cos(resid_pre, resid_post) above this: "starts near the identity"
PRESERVED = 0.5         # cos(last resid_post, embedding) above this: "the stream preserves the embedding"
COLLAPSED = 0.5         # init_dropped/init ‖g‖·‖x‖ at layer 0 below this: "without skips the gradient collapses"


def _forward_stats(model: Model, texts: list[str], *, batch_size: int, max_tokens: int | None,
                   drop: Sequence[int], bar, bos: bool | None) -> pd.DataFrame:
    """StatAccumulator's per-layer statistics plus the embedding cosine, with ``drop`` applied."""
    acc = StatAccumulator()
    for _, chunk in batches(texts, batch_size):
        batch = encode(model, chunk, max_tokens=max_tokens, prepend_bos=bos)
        emb: dict[str, Tensor] = {}

        def on_layer(l, named, mask=batch.mask, emb=emb):
            if l == 0:
                emb["x"] = named["resid_pre"].float()
            cos = torch.nn.functional.cosine_similarity(named["resid_post"].float(), emb["x"], dim=-1)
            acc.add_layer(l, named, mask, extra={"cos_embed": cos})

        with hooks.attached(drop_residual_hooks(model, drop)):
            capture(model, batch, None, layers=tuple(range(model.arch.n_layers)), on_layer=on_layer)
        bar.update(len(chunk))
    df = acc.frame()
    df["resid_norm_growth"] = df["resid_post_norm"] / df["resid_pre_norm"].iloc[0]
    return df


def _gradient_stats(model: Model, texts: list[str], *, batch_size: int, max_tokens: int | None,
                    drop: Sequence[int], target: int | None, bar, bos: bool | None) -> pd.DataFrame:
    acc = StatAccumulator()
    for _, chunk in batches(texts, batch_size):
        batch = encode(model, chunk, max_tokens=max_tokens, prepend_bos=bos)
        if bool(grad.loss_positions(batch, target).any()):
            split = grad.split_batch(model, batch, target=target, drop=drop)
            stats = grad.position_stats(split)
            m = split.mask
            for i, l in enumerate(split.layers):
                acc.add(l, {k: v[i] for k, v in stats.items()}, m)
                diff = (split.identity[i] + split.sublayer[i] - split.full[i]).norm(dim=-1)[m.to(split.full.device)]
                scale = stats["grad_full_norm"][i][m.to(split.full.device)].max().clamp_min(1e-30)
                acc.maximum(l, "split_error", float(diff.max() / scale))
        bar.update(len(chunk))
    if not acc.sums:
        raise StreamlensError("no text in the data set has two or more tokens, so the next-token loss is empty: "
                              "give longer texts or a target token id")
    df = acc.frame("n_grad_positions")
    df["grad_sub_to_identity"] = df["grad_sublayer_norm"] / df["grad_identity_norm"].where(df["grad_identity_norm"] > 0)
    return df


def init_copy(model: Model, *, seed: int = 0) -> Model:
    """A freshly initialised model of the same architecture: same config, the class's own random init, seeded.

    The global random state is left as it was. The copy shares the model's tokenizer, dtype and device.
    """
    cfg = copy.deepcopy(model.hf.config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = type(model.hf)._from_config(cfg, dtype=model.dtype)
    hf = hf.to(model.device).eval()
    with warnings.catch_warnings():  # the fresh model is ours: wrap it in place, no copy
        warnings.simplefilter("ignore")
        return load(hf, model.tokenizer, in_place=True)


@dataclass(frozen=True, eq=False)
class Dynamics(Result):
    """Per-layer forward and gradient statistics of the residual stream, for one or more model variants.

    ``table`` has one row per ``(variant, layer)``; ``variant`` is ``"trained"`` (the model as given),
    ``"init"`` (a fresh random initialisation of its architecture), ``"dropped"`` (skip connections
    removed at ``dropped_layers``) or ``"init_dropped"`` (the fresh initialisation with them removed). See :mod:`streamlens.dynamics` for the columns.
    """

    model_name: str
    layout: str
    loss: str
    dropped_layers: tuple[int, ...]
    table: pd.DataFrame = field(repr=False)
    #: every setting that changes a number (compare_init, drop_residual, max_tokens, prepend_bos, ...)
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        bad = set(self.table["variant"]) - set(VARIANTS)
        if bad:
            raise StreamlensError(f"unknown variants {sorted(bad)} in a Dynamics table; expected {VARIANTS}")

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(v for v in VARIANTS if v in set(self.table["variant"]))

    def variant(self, name: str) -> pd.DataFrame:
        if name not in self.variants:
            raise StreamlensError(f"variant {name!r} was not measured; measured: {list(self.variants)}"
                                  + (" (use compare_init=True)" if name == "init" else "")
                                  + (" (use drop_residual=[layers])" if name == "dropped" else ""))
        return self.table[self.table["variant"] == name].sort_values("layer").reset_index(drop=True)

    def to_dataframe(self) -> pd.DataFrame:
        """Tidy: one row per variant × layer, one column per statistic."""
        return self.table.copy()

    def claims(self) -> pd.DataFrame:
        """Each classic claim, the measured number that tests it, the threshold, whether this model supports it,
        and (``measured``) what exactly was measured.

        Gradient claims use scale-free statistics: a ratio of two gradients at the same layer, or the
        gradient per unit of stream ``‖∂L/∂resid_pre‖·‖resid_pre‖`` (a norm divides its input gradient by
        ``‖x‖``, so raw gradient norms at different depths mostly compare stream sizes). The collapse
        claim compares like with like: the freshly initialised model with and without its skip
        connections (the setting of the classic argument, which is about training). Claims that need a
        variant that was not measured, or gradients, are listed with ``supported = None``.
        """
        t = self.variant("trained")
        has = set(self.table.columns)
        rows: list[dict[str, Any]] = []

        def row(claim, statistic, value, threshold, supported, measured):
            rows.append({"claim": claim, "statistic": statistic, "value": value, "threshold": threshold,
                         "supported": None if value is None or np.isnan(value) else bool(supported(value)),
                         "measured": measured})

        avg = f"mean over the real positions of the data ({self.loss})"
        row("each layer writes a small refinement of the stream", "median over layers of block_rel_update",
            float(t["block_rel_update"].median()), f"< {SMALL_UPDATE}", lambda v: v < SMALL_UPDATE,
            "‖resid_post − resid_pre‖ / ‖resid_pre‖ per block, mean over real positions, median over the blocks "
            "of the model as given")
        grads = "grad_full_norm" in has
        ratio = float(t["grad_sub_to_identity"].median()) if grads else None
        row("the skip path carries most of the gradient (gradient highway)",
            "median over layers of ‖g_post·J_f‖ / ‖g_post‖", ratio, f"< {HIGHWAY_SHARE}", lambda v: v < HIGHWAY_SHARE,
            "at each layer's input, the part of the loss gradient through the sub-layers over the part through the "
            f"identity (same layer, so scale-free), {avg}; median over layers")
        scaled = "grad_stream_scaled" in has
        reach = float(t["grad_stream_scaled"].iloc[0] / t["grad_stream_scaled"].iloc[-1]) if scaled else None
        row("the gradient reaches early layers unattenuated",
            "‖∂L/∂resid_pre‖·‖resid_pre‖ at layer 0 / at the last layer", reach, f"> {NOT_VANISHED}",
            lambda v: v > NOT_VANISHED,
            "the gradient per unit of stream, ‖∂L/∂resid_pre‖·‖resid_pre‖ (the loss's response to a relative "
            "change of the stream, free of the 1/‖x‖ scaling of the norms), " + avg + ", first layer over last")
        init = float(self.variant("init")["cos_pre_post"].median()) if "init" in self.variants else None
        row("a freshly initialised network starts near the identity", "init: median over layers of cos(resid_pre, resid_post)",
            init, f"> {NEAR_IDENTITY}", lambda v: v > NEAR_IDENTITY,
            "cos(resid_pre, resid_post) per block of a fresh seeded initialisation, mean over real positions, median "
            "over blocks" + ("" if init is not None else " (not measured: use compare_init=True)"))
        row("the stream preserves the embedding across layers", "cos(resid_post of the last layer, embedding)",
            float(t["cos_embed"].iloc[-1]), f"> {PRESERVED}", lambda v: v > PRESERVED,
            "cos(last block's resid_post, block 0's resid_pre) at the same position, mean over real positions")
        row("the stream grows with depth", "mean‖resid_post_last‖ / mean‖resid_pre_0‖",
            float(t["resid_norm_growth"].iloc[-1]), "> 1", lambda v: v > 1,
            "mean over real positions of ‖resid_post‖ after the last block over the same for block 0's input")
        collapse, why = None, ("not measured: needs compare_init=True and drop_residual=[...]; the classic argument "
                               "is about a network at initialisation, and a trained model with its skips removed is a "
                               "broken network, not a like-for-like comparison")
        if scaled and "init_dropped" in self.variants:
            collapse = float(self.variant("init_dropped")["grad_stream_scaled"].iloc[0]
                             / self.variant("init")["grad_stream_scaled"].iloc[0])
            why = (f"the gradient per unit of stream at layer 0, ‖∂L/∂resid_pre_0‖·‖resid_pre_0‖, {avg}, of the "
                   f"fresh initialisation with skips removed at {list(self.dropped_layers)} over the same "
                   "initialisation intact (same weights, same seed)")
        row(f"without skip connections (removed at {list(self.dropped_layers) or '[...]'}) the gradient to layer 0 "
            "collapses, at initialisation", "init_dropped / init ‖∂L/∂resid_pre_0‖·‖resid_pre_0‖", collapse,
            f"< {COLLAPSED}", lambda v: v < COLLAPSED, why)
        return pd.DataFrame(rows)

    def plot(self):
        from streamlens.present import figures

        return figures.dynamics_figure(self.table, title=f"Residual-stream dynamics of {self.model_name}")

    rows_key = "layers"

    def metadata(self) -> dict[str, Any]:
        return {"model": self.model_name, "layout": self.layout, "loss": self.loss,
                "dropped_layers": list(self.dropped_layers), "settings": dict(self.settings),
                "claims": json.loads(self.claims().to_json(orient="records"))}

    def describe(self) -> str:
        return f"of {self.model_name} ({self.layout} layout, loss: {self.loss}; variants: {', '.join(self.variants)})"

    def _repr_html_(self) -> str:
        from streamlens.present.results import fmt

        return (f"<b>Dynamics</b> {self.describe()}" + self.claims().to_html(index=False, float_format=fmt)
                + self.table.to_html(index=False, float_format=fmt))


@recorded
def dynamics(
    model: Model | Any,
    data: str | Sequence[str],
    *,
    target: int | None = None,
    compare_init: bool = False,
    drop_residual: int | Sequence[int] | None = None,
    init_seed: int = 0,
    batch_size: int = 4,
    max_tokens: int | None = 256,
    progress: bool = True,
    gradients: bool = True,
    prepend_bos: bool | None = None,
) -> Dynamics:
    """Measure how the residual stream evolves with depth, forward and backward, over a data set.

    Args:
        model: a :class:`~streamlens.Model` (or anything :func:`streamlens.load` takes).
        data: texts (each truncated to ``max_tokens``), streamed in batches of ``batch_size``.
        target: ``None``: next-token cross-entropy (each document's mean over its real positions
            that have a next token); a token id: that token's logit at each text's last token.
        gradients: also split each layer's input gradient into identity and sub-layer paths
            (refused for post-norm models, whose skip passes through the norm).
        compare_init: add the ``"init"`` variant: a fresh seeded initialisation (``init_seed``).
        drop_residual: add the ``"dropped"`` variant: the model with ``x + f(x) → f(x)`` at these layers
            (and, with ``compare_init``, ``"init_dropped"``: the fresh initialisation with them removed).
        progress: show a progress bar.
        prepend_bos: put the tokenizer's BOS token in front of each text (None, the default: when it
            has one; see :mod:`streamlens.stream.inputs`); recorded in the result and its settings.

    Returns:
        A :class:`Dynamics` with one row per variant × layer.
    """
    from tqdm.auto import tqdm

    model = as_model(model)
    # a data file (streamlens.stream.inputs.is_file) is read, a string is one text, token ids are used as given
    texts = list(as_sequences(data)) if isinstance(data, (Sequence, torch.Tensor)) and not isinstance(data, str) \
        and len(data) and not all(isinstance(t, str) for t in data) else load_texts(data)
    max_tokens = check_max_tokens(max_tokens)
    check_prepend_bos(prepend_bos)
    # what was done: texts get the resolved choice; token ids are used as given unless prepend_bos=True
    bos = resolve_bos(model, prepend_bos) if isinstance(texts[0], str) else bool(prepend_bos)
    if gradients:
        grad.check_gradient_model(model)
        target = grad.check_target(model, target)
    drop = grad.check_drop(model, drop_residual)
    if drop_residual is not None and not drop:
        raise StreamlensError("drop_residual is empty: give the layers whose skip connection to remove")
    runs: list[tuple[str, Model, tuple[int, ...]]] = [("trained", model, ())]
    if compare_init:
        runs.append(("init", init_copy(model, seed=init_seed), ()))
    if drop:
        runs.append(("dropped", model, drop))
        if compare_init:
            runs.append(("init_dropped", runs[1][1], drop))
    frames = []
    bar = tqdm(total=len(texts) * len(runs) * (2 if gradients else 1), desc="dynamics", unit="doc", disable=not progress)
    try:
        for name, m, d in runs:
            df = _forward_stats(m, texts, batch_size=batch_size, max_tokens=max_tokens, drop=d, bar=bar, bos=prepend_bos)
            if gradients:
                g = _gradient_stats(m, texts, batch_size=batch_size, max_tokens=max_tokens, drop=d, target=target,
                                    bar=bar, bos=prepend_bos)
                df = df.merge(g, on="layer")
            df.insert(0, "variant", name)
            df.insert(2, "dropped", df["layer"].isin(d))
            frames.append(df)
    finally:
        bar.close()
    loss = "next-token cross-entropy" if target is None else f"logit of token {target} at the last position"
    settings = {"compare_init": compare_init, "drop_residual": list(drop), "init_seed": init_seed, "target": target,
                "batch_size": batch_size, "max_tokens": max_tokens, "gradients": gradients, "prepend_bos": bos,
                "n_texts": len(texts)}
    return Dynamics(model.name, model.arch.layout, loss if gradients else "none", drop, pd.concat(frames, ignore_index=True),
                    settings)


def dynamics_file(model: Model | Any, data: str | Path | Sequence[str], *, out: str | Path | None = None, **kwargs) -> Dynamics:
    """What ``streamlens dynamics MODEL --data FILE`` runs: :func:`dynamics` on the texts of ``data``.

    ``data`` is a ``.txt`` file (one text per line) or a ``.jsonl`` file (a ``"text"`` field per
    line), read by :func:`streamlens.load_texts`.

    ``out`` (``.json`` or ``.csv``) also saves the result; ``kwargs`` go to :func:`dynamics`.
    """
    result = dynamics(model, load_texts(data), **kwargs)
    if out is not None:
        result.save(out)
    return result
