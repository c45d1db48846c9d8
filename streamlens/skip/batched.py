"""Several removals of one batch in one forward pass: variants stacked along the batch dimension.

Variant ``k`` (one unit removed) occupies rows ``k*b .. (k+1)*b - 1`` of the stack; every removal hook
acts on its own variant's rows only, so each row sees exactly its own removal. Combined with prefix
reuse, a variant joins the stack at the first block it changes: at block ``j`` the stack holds the
variants that entered at or before ``j``, each having entered with the clean ``resid_pre`` cached by
the clean pass. A variant therefore runs exactly the blocks it would run alone, in fewer, larger
passes (on a GPU a small model otherwise leaves the device idle between passes).

A variant that skips its first block(s) (mode ``skip``) enters after them with the clean input of
the first; later skipped blocks of the same variant are bypassed by hooks (``out = in``).

How many variants share a pass comes from a memory budget (:func:`variants_per_pass`). Exactness:
a stacked variant's numbers agree with the same removal run alone to float rounding (a matrix product
over more rows may block its sums differently: ~1e-7 relative in float32), not always bit for bit; so
on a CPU, where stacking gains little, the default is one variant per pass, which reproduces the
single-removal numbers exactly. On a GPU the default budget is 1 GiB.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from streamlens.errors import StreamlensError
from streamlens.intervene.removal import intervention_hooks
from streamlens.intervene.units import Unit
from streamlens.model import hooks

#: Default activation memory the stacked variants of one pass may use (bytes).
DEFAULT_BUDGET = 2 ** 30


def parse_bytes(budget) -> int:
    """``budget`` as bytes: an int, or a string such as ``"512MB"``, ``"2GiB"``."""
    if isinstance(budget, bool):
        raise StreamlensError(f"memory_budget must be a number of bytes or a string like '2GB', got {budget!r}")
    if isinstance(budget, (int, float)) and budget > 0:
        return int(budget)
    if isinstance(budget, str):
        s = budget.strip().upper().replace("IB", "B")
        for suffix, mult in (("KB", 2 ** 10), ("MB", 2 ** 20), ("GB", 2 ** 30), ("TB", 2 ** 40), ("B", 1)):
            if s.endswith(suffix):
                try:
                    value = float(s[: -len(suffix)])
                except ValueError:
                    break
                if value > 0:
                    return int(value * mult)
                break
    raise StreamlensError(f"memory_budget must be a positive number of bytes or a string like '2GB', got {budget!r}")


def variant_bytes(arch, b: int, p: int, n_rows: int, itemsize: int) -> int:
    """Rough activation memory of one variant in flight: one block's intermediates and its final logits."""
    d_mlp = getattr(arch, "d_mlp", None) or 4 * arch.d_model
    block = b * p * (6 * arch.d_model + 3 * d_mlp + 2 * arch.n_heads * p) * itemsize
    return block + 4 * n_rows * (3 * arch.d_vocab + 2 * arch.d_model)


