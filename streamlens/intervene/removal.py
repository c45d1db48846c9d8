"""Removal modes: the hooks that remove a unit (:mod:`streamlens.intervene.units`) from the stream.

What removal means, per mode, with ``f`` the unit's write into the stream (the write of each layout
is stated by its :class:`~streamlens.model.layouts.Layout`):

=====================  ==========================================================================
mode                   block ``l`` (``out = in + f(in)``, all layouts)
=====================  ==========================================================================
``skip``               ``out = in``: the whole block is bypassed
``mean``               ``out = in + mean(f)``: ``f = out - in`` replaced by its mean over the data
``drop-residual``      ``out = f(in) = out - in``: the block's skip connection is removed
=====================  ==========================================================================

``drop-residual`` on a post-norm block (BERT, ``out = ln2(h + mlp(h))``, ``h = ln1(x + attn(x))``)
removes both skip connections inside the norms: ``out = ln2(mlp(h'))`` with ``h' = ln1(attn(x))``.

For sub-layers, heads and experts (``skip`` and ``mean`` only):

* pre-norm (GPT-2, Llama, OPT) and parallel (GPT-J, NeoX): the write is ``attn.hook_out`` /
  ``mlp.hook_out``; ``skip`` replaces it by zeros, ``mean`` by its mean. In a parallel block the
  other sub-layer still reads the unchanged ``resid_pre``.
* sandwich (Gemma 2): the write is the extra norm's output (``ln1_post``/``ln2_post``); it is
  replaced, so the extra norm's own output is removed too.
* post-norm (BERT): the write is what is added before the norm; ``skip`` makes the norm read
  ``resid_pre`` alone (``ln1(resid_pre)``), the norm itself stays.
* a head ``h``: its slice of the output projection's input ``z`` (``attn.o.hook_in``) is zeroed
  (``skip``) or set to its mean (``mean``), which removes exactly ``z_h W_O[h]`` before any extra
  norm; the output bias stays.
* an expert ``e`` of a mixture of experts: ``skip`` zeroes its routing weight, which removes exactly its
  share ``r_e(x) · E_e(x)`` of the experts' output; ``mean`` replaces that share by its mean share over
  the data (at each position, or overall), before any residual multiplier or norm after the MoE block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from streamlens.errors import StreamlensError
from streamlens.intervene.units import Atom, Unit
from streamlens.model import hooks
from streamlens.model.experts import removal_hook, replacement_hooks

# ------------------------------------------------------------------------------- where a removal acts
def write_point(arch, atom: Atom) -> tuple[str, str]:
    """``(component, side)`` whose tensor is replaced to remove ``atom`` (the layout says where sub-layers write)."""
    if atom.kind == "block":
        return "block", "out"
    if atom.kind == "head":
        return "o", "in"
    return arch.rule_of(atom.layer).write_point(atom.kind)


def base_point(arch, atom: Atom) -> tuple[str, str] | None:
    """Where the stream that the write is added to can be read (None: the write is replaced outright)."""
    if atom.kind == "block":
        return "block", "in"
    if atom.kind in ("attn", "mlp"):
        return arch.rule_of(atom.layer).base_point(atom.kind)
    return None


def _fit(x: Tensor, like: Tensor) -> Tensor:
    """``x`` broadcast to ``like``'s shape (handles (batch*pos, d) flattening, OPT)."""
    if like.dim() == 2 and x.dim() == 3:
        return x.reshape(-1, x.shape[-1]).to(like.dtype)
    return x.to(like.dtype)


