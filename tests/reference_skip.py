"""The evaluator as it was before streaming (main @ 5d20864), kept verbatim as the reference that the
streaming evaluator must reproduce number for number (tests/test_skip_streaming.py). Not part of the package."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from streamlens.errors import StreamlensError
from streamlens.intervene.means import mean_writes
from streamlens.intervene.removal import intervention_hooks
from streamlens.intervene.units import Unit, check_mode, combine, parse_unit
from streamlens.model import hooks
from streamlens.model.loading import Model, as_model
from streamlens.skip.metrics import (angle, block_influence, check_finite, delta_ce, kl, metric_names, ratio_bootstrap,
                                     resample_indices)
from streamlens.stream.inputs import Batch, batches, check_batch_size, encode, load_texts, position_mask


@dataclass(eq=False)
class CleanBatch:
    """What one batch's clean pass leaves behind for the removals."""

    batch: Batch
    sel: Tensor  # (b, p) bool: positions the metrics average over
    doc: Tensor  # (n,) document index of each selected row
    has_target: Tensor  # (n,) bool: the row has a next token
    target: Tensor  # (n,) next token id (0 where none)
    logp: Tensor  # (n, vocab) clean log-probabilities
    top1: Tensor  # (n,) clean argmax
    top: Tensor  # (n, k) clean top-k ids
    final: Tensor  # (n, d) clean final residual
    resid: list[Tensor] | None = None  # L+1 tensors (b, p, d): each block's input, then the final residual
    calls: list[tuple] | None = None  # per block: (args after the hidden state, kwargs)


