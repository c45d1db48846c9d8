"""One batch at a time: the clean pass of a batch and the removals run on it.

The evaluator (:class:`streamlens.skip.evaluator.LayerSkipEvaluator`) holds only token ids; for each
batch it runs :func:`clean_pass` (the model's own forward, with every block's input and call recorded),
measures every unit in flight on it (:func:`tail` replays blocks ``l..L-1`` from the cached
``resid_pre[l]``; :func:`full` runs one full forward with the removal hooked in), adds the per-document
sums and drops the batch. Peak memory is that of one batch: its clean log-probabilities ``(rows,
vocab)``, its ``L + 1`` block inputs ``(b, p, d)`` and the variants in flight
(:mod:`streamlens.skip.batched`).

Block inputs stay where their block ran (the tensors the hooks saw), so a model whose blocks sit on
several devices replays each block on its own device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from streamlens.intervene.removal import intervention_hooks
from streamlens.intervene.units import Unit
from streamlens.model import hooks
from streamlens.skip.metrics import block_influence
from streamlens.stream.inputs import Batch


@dataclass(eq=False)
class CleanBatch:
    """What one batch's clean pass leaves behind for the removals (dropped once the batch is done)."""

    batch: Batch
    sel: Tensor  # (b, p) bool: positions the metrics average over
    doc: Tensor  # (n,) document index of each selected row
    has_target: Tensor  # (n,) bool: the row has a next token
    target: Tensor  # (n,) next token id (0 where none)
    logp: Tensor  # (n, vocab) clean log-probabilities (float32)
    top1: Tensor  # (n,) clean argmax
    top: Tensor  # (n, k) clean top-k ids
    final: Tensor  # (n, d) clean final residual
    logits: Tensor | None  # (n, vocab) clean logits (float32), for task metrics (None when none is asked)
    bi: Tensor  # (L, n) float64: each block's 1 - cos(resid_pre, resid_post) at the selected rows
    resid: list[Tensor] | None = None  # L+1 tensors (b, p, d): each block's input, then the final residual
    calls: list[tuple] | None = None  # per block: (args after the hidden state, kwargs)
    _probs: Tensor | None = None
    _target_logp: Tensor | None = None

    def probs(self) -> Tensor:
        """``(n, vocab)`` clean probabilities ``exp(logp)``, computed once per batch (every unit's KL needs them)."""
        if self._probs is None:
            self._probs = self.logp.exp()
        return self._probs

    def target_logp(self) -> Tensor:
        """``(n,)`` clean log-probability of each row's next token (target 0 where there is none)."""
        if self._target_logp is None:
            self._target_logp = self.logp.gather(-1, self.target[:, None])[:, 0]
        return self._target_logp