def variants_per_pass(model, b: int, p: int, n_rows: int, budget, max_variants: int | None) -> int:
    """How many variants of a ``(b, p)`` batch fit ``budget`` bytes (at least 1); ``max_variants`` overrides.
    ``budget=None``: one variant per pass on a CPU, :data:`DEFAULT_BUDGET` elsewhere."""
    if max_variants is not None:
        if isinstance(max_variants, bool) or not isinstance(max_variants, int) or max_variants < 1:
            raise StreamlensError(f"variants_per_pass must be a positive int, got {max_variants!r}")
        return max_variants
    if budget is None:
        if model.device.type == "cpu":
            return 1
        budget = DEFAULT_BUDGET
    per = variant_bytes(model.arch, b, p, n_rows, torch.finfo(model.dtype).bits // 8)
    return max(1, parse_bytes(budget) // max(per, 1))


def entry(unit: Unit, mode: str, n_layers: int) -> tuple[int, int]:
    """``(start, enter)``: the cached input the variant starts from, and the first block it runs."""
    start = unit.first_layer if unit.atoms else n_layers
    skipped = {a.layer for a in unit.atoms if a.kind == "block"} if mode == "skip" else set()
    enter = start
    while enter in skipped:
        enter += 1
    return start, enter


def _expand(v, b: int, n: int):
    """A block call argument repeated for ``n`` stacked variants (tensors whose first axis is the batch)."""
    if isinstance(v, Tensor):
        return v.repeat(n, *([1] * (v.dim() - 1))) if v.dim() >= 2 and v.shape[0] == b and n > 1 else v
    if isinstance(v, tuple):
        return tuple(_expand(x, b, n) for x in v)
    if isinstance(v, list):
        return [_expand(x, b, n) for x in v]
    if isinstance(v, dict):
        return {k: _expand(x, b, n) for k, x in v.items()}
    return v


def _merged(entries: list[tuple[int, object]], b: int, p: int, state: dict):
    """One hook applying each variant's function to that variant's rows of the stacked tensor."""

    def fn(t: Tensor):
        n = state["n"]
        per = b if t.shape[0] == n * b else (b * p if t.shape[0] == n * b * p else None)
        if per is None:
            raise StreamlensError(f"a removal hook saw a tensor of shape {tuple(t.shape)} that is not {n} stacked "
                                  f"variants of a ({b}, {p}) batch; use variants_per_pass=1")
        out = None
        for k, f in entries:
            if k >= n:  # the variant has not entered the stack yet
                continue
            cur = t if out is None else out
            res = f(cur[k * per:(k + 1) * per])
            if res is not None:
                if out is None:
                    out = t.clone()
                out[k * per:(k + 1) * per] = res
        return out

    return fn


def stacked_tail(model, c, units: Sequence[Unit], mode: str, means: dict | None) -> list[tuple[Tensor, Tensor]]:
    """Logits ``(n, vocab)`` and final residual ``(n, d)`` at the selected rows for each unit of ``units``
    (in the order given), all from one stacked pass over the cached block inputs of ``c``."""
    m, L = model, model.arch.n_layers
    b, p = c.batch.input_ids.shape
    plan = sorted(((entry(u, mode, L), i, u) for i, u in enumerate(units)), key=lambda e: e[0][1])
    state = {"n": 0}
    per_point: dict = {}
    for k, ((_, enter), _, u) in enumerate(plan):
        for hp, f in intervention_hooks(m, u, mode, means, p, skip_blocks=True):
            per_point.setdefault(hp, []).append((k, f))
    merged = [(hp, _merged(lst, b, p, state)) for hp, lst in per_point.items()]
    x = None
    with hooks.attached(merged, model=m.bridge):  # the lock even with no hook: blocks are called directly
        for j in range(L + 1):
            joining = [c.resid[start] for (start, enter), _, _ in plan if enter == j]
            if joining:
                dev = c.resid[L].device if j == L else hooks.param_device(m.bridge.blocks[j], c.resid[j].device)
                new = torch.cat([t.to(dev) for t in joining])
                x = new if x is None else torch.cat([x.to(dev), new])
                state["n"] += len(joining)
            if j == L or x is None:
                continue
            args, kwargs = c.calls[j]
            n = state["n"]
            x = x.to(hooks.param_device(m.bridge.blocks[j], c.resid[j].device))
            out = m.bridge.blocks[j](x, *_expand(args, b, n), **_expand(kwargs, b, n))
            x = out[0] if isinstance(out, tuple) else out
        x = x.to(c.resid[L].device)
        sel = c.sel.to(x.device)
        xs = x.reshape(len(plan), b, p, x.shape[-1])[:, sel]  # (variants, rows, d)
        logits = m.arch.final_transform(m.bridge.unembed(m.bridge.ln_final(xs.reshape(-1, xs.shape[-1])))).float()
    logits = logits.reshape(len(plan), -1, logits.shape[-1])
    results: list = [None] * len(plan)
    for k, (_, i, _) in enumerate(plan):
        results[i] = (logits[k], xs[k].float())
    return results