class OldEvaluator:
    """Measure removals of units against one shared clean pass over ``data``.

    Args:
        model: a :class:`~streamlens.Model` (or anything :func:`streamlens.load` takes).
        data: a list of texts, a ``.txt``/``.jsonl`` path (see :func:`streamlens.load_texts`), token ids
            (an integer tensor ``(docs, pos)`` or a list of lists).
        max_tokens: keep at most this many tokens per document.
        batch_size: documents per forward pass (right-padded).
        positions: restrict the metrics to some positions, in the vocabulary of every verb
            (:func:`streamlens.stream.inputs.select_positions`): ints, ``"last"``, a ``slice`` of
            absolute positions (``slice(half, None)``) or a boolean tensor ``(docs, pos)``; padding is
            always excluded.
        topk: ``k`` of the ``topk`` metric.
        n_boot, seed: bootstrap replicates (over documents) and their seed.
        mean_over: ``"position"`` (mean write per position, the default) or ``"all"`` for ``mode="mean"``.
        strategy: how removals are executed: ``"auto"`` (prefix reuse where it reproduces the model),
            ``"prefix"`` or ``"naive"`` (one full forward per unit). ``path=`` is its former name.
        field: the text field of a JSONL file.
    """

    def __init__(self, model, data, *, max_tokens: int | None = None, batch_size: int = 8, positions=None,
                 topk: int = 5, n_boot: int = 1000, seed: int = 0, mean_over: str = "position",
                 strategy: str = "auto", field: str = "text", progress: bool = True, path: str | None = None):
        self.model: Model = as_model(model)
        strategy = _renamed(path, strategy)
        if strategy not in STRATEGIES:
            raise StreamlensError(f"strategy must be 'auto', 'prefix' or 'naive', got {strategy!r}")
        if mean_over not in ("position", "all"):
            raise StreamlensError(f"mean_over must be 'position' or 'all', got {mean_over!r}")
        check_batch_size(batch_size)
        docs = _documents(data, field)
        if isinstance(positions, Tensor) and positions.dtype == torch.bool and positions.shape[0] != len(docs):
            raise StreamlensError(f"positions mask has {positions.shape[0]} rows for {len(docs)} documents")
        self.n_docs = len(docs)
        self.topk, self.mean_over, self.progress = topk, mean_over, progress
        self.boot = resample_indices(self.n_docs, n_boot, seed)
        self._means: dict | None = None
        self.strategy, self.strategy_reason = (("naive", "strategy='naive' was asked for") if strategy == "naive"
                                               else ("prefix", ""))
        self.batches: list[tuple[int, CleanBatch]] = []
        lo = 0
        self._bi = torch.zeros(self.model.arch.n_layers, self.n_docs, dtype=torch.float64)
        self._count = torch.zeros(self.n_docs, 2, dtype=torch.float64)
        for lo, chunk in batches(docs, batch_size):
            batch = encode(self.model, chunk, max_tokens=max_tokens)
            mine = positions[lo: lo + len(chunk)] if isinstance(positions, Tensor) else positions
            self.batches.append((lo, self._clean(batch, position_mask(batch, mine), lo)))
        if self._count[:, 0].sum() == 0:
            raise StreamlensError(f"no positions to measure: the {self.n_docs} documents have no selected non-padding positions")
        if strategy != "naive":
            reason = self._check_prefix()
            if reason:
                if strategy == "prefix":
                    raise StreamlensError(f"prefix reuse does not reproduce this model: {reason}")
                self.strategy, self.strategy_reason = "naive", reason
                for _, c in self.batches:
                    c.resid = c.calls = None

    # ----------------------------------------------------------------------- clean pass
    def _clean(self, batch: Batch, sel: Tensor, lo: int) -> CleanBatch:
        m, L = self.model, self.model.arch.n_layers
        dev = m.device
        resid: list[Tensor | None] = [None] * (L + 1)
        calls: list[tuple | None] = [None] * L
        handles = []

        def pre(j):
            def f(module, args, kwargs):
                x = args[0] if args else kwargs.get("hidden_states")
                resid[j] = x.detach()
                calls[j] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"} if args
                            else None)
            return f

        try:
            for j in range(L):
                handles.append(m.bridge.blocks[j].register_forward_pre_hook(pre(j), with_kwargs=True))
            last = hooks.block_point(m.bridge, L - 1, "block", "out")
            with torch.no_grad(), hooks.attached([(last, lambda t: resid.__setitem__(L, t.detach()))]):
                logits = m.run(batch.input_ids, batch.mask)
        finally:
            for h in handles:
                h.remove()
        sel = sel.to(dev)
        b_idx, p_idx = sel.nonzero(as_tuple=True)
        lengths = batch.lengths.to(dev)
        causal = m.arch.causal
        has_target = (p_idx + 1 < lengths[b_idx]) if causal else torch.ones_like(p_idx, dtype=torch.bool)
        ids = batch.input_ids.to(dev)
        tpos = (p_idx + 1).clamp_max(ids.shape[1] - 1) if causal else p_idx
        target = torch.where(has_target, ids[b_idx, tpos], torch.zeros_like(p_idx))
        doc = b_idx + lo
        lg = logits[sel].float()
        k = min(self.topk, lg.shape[-1])
        self._count[:, 0].index_add_(0, doc.cpu(), torch.ones(len(doc), dtype=torch.float64))
        self._count[:, 1].index_add_(0, doc.cpu(), has_target.cpu().double())
        for j in range(L):
            nxt = resid[j + 1]
            bi = block_influence(resid[j][sel], nxt[sel])
            self._bi[j].index_add_(0, doc.cpu(), bi.cpu().double())
        ok = all(r is not None for r in resid) and all(c is not None and c[1] is not None for c in calls)
        return CleanBatch(batch, sel, doc, has_target, target, torch.log_softmax(lg, -1), lg.argmax(-1), lg.topk(k, -1).indices,
                      resid[L][sel].float(), resid if ok else None, calls if ok else None)

    def _check_prefix(self) -> str:
        c = self.batches[0][1]
        if c.resid is None:
            return "the bridge's blocks were not called with the residual stream as their first argument"
        if getattr(self.model.bridge, "ln_final", None) is None or getattr(self.model.bridge, "unembed", None) is None:
            return "the model has no ln_final/unembed components to finish the forward pass from the last block"
        L = self.model.arch.n_layers
        for start in sorted({0, L // 2, L}):
            with torch.no_grad():
                lg = self._tail(c, combine([]), "skip", start)[0]
            want = c.logp.exp()
            got = torch.softmax(lg, -1)
            err = float((got - want).abs().max())
            if not err <= 1e-4:
                return (f"replaying blocks {start}..{L - 1} + final norm + unembedding from the cached resid_pre[{start}] "
                        f"gave next-token probabilities {err:.1e} away from the model's own forward (a logit soft-cap or "
                        "an LM head beyond the unembedding?); using one full forward per unit")
        return ""

    # ----------------------------------------------------------------------- one removal
    def _tail(self, c: CleanBatch, unit: Unit, mode: str, start: int | None = None) -> tuple[Tensor, Tensor]:
        """Logits ``(n, vocab)`` and final residual ``(n, d)`` at the selected rows, from cached ``resid_pre``."""
        m, L = self.model, self.model.arch.n_layers
        start = unit.first_layer if start is None and unit.atoms else (L if start is None else start)
        skipped = {a.layer for a in unit.atoms if a.kind == "block"} if mode == "skip" else set()
        p = c.batch.input_ids.shape[1]
        x = c.resid[start]
        with hooks.attached(intervention_hooks(m, unit, mode, self._means, p, skip_blocks=False)):
            for j in range(start, L):
                if j in skipped:
                    continue
                args, kwargs = c.calls[j]
                out = m.bridge.blocks[j](x, *args, **kwargs)
                x = out[0] if isinstance(out, tuple) else out
            xs = x[c.sel]
            logits = m.arch.final_transform(m.bridge.unembed(m.bridge.ln_final(xs)))
        return logits.float(), xs.float()

    def _full(self, c: CleanBatch, unit: Unit, mode: str) -> tuple[Tensor, Tensor]:
        """The same from one full forward with the removal hooked in (the naive path)."""
        m, L = self.model, self.model.arch.n_layers
        got: dict[str, Tensor] = {}
        p = c.batch.input_ids.shape[1]
        hks = intervention_hooks(m, unit, mode, self._means, p, skip_blocks=True)
        hks.append((hooks.block_point(m.bridge, L - 1, "block", "out"), lambda t: got.__setitem__("x", t)))
        with hooks.attached(hks):
            logits = m.run(c.batch.input_ids, c.batch.mask)
        return logits[c.sel].float(), got["x"][c.sel].float()

    def doc_sums(self, unit, mode: str = "skip", metrics: Sequence[str] = ("kl", "ce", "top1"),
                 strategy: str | None = None, *, path: str | None = None) -> dict[str, Tensor]:
        """Per-document sums ``(docs,)`` of each metric for ``unit`` removed (see :meth:`evaluate`)."""
        self.model.require_eval()
        unit = unit if isinstance(unit, Unit) else combine([parse_unit(self.model, u) for u in
                                                            (unit if isinstance(unit, list) else [unit])])
        check_mode(mode, unit)
        names = metric_names(metrics)
        if mode == "mean" and self._means is None:
            self._means = mean_writes(self.model, [c.batch for _, c in self.batches], self.mean_over)
        strategy = _renamed(path, strategy) or self.strategy
        if strategy == "prefix" and self.strategy != "prefix":
            raise StreamlensError(f"prefix reuse is not available for this model: {self.strategy_reason}")
        sums = {k: torch.zeros(self.n_docs, dtype=torch.float64) for k in names}
        with torch.no_grad():
            for _, c in self.batches:
                lg, fin = self._tail(c, unit, mode) if strategy == "prefix" else self._full(c, unit, mode)
                vals = row_metrics(c, lg, fin, names)
                doc = c.doc.cpu()
                for k, v in vals.items():
                    d = doc[c.has_target.cpu()] if k == "delta_ce" else doc
                    sums[k].index_add_(0, d, v.cpu().double())
        return sums

    def evaluate(self, unit, mode: str = "skip", metrics: Sequence[str] = ("kl", "ce", "top1"),
                 strategy: str | None = None, *, path: str | None = None) -> dict[str, float]:
        """Metrics (mean over selected positions) and ``*_lo``/``*_hi`` bootstrap bounds for one unit or a set.

        ``unit``: a label (``"block.3"``, ``"head.1.2"``, ``"span.2:5"``), a tuple, or a list of them removed
        together; ``[]`` removes nothing (every metric then equals its clean value: ``kl = 0``, ``top1 = 1``).
        """
        sums = self.doc_sums(unit, mode, metrics, _renamed(path, strategy))
        row: dict[str, Any] = {}
        for k, s in sums.items():
            cnt = self._count[:, 1 if k == "delta_ce" else 0]
            row[k], row[f"{k}_lo"], row[f"{k}_hi"] = ratio_bootstrap(s, cnt, self.boot)
        row["n_positions"] = int(self._count[:, 0].sum())
        return row

    def block_influence(self) -> list[float]:
        """Each block's mean ``1 - cos(resid_pre, resid_post)`` over the selected positions (clean pass)."""
        total = self._count[:, 0].sum()
        return [float(self._bi[j].sum() / total) for j in range(self.model.arch.n_layers)]

    @property
    def path(self) -> str:
        """The former name of :attr:`strategy`."""
        return self.strategy

    @property
    def path_reason(self) -> str:
        """The former name of :attr:`strategy_reason`."""
        return self.strategy_reason


# --------------------------------------------------------------------------- helpers
STRATEGIES = ("auto", "prefix", "naive")


def _renamed(path: str | None, strategy: str | None) -> str | None:
    """``strategy``, or the deprecated ``path=`` that used to name it."""
    if path is None:
        return strategy
    warnings.warn("path= is now strategy= (how removals are executed)", DeprecationWarning, stacklevel=3)
    return path


def _documents(data, field: str):
    if isinstance(data, Tensor):
        if data.dim() != 2 or data.shape[0] == 0:
            raise StreamlensError(f"token data must be a non-empty (docs, pos) tensor, got shape {tuple(data.shape)}")
        return [row.tolist() for row in data]
    if isinstance(data, list) and data and all(isinstance(d, (list, tuple)) for d in data):
        return [list(d) for d in data]
    return load_texts(data, field=field)


# The metrics as the old evaluator computed them (whole batch, one full-vocabulary tensor per operation):
# streamlens.skip.metrics.row_metrics now works a few rows at a time, in place, and must equal this bit for bit.
def row_metrics(clean, lg: Tensor, fin: Tensor, names, task=None) -> dict[str, Tensor]:
    """Each metric of ``names`` per selected row: ablated logits ``lg`` and final residual ``fin`` against ``clean``.

    ``clean`` carries the clean pass of the batch (``logp``, ``top1``, ``top``, ``final``, ``target``,
    ``has_target``; :class:`streamlens.skip.evaluator.CleanBatch`).
    """
    check_finite(lg, "the logits with the unit removed")  # never top1 = 1.0 beside kl = nan
    out = {}
    logq = torch.log_softmax(lg, -1) if ("kl" in names or "delta_ce" in names) else None
    if "kl" in names:
        out["kl"] = kl(clean.logp, logq)
    if "delta_ce" in names:
        t = clean.has_target
        out["delta_ce"] = delta_ce(clean.logp[t], logq[t], clean.target[t])
    if "top1" in names:
        out["top1"] = (lg.argmax(-1) == clean.top1).float()
    if "topk" in names:
        kk = clean.top.shape[1]
        other = lg.topk(kk, -1).indices
        out["topk"] = (clean.top[:, :, None] == other[:, None, :]).any(-1).float().mean(-1)
    if "angle" in names:
        out["angle"] = angle(clean.final, fin)
    if task is not None:
        out.update(task.values(clean, lg, names))
    return out