def _mean_like(mean: Tensor, t: Tensor, n_pos: int) -> Tensor:
    """The mean write ``(pos, d)`` or ``(d,)`` laid out like ``t`` (``(b, p, d)`` or flattened ``(b*p, d)``)."""
    if mean is None:
        raise StreamlensError("mode 'mean' needs the mean writes of the data (internal: none were computed)")
    if mean.dim() == 1:  # moved to where the write is replaced: the device of the block that writes it
        return mean.to(device=t.device, dtype=t.dtype).expand_as(t).clone()
    m = mean[:n_pos].to(device=t.device, dtype=t.dtype)  # (p, d)
    if t.dim() == 3:
        return m.expand(t.shape[0], -1, -1).clone()
    return m.repeat(t.shape[0] // n_pos, 1)


def intervention_hooks(model, unit: Unit, mode: str, means: dict | None, n_pos: int, skip_blocks: bool = True):
    """``[(hookpoint, fn)]`` that remove ``unit`` in ``mode``.

    ``means[atom]`` is the mean write (``(pos, d)`` per position or ``(d,)``) for ``mode="mean"``;
    ``n_pos`` is the batch's padded length. With ``skip_blocks=False`` (used by the prefix path,
    which does not call skipped blocks at all) no hooks are made for blocks in ``skip`` mode.
    """
    arch, bridge = model.arch, model.bridge
    out = []
    heads: dict[int, list[int]] = {}
    atoms: list[Atom] = []
    for atom in unit.atoms:
        if atom.kind == "block" and mode == "drop-residual" and not arch.rule.additive:
            # post-norm: the skip connections sit inside the norms, ln1(x + attn(x)) and
            # ln2(h + mlp(h)); without them the block computes ln2(mlp(h')) with h' = ln1(attn(x)).
            atoms += [Atom("attn", atom.layer), Atom("mlp", atom.layer)]
        else:
            atoms.append(atom)
    experts: dict[int, list[int]] = {}
    for atom in atoms:
        if atom.kind == "head":
            heads.setdefault(atom.layer, []).append(atom.head)
            continue
        if atom.kind == "expert":
            experts.setdefault(atom.layer, []).append(atom.head)
            continue
        if atom.kind == "block" and mode == "skip" and not skip_blocks:
            continue
        comp, side = write_point(arch, atom)
        hp = hooks.block_point(bridge, atom.layer, comp, side)
        bp = base_point(arch, atom)
        base_hp = None if bp is None else hooks.block_point(bridge, atom.layer, *bp)
        if hp is None or (bp is not None and base_hp is None):
            raise StreamlensError(f"{unit.label}: block {atom.layer} has no {comp} {side} hook point to intervene at")
        held: dict[str, Tensor] = {}
        if base_hp is not None:
            out.append((base_hp, lambda t, held=held: held.__setitem__("x", t)))
        mean = None if means is None else means.get(atom)

        def fn(t, held=held, mean=mean):
            base = held.get("x")
            if mode == "skip":
                return torch.zeros_like(t) if base is None else _fit(base, t)
            if mode == "mean":
                m = _mean_like(mean, t, n_pos)
                return m if base is None else _fit(base, t) + m
            return t - _fit(base, t)  # drop-residual: out - in

        out.append((hp, fn))
    a = arch
    for layer, hs in heads.items():
        hp = hooks.block_point(bridge, layer, "o", "in")
        if hp is None:
            raise StreamlensError(f"layer {layer}'s attention has no output projection hook (attn.o) to remove heads at")
        mean = None if means is None else means.get(Atom("attn_z", layer))

        def zfn(t, hs=hs, mean=mean):
            z = t.clone().reshape(*t.shape[:-1], a.n_heads, a.d_head)  # (..., head, d_head)
            m = None if mode == "skip" else _mean_like(mean, t, n_pos).reshape(z.shape)
            for h in hs:
                z[..., h, :] = 0 if m is None else m[..., h, :]
            return z.reshape(t.shape)

        out.append((hp, zfn))
    for layer, es in experts.items():
        if mode == "skip":  # zero the routing weights of the removed experts: exactly their share
            out.append(removal_hook(model, layer, es))
            continue
        # mean: each expert's share replaced by its mean share over the data (before any multiplier or norm)
        got = {e: None if means is None else means.get(Atom("expert", layer, e)) for e in es}
        if any(m is None for m in got.values()):
            raise StreamlensError(f"{unit.label} in mode 'mean': no mean expert shares were given for it")
        new = {e: (lambda share, m=m: _fit(_mean_like(m, share, n_pos), share)) for e, m in got.items()}
        out.extend(replacement_hooks(model, layer, new))
    return out


def drop_residual_hooks(model, layers: Sequence[int]) -> list:
    """``[(hookpoint, fn)]`` removing the skip connection of each block in ``layers`` (``x + f(x) → f(x)``).

    The same hooks as ``intervention_hooks`` in ``drop-residual`` mode; used where the removal is
    combined with other hooks (the gradient split records the stream around them).
    """
    from streamlens.intervene.units import combine, unit_of

    if not layers:
        return []
    unit = combine([unit_of(model, "block", l) for l in layers])
    return intervention_hooks(model, unit, "drop-residual", None, 0)