def targets(model, batch: Batch, sel: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(b_idx, p_idx, has_target, target)`` of the selected rows (no forward pass needed)."""
    b_idx, p_idx = sel.nonzero(as_tuple=True)
    lengths = batch.lengths.to(sel.device)
    causal = model.arch.causal
    has_target = (p_idx + 1 < lengths[b_idx]) if causal else torch.ones_like(p_idx, dtype=torch.bool)
    ids = batch.input_ids.to(sel.device)
    tpos = (p_idx + 1).clamp_max(ids.shape[1] - 1) if causal else p_idx
    target = torch.where(has_target, ids[b_idx, tpos], torch.zeros_like(p_idx))
    return b_idx, p_idx, has_target, target


def tokenize(model, docs, batch_size: int, max_tokens, positions, prepend_bos=None) -> tuple[list, Tensor, str]:
    """``[(first document, Batch, selected positions)]`` per batch (token ids only), the per-document counts
    ``(docs, 2)`` of selected positions and of those with a next token, and a hash of the token ids."""
    import hashlib

    from streamlens.stream.inputs import batches, encode, position_mask

    data, count, digest = [], torch.zeros(len(docs), 2, dtype=torch.float64), hashlib.sha256()
    for lo, chunk in batches(docs, batch_size):
        enc = encode(model, chunk, max_tokens=max_tokens, prepend_bos=prepend_bos)
        batch = Batch(enc.input_ids, enc.mask, ())
        sel = position_mask(batch, positions[lo: lo + len(chunk)] if isinstance(positions, Tensor) else positions)
        data.append((lo, batch, sel))
        b_idx, _, has_target, _ = targets(model, batch, sel)
        count[:, 0].index_add_(0, b_idx + lo, torch.ones(len(b_idx), dtype=torch.float64))
        count[:, 1].index_add_(0, b_idx + lo, has_target.double())
        for row, n in zip(batch.input_ids, batch.lengths):
            digest.update(row[: int(n)].numpy().astype("<i8").tobytes() + b"|")
    return data, count, digest.hexdigest()[:16]


def clean_pass(model, batch: Batch, sel: Tensor, lo: int, topk: int, keep_blocks: bool = True,
               keep_logits: bool = True) -> CleanBatch:
    """The model's own forward on ``batch``, with each block's input and call arguments recorded
    (``keep_logits=False``: the clean logits themselves are not kept, only their log-softmax)."""
    m, L = model, model.arch.n_layers
    resid: list[Tensor | None] = [None] * (L + 1)
    calls: list[tuple | None] = [None] * L

    def pre(j):
        def f(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            resid[j] = x.detach()
            calls[j] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"} if args else None)
        return f

    # through attached(): removed on exit and held under the model's lock, like every other hook
    last = hooks.block_point(m.bridge, L - 1, "block", "out")
    record = [(m.bridge.blocks[j], hooks.PreHook(pre(j))) for j in range(L)]
    with torch.no_grad(), hooks.attached(record + [(last, lambda t: resid.__setitem__(L, t.detach()))]):
        logits = m.run(batch.input_ids, batch.mask)
    sel = sel.to(logits.device)
    _, _, has_target, target = targets(m, batch, sel)
    doc = sel.nonzero(as_tuple=True)[0] + lo
    lg = logits[sel].float()
    del logits  # (b, p, vocab): the selected rows are all that is needed
    k = min(topk, lg.shape[-1])
    bi = torch.stack([block_influence(resid[j][sel.to(resid[j].device)], resid[j + 1][sel.to(resid[j].device)]).cpu()
                      for j in range(L)]).double() if all(r is not None for r in resid) else torch.zeros(L, len(doc))
    ok = keep_blocks and all(r is not None for r in resid) and all(c is not None and c[1] is not None for c in calls)
    fin = resid[L][sel.to(resid[L].device)].float()
    return CleanBatch(batch, sel, doc, has_target, target, torch.log_softmax(lg, -1), lg.argmax(-1),
                      lg.topk(k, -1).indices, fin, lg if keep_logits else None, bi, resid if ok else None,
                      calls if ok else None)


class LatestClean:
    """The latest batch's clean pass, kept (one batch: memory stays that of one batch) and reused while the
    weights are unchanged: the evaluator's construction check is its first batch's clean pass, and repeated
    calls on data of one batch run the clean model once."""

    def __init__(self):
        self._kept: tuple[tuple, CleanBatch] | None = None

    def get(self, model, lo: int, batch: Batch, sel: Tensor, topk: int, *, keep_blocks: bool,
            keep_logits: bool) -> CleanBatch:
        key = (lo, weights_state(model))
        if self._kept is not None:
            (k, c), self._kept = self._kept, None  # dropped before the next batch's pass is made
            if k == key and (c.resid is not None or not keep_blocks) and (c.logits is not None or not keep_logits):
                if not keep_logits:
                    c.logits = None  # (n, vocab) kept by an earlier call that needed them
                self._kept = (k, c)
                return c
            del c
        c = clean_pass(model, batch, sel, lo, topk, keep_blocks=keep_blocks, keep_logits=keep_logits)
        self._kept = (key, c)
        return c


def weights_state(model) -> tuple:
    """Where every parameter's data lives and how often it was changed in place (``Tensor._version``)."""
    return tuple((p.data_ptr(), p._version) for p in model.bridge.parameters())


def tail(model, c: CleanBatch, unit: Unit, mode: str, means: dict | None, start: int | None = None,
         watch=None) -> tuple[Tensor, Tensor]:
    """Logits ``(n, vocab)`` and final residual ``(n, d)`` at the selected rows, from cached ``resid_pre``
    (``watch(j, x)`` sees the stream after each block ``j`` that runs)."""
    m, L = model, model.arch.n_layers
    start = unit.first_layer if start is None and unit.atoms else (L if start is None else start)
    skipped = {a.layer for a in unit.atoms if a.kind == "block"} if mode == "skip" else set()
    p = c.batch.input_ids.shape[1]
    x = c.resid[start]
    # the model's lock even when no hook is needed (a skipped block): the blocks are called directly here
    with hooks.attached(intervention_hooks(m, unit, mode, means, p, skip_blocks=False), model=m.bridge):
        for j in range(start, L):
            if j in skipped:
                continue
            args, kwargs = c.calls[j]
            x = x.to(hooks.param_device(m.bridge.blocks[j], c.resid[j].device))  # blocks on several devices: each runs where it lives
            out = m.bridge.blocks[j](x, *args, **kwargs)
            x = out[0] if isinstance(out, tuple) else out
            if watch is not None:
                watch(j, x)
        x = x.to(c.resid[L].device)
        xs = x[c.sel.to(x.device)]
        logits = m.arch.final_transform(m.bridge.unembed(m.bridge.ln_final(xs)))
    return logits.float(), xs.float()


def full(model, c: CleanBatch, unit: Unit, mode: str, means: dict | None) -> tuple[Tensor, Tensor]:
    """The same from one full forward with the removal hooked in (the naive path)."""
    m, L = model, model.arch.n_layers
    got: dict[str, Tensor] = {}
    p = c.batch.input_ids.shape[1]
    hks = intervention_hooks(m, unit, mode, means, p, skip_blocks=True)
    hks.append((hooks.block_point(m.bridge, L - 1, "block", "out"), lambda t: got.__setitem__("x", t)))
    with hooks.attached(hks):
        logits = m.run(c.batch.input_ids, c.batch.mask)
    sel = c.sel.to(logits.device)
    return logits[sel].float(), got["x"][sel.to(got["x"].device)].float()


def check_prefix(model, c: CleanBatch, means: dict | None = None) -> str:
    """Why replaying blocks from the cached inputs does not reproduce ``model`` on ``c`` ('' when it does).

    Two replays with nothing removed: every block from ``resid_pre[0]`` (each block's output must match
    the next cached input, so an input changed in place after it was cached is caught at any layer; the
    final probabilities must match the model's own), and the final norm + unembedding alone from the
    cached last residual.
    """
    from streamlens.intervene.units import combine

    if c.resid is None:
        return "the bridge's blocks were not called with the residual stream as their first argument"
    if getattr(model.bridge, "ln_final", None) is None or getattr(model.bridge, "unembed", None) is None:
        return "the model has no ln_final/unembed components to finish the forward pass from the last block"
    L = model.arch.n_layers
    tol = 1e-4 if model.dtype == torch.float32 else 2e-2
    drift: list[tuple[int, float]] = []

    def watch(j: int, x: Tensor) -> None:
        want = c.resid[j + 1]
        err = float((x.to(want.device) - want).abs().max() / want.abs().max().clamp_min(1e-30))
        if not err <= tol and not drift:
            drift.append((j, err))

    for start in (0, L):
        with torch.no_grad():
            lg = tail(model, c, combine([]), "skip", means, start, watch=watch)[0]
        if drift:
            j, err = drift[0]
            return (f"replaying block {j} from its cached input gave an output {err:.1e} (relative) away from the "
                    "input the model's own forward passed to the next block; using one full forward per unit")
        err = float((torch.softmax(lg, -1) - c.probs()).abs().max())
        if not err <= tol:
            return (f"replaying blocks {start}..{L - 1} + final norm + unembedding from the cached resid_pre[{start}] "
                    f"gave next-token probabilities {err:.1e} away from the model's own forward (a logit soft-cap or "
                    "an LM head beyond the unembedding?); using one full forward per unit")
    return ""
