"""Mean writes over a data set, for the ``mean`` removal mode.

``mean_writes`` runs one clean pass over the batches and averages, over the non-padding tokens,
the write of every block and sub-layer (where each layout writes:
:meth:`streamlens.model.layouts.Layout.write`) and the heads' output-projection input ``z``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from streamlens.intervene.units import Atom
from streamlens.intervene.removal import base_point, write_point
from streamlens.model import experts, hooks

def mean_writes(model, batches, over: str = "position") -> dict:
    """The mean write of every atom over the non-padding tokens of ``batches`` (one extra clean pass).

    Keys are :class:`Atom` s (``block``/``attn``/``mlp``) and ``Atom("attn_z", l)`` for the heads'
    ``z`` of layer ``l``; values ``(pos, d)`` (``over="position"``: mean over documents at each
    position) or ``(d,)`` (``over="all"``). Routed experts' mean shares are computed when first asked for
    (:class:`MeanWrites`).
    """
    batches = list(batches)  # kept (token ids only) for the expert means, computed when first asked for
    sums: dict = {}
    counts: dict = {}
    for batch in batches:
        add_write_sums(sums, counts, batch_write_sums(model, batch))
    return MeanWrites(finish_means(sums, counts, over), model, batches, over)


class MeanWrites(dict):
    """The mean writes of :func:`mean_writes`; the mean share of each routed expert (``Atom("expert", l, e)``, the
    expert's output times its routing weight, before any residual multiplier or norm) is computed on first use,
    one pass over the same batches for all experts of layer ``l`` (it costs one experts call per expert).

    ``ordered(compute, n)`` yields ``compute(i)`` for batches ``i < n`` in batch order (default: computed
    here, one after the other); a sharded pass passes one that computes each batch on one worker and
    gathers them (:func:`streamlens.skip.distributed.mean_writes`), so the sums are added in the same order."""

    def __init__(self, means: dict, model, batches, over: str, ordered=None):
        super().__init__(means)
        self.model, self.batches, self.over = model, batches, over
        self.ordered = ordered or (lambda compute, n: (compute(i) for i in range(n)))

    def get(self, atom, default=None):
        if isinstance(atom, Atom) and atom.kind == "expert" and atom not in self:
            batches = self.batches
            sums: dict = {}
            counts: dict = {}
            for part in self.ordered(lambda i: expert_write_sums(self.model, atom.layer, batches[i]), len(batches)):
                add_write_sums(sums, counts, part)
            self.update(finish_means(sums, counts, self.over))
        return super().get(atom, default)


def expert_write_sums(model, layer: int, batch) -> dict:
    """``{Atom("expert", layer, e): (sum, count)}`` of one batch, as :func:`batch_write_sums` for the routed
    experts' shares of block ``layer``."""
    b, p = batch.input_ids.shape
    with torch.no_grad(), experts.recording(model, [layer]) as calls:
        model.run(batch.input_ids, batch.mask)
    shares = experts.expert_writes(model, layer, calls[layer], scaled=False).double()  # (E, tokens, d)
    mask = batch.mask.to(shares.device).double()[..., None]  # (b, p, 1)
    return {Atom("expert", layer, e): ((w.reshape(b, p, -1) * mask).sum(0), mask.sum(0)) for e, w in enumerate(shares)}


def batch_write_sums(model, batch) -> dict:
    """``{atom: (sum, count)}`` of one batch: the float64 sum over its documents of every atom's write
    at each position ``(p, d)`` and the number of non-padding tokens there ``(p, 1)``. Adding these in
    batch order (:func:`add_write_sums`) is what :func:`mean_writes` does, so a pass sharded over
    workers that adds the same per-batch sums in the same order gets the same bits."""
    arch, bridge = model.arch, model.bridge
    b, p = batch.input_ids.shape
    raw: dict = {}
    pts = []
    for l in range(arch.n_layers):
        keys = {("block", "in"), ("block", "out"), ("o", "in")}
        for kind in dict.fromkeys(("attn", "mlp", *arch.rule_of(l).writers)):
            keys.add(write_point(arch, Atom(kind, l)))
            bp = base_point(arch, Atom(kind, l))
            if bp:
                keys.add(bp)
        for comp, side in keys:
            hp = hooks.block_point(bridge, l, comp, side)
            if hp is not None:
                pts.append((hp, lambda t, k=(l, comp, side): raw.__setitem__(
                    k, (t.reshape(b, p, t.shape[-1]) if t.dim() == 2 else t).detach().double())))
    with torch.no_grad(), hooks.attached(pts):
        model.run(batch.input_ids, batch.mask)
    out: dict = {}
    for l in range(arch.n_layers):
        writes = {Atom("block", l): raw[(l, "block", "out")] - raw[(l, "block", "in")]}
        for kind in dict.fromkeys(("attn", "mlp", *arch.rule_of(l).writers)):
            w = raw.get((l, *write_point(arch, Atom(kind, l))))
            bp = base_point(arch, Atom(kind, l))
            if w is not None:
                writes[Atom(kind, l)] = w if bp is None else w - raw[(l, *bp)]
        if (l, "o", "in") in raw:
            writes[Atom("attn_z", l)] = raw[(l, "o", "in")]
        for atom, w in writes.items():
            mask = batch.mask.to(w.device).double()[..., None]  # (b, p, 1), where this block's write lives
            out[atom] = ((w * mask).sum(0), mask.sum(0))  # (p, d), (p, 1)
    return out


def add_write_sums(sums: dict, counts: dict, part: dict) -> None:
    """Add one batch's :func:`batch_write_sums` into the running ``sums`` and ``counts`` (in place)."""
    for atom, (s, c) in part.items():
        if atom in sums:
            n = max(sums[atom].shape[0], s.shape[0])
            sums[atom] = _pad_rows(sums[atom], n) + _pad_rows(s.to(sums[atom].device), n)
            counts[atom] = _pad_rows(counts[atom], n) + _pad_rows(c.to(counts[atom].device), n)
        else:
            sums[atom], counts[atom] = s, c


def finish_means(sums: dict, counts: dict, over: str = "position") -> dict:
    """The mean writes from the summed :func:`batch_write_sums` (float32, where the sums are)."""
    if over == "all":
        return {a: (s.sum(0) / counts[a].sum()).float() for a, s in sums.items()}
    return {a: (s / counts[a].clamp_min(1)).float() for a, s in sums.items()}


def atom_device(model, atom: Atom) -> torch.device:
    """The device of the block that writes ``atom`` (where its write, and so its mean, is computed)."""
    return hooks.param_device(model.bridge.blocks[atom.layer], model.device)


def _pad_rows(x: Tensor, n: int) -> Tensor:
    return x if x.shape[0] == n else torch.cat([x, x.new_zeros(n - x.shape[0], *x.shape[1:])])
