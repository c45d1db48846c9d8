"""Screening: first-order *estimates* of every unit's removal effect at the cost of one backward pass.

Attribution patching (AtP; Nanda 2023, Kramár et al. 2024): with ``w_u`` a unit's write into the
stream and ``w'_u`` what the removal puts there instead (``0`` in mode ``skip``, the mean write in mode
``mean``), the change of a differentiable metric ``M`` is estimated to first order as

    ΔM ≈ ∂M/∂w_u · (w'_u - w_u)

for every unit from one forward and one backward pass per batch. The metric is the cross-entropy on
the data's own next tokens, so the estimate is of ``delta_ce`` (the KL divergence from the clean
distribution has zero gradient at the clean point and cannot be estimated to first order). A set of
units (a span) gets the sum of its parts' estimates.

Estimates are named as estimates (column ``delta_ce_estimate``); they are *not* the exact numbers,
which :meth:`streamlens.LayerSkipEvaluator.sweep` computes. ``sweep(..., screen=k)`` computes the
estimate for every unit, the exact numbers for the ``k`` units with the largest estimated effect, and
reports the rank correlation between estimate and exact value over those ``k`` units.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from streamlens.errors import StreamlensError
from streamlens.intervene.removal import write_point
from streamlens.intervene.units import Atom, Unit
from streamlens.model import hooks


def _points(model, units: Sequence[Unit]) -> dict[tuple, tuple]:
    """``{(kind, layer): (hookpoint, mean key)}`` for every atom the units remove."""
    arch = model.arch
    out = {}
    for u in units:
        for a in u.atoms:
            if a.kind == "expert":  # inside the MoE write: no write of its own into the stream to take a gradient at
                raise StreamlensError(f"{u.label}: screening estimates writes into the stream, and an expert's share "
                                      "is part of its block's MoE write; screen the mlp units, or sweep the experts "
                                      "exactly (screen=None)")
            if a.kind == "head":
                key, comp, mean_key = ("z", a.layer), ("o", "in"), Atom("attn_z", a.layer)
            else:
                key, comp, mean_key = (a.kind, a.layer), write_point(arch, a), Atom(a.kind, a.layer)
            hp = hooks.block_point(model.bridge, a.layer, *comp)
            if hp is None:
                raise StreamlensError(f"{u.label}: the bridge has no hook point on this {a.kind} write to take the "
                                      "gradient at, so its removal cannot be estimated; sweep it exactly (screen=None)")
            out[key] = (hp, mean_key)
    return out


def estimate_batch(model, c, units: Sequence[Unit], mode: str, means: dict | None) -> dict[str, Tensor]:
    """Per-document sums ``(b,)`` of the estimated ``delta_ce`` of each unit, on one batch ``c``
    (a :class:`~streamlens.skip.streaming.CleanBatch` giving the batch, selection and targets)."""
    arch = model.arch
    if not arch.rule.additive:
        raise StreamlensError(f"screening needs a residual stream that is a sum of writes; {arch.layout} blocks "
                              "put a norm after each sub-layer (use an exact sweep)")
    if mode not in ("skip", "mean"):
        raise StreamlensError(f"screening estimates modes 'skip' and 'mean', not {mode!r}")
    b, p = c.batch.input_ids.shape
    pts = _points(model, units)
    got: dict = {}
    block_in: dict = {}
    hks = []
    for key, (hp, _) in pts.items():
        hks.append((hp, lambda t, key=key: got.__setitem__(key, t)))
        if key[0] == "block":
            hks.append((hooks.block_point(model.bridge, key[1], "block", "in"),
                        lambda t, l=key[1]: block_in.__setitem__(l, t)))
    with torch.enable_grad(), hooks.attached(hks):
        logits = model.run(c.batch.input_ids, c.batch.mask)
        sel = c.sel.to(logits.device)
        logp = torch.log_softmax(logits[sel].float(), -1)
        t = c.has_target.to(logp.device)
        loss = -logp[t].gather(-1, c.target.to(logp.device)[t][:, None]).sum()
        keys = list(got)
        grads = torch.autograd.grad(loss, [got[k] for k in keys], allow_unused=True)
    grad = dict(zip(keys, grads))
    est: dict[tuple, Tensor] = {}  # per atom: (b,) per-document sums
    for key, (_, mean_key) in pts.items():
        g, w = grad[key], got[key].detach()
        if g is None:
            est[key] = torch.zeros(b, dtype=torch.float64)
            continue
        g, w = _bpd(g, b, p), _bpd(w, b, p)
        if key[0] == "block":
            w = w - _bpd(block_in[key[1]].detach(), b, p)
        mean = None
        if mode == "mean":
            m = means[mean_key]
            mean = (m[:p] if m.dim() == 2 else m).to(w.dtype).to(w.device)
        mask = c.batch.mask.to(w.device)[..., None]
        if key[0] == "z":  # (b, p, heads * d_head): one estimate per head
            H = arch.n_heads
            zg, zw = g.reshape(b, p, H, -1), w.reshape(b, p, H, -1)
            delta = (-zw if mean is None else mean.reshape(*mean.shape[:-1], H, -1) - zw)
            est[key] = ((zg.double() * delta.double()).sum(-1) * mask.double()).sum(1)  # (b, heads)
        else:
            delta = -w if mean is None else mean - w
            est[key] = ((g.double() * delta.double()).sum(-1) * mask[..., 0].double()).sum(1)  # (b,)
    out = {}
    for u in units:
        total = torch.zeros(b, dtype=torch.float64)
        for a in u.atoms:
            e = est[("z", a.layer)][:, a.head] if a.kind == "head" else est[(a.kind, a.layer)]
            total = total + e.cpu()
        out[u.label] = total
    return out


def _bpd(t: Tensor, b: int, p: int) -> Tensor:
    return t.reshape(b, p, t.shape[-1]) if t.dim() == 2 else t


def estimate_all(ev, units: Sequence[Unit], mode: str) -> dict[str, float]:
    """The estimated ``delta_ce`` of each unit over ``ev``'s data (mean over positions with a next token),
    streamed batch by batch like the exact sweep (and sharded the same way under ``torchrun``)."""
    from types import SimpleNamespace

    from streamlens.skip import distributed
    from streamlens.skip.streaming import targets

    ev.model.require_eval()
    if mode == "mean":
        ev.ensure_means()
    shard = distributed.current()
    sums = {u.label: torch.zeros(ev.n_docs, dtype=torch.float64) for u in units}
    for i, (lo, batch, sel) in enumerate(ev.data_batches):
        if not shard.mine(i):
            continue
        _, _, has_target, target = targets(ev.model, batch, sel)
        c = SimpleNamespace(batch=batch, sel=sel, has_target=has_target, target=target)
        for label, v in estimate_batch(ev.model, c, units, mode, ev.means).items():
            sums[label][lo:lo + len(batch)] = v
    if shard.collective:
        flat = distributed.all_sum(torch.cat([sums[u.label] for u in units]), shard, ev.model.device)
        sums = dict(zip([u.label for u in units], flat.split(ev.n_docs)))
    total = ev.counts[:, 1].sum()
    return {label: float(s.sum() / total) for label, s in sums.items()}


def screened_rows(rows_exact: dict[str, dict], units: Sequence[Unit], estimates: dict[str, float], mode: str,
                  columns: list[str], n_positions: int) -> tuple[list[dict], float]:
    """Every unit's row: exact numbers where computed (``exact`` True), the estimate beside them; and the
    Spearman rank correlation of estimate and exact ``delta_ce`` over the units computed both ways."""
    from streamlens.skip.metrics import spearman
    from streamlens.skip.sweeps import unit_columns

    rows = []
    for u in units:
        r = rows_exact.get(u.label) or {c: None for c in columns} | {**unit_columns(u), "mode": mode,
                                                                     "n_positions": n_positions}
        rows.append({**{c: r.get(c) for c in columns}, "delta_ce_estimate": estimates[u.label],
                     "exact": u.label in rows_exact})
    both = [r for r in rows if r["exact"] and r.get("delta_ce") is not None]
    rho = spearman([r["delta_ce_estimate"] for r in both], [r["delta_ce"] for r in both])
    return rows, rho
