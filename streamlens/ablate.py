"""Units that can be removed from the residual stream, and the hooks that remove them.

A *unit* is a block, a sub-layer (``attn``/``mlp``), one attention head, or a span of consecutive
blocks. Labels: ``"block.3"``, ``"attn.3"``, ``"mlp.3"``, ``"head.3.1"`` (layer 3, head 1),
``"span.3:5"`` (blocks 3 and 4). Several units removed together form a *set*.

What removal means, per mode, with ``f`` the unit's write into the stream (see
:mod:`streamlens.capture` for the write of each layout):

=====================  ==========================================================================
mode                   block ``l`` (``out = in + f(in)``, all layouts)
=====================  ==========================================================================
``skip``               ``out = in``: the whole block is bypassed
``mean``               ``out = in + mean(f)``: ``f = out - in`` replaced by its mean over the data
``drop-residual``      ``out = f(in) = out - in``: the block's skip connection is removed
=====================  ==========================================================================

``drop-residual`` on a post-norm block (BERT, ``out = ln2(h + mlp(h))``, ``h = ln1(x + attn(x))``)
removes both skip connections inside the norms: ``out = ln2(mlp(h'))`` with ``h' = ln1(attn(x))``.

For sub-layers and heads (``skip`` and ``mean`` only):

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
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from streamlens import hooks
from streamlens.errors import StreamlensError

KINDS = ("block", "attn", "mlp", "head", "span")
MODES = ("skip", "mean", "drop-residual")


@dataclass(frozen=True, order=True)
class Atom:
    """One removable piece: ``kind`` in block/attn/mlp/head, its layer, and its head (heads only)."""

    kind: str
    layer: int
    head: int | None = None


@dataclass(frozen=True)
class Unit:
    """What one row of a sweep removes: a label, its atoms, and where it sits."""

    label: str
    kind: str
    atoms: tuple[Atom, ...]
    layer: int | None = None
    head: int | None = None
    start: int | None = None
    width: int | None = None

    @property
    def first_layer(self) -> int:
        return min(a.layer for a in self.atoms) if self.atoms else 0


def unit_of(model, kind: str, layer: int, head: int | None = None, width: int | None = None) -> Unit:
    """A checked single unit (``span`` takes ``layer`` as its start and a ``width``)."""
    a = model.arch
    if kind not in KINDS:
        raise StreamlensError(f"unknown unit {kind!r}; choose one of {KINDS} or a list of units")
    if kind == "span":
        if not isinstance(width, int) or width < 1:
            raise StreamlensError(f"a span needs a positive int width, got {width!r}")
        if width > a.n_layers:
            raise StreamlensError(f"a span of width {width} is wider than the {a.n_layers}-layer model")
        if not 0 <= layer <= a.n_layers - width:
            raise StreamlensError(f"a span of width {width} cannot start at block {layer} of a {a.n_layers}-layer model")
        return Unit(f"span.{layer}:{layer + width}", "span", tuple(Atom("block", l) for l in range(layer, layer + width)),
                    start=layer, width=width)
    layer = model.check_layer(layer)
    if kind == "head":
        if not isinstance(head, int) or not 0 <= head < a.n_heads:
            raise StreamlensError(f"head {head!r} does not exist: layer {layer} has {a.n_heads} heads (0..{a.n_heads - 1})")
        return Unit(f"head.{layer}.{head}", "head", (Atom("head", layer, head),), layer=layer, head=head)
    return Unit(f"{kind}.{layer}", kind, (Atom(kind, layer),), layer=layer)


_LABEL = re.compile(r"^(block|attn|mlp)\.(-?\d+)$|^head\.(-?\d+)\.(\d+)$|^span\.(\d+):(\d+)$")


def parse_unit(model, spec) -> Unit:
    """A unit from a label (``"head.3.1"``), a :class:`Unit`, or a tuple (``("head", 3, 1)``)."""
    if isinstance(spec, Unit):
        return spec
    if isinstance(spec, str):
        m = _LABEL.match(spec.strip())
        if not m:
            raise StreamlensError(
                f"cannot read unit {spec!r}: write 'block.3', 'attn.3', 'mlp.3', 'head.3.1' or 'span.3:5'"
            )
        if m.group(1):
            return unit_of(model, m.group(1), int(m.group(2)))
        if m.group(3):
            return unit_of(model, "head", int(m.group(3)), int(m.group(4)))
        lo, hi = int(m.group(5)), int(m.group(6))
        return unit_of(model, "span", lo, width=hi - lo)
    if isinstance(spec, tuple) and spec and isinstance(spec[0], str):
        if spec[0] == "span" and len(spec) == 3:
            return unit_of(model, "span", spec[1], width=spec[2])
        return unit_of(model, *spec)
    raise StreamlensError(f"cannot read unit {spec!r}: use a label like 'head.3.1' or a tuple like ('head', 3, 1)")


def combine(units: Sequence[Unit]) -> Unit:
    """Several units removed together, as one unit."""
    if not units:
        return Unit("none", "none", ())
    if len(units) == 1:
        return units[0]
    atoms = tuple(sorted({a for u in units for a in u.atoms}))
    return Unit("+".join(u.label for u in units), "set", atoms)


def all_units(model, kind: str, width: int | None = None) -> list[Unit]:
    """Every single unit of a kind, in layer (then head) order; spans of ``width`` at every start."""
    a = model.arch
    if kind == "head":
        return [unit_of(model, "head", l, h) for l in range(a.n_layers) for h in range(a.n_heads)]
    if kind == "span":
        unit_of(model, "span", 0, width=width)  # checks the width
        return [unit_of(model, "span", s, width=width) for s in range(a.n_layers - width + 1)]
    return [unit_of(model, kind, l) for l in range(a.n_layers)]


def check_mode(mode: str, unit: Unit) -> None:
    if mode not in MODES:
        raise StreamlensError(f"unknown mode {mode!r}; choose one of {MODES}")
    if mode == "drop-residual" and any(a.kind != "block" for a in unit.atoms):
        raise StreamlensError(
            f"mode 'drop-residual' removes a block's skip connection; it applies to blocks and spans, not {unit.label!r}"
        )


# ------------------------------------------------------------------------------- write points
def write_point(arch, atom: Atom) -> tuple[str, str]:
    """``(component, side)`` whose tensor is replaced to remove ``atom``."""
    if atom.kind == "block":
        return "block", "out"
    if atom.kind == "head":
        return "o", "in"
    lay, n = arch.layout, ("1" if atom.kind == "attn" else "2")
    if lay == "sandwich":
        return f"ln{n}_post", "out"
    if lay == "post":
        return f"ln{n}", "in"
    return atom.kind, "out"


def base_point(arch, atom: Atom) -> tuple[str, str] | None:
    """Where the stream that the write is added to can be read (None: the write is replaced outright)."""
    if atom.kind == "block":
        return "block", "in"
    if arch.layout == "post" and atom.kind in ("attn", "mlp"):
        return ("block", "in") if atom.kind == "attn" else ("ln1", "out")
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
    if mean.dim() == 1:
        return mean.to(t.dtype).expand_as(t).clone()
    m = mean[:n_pos].to(t.dtype)  # (p, d)
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
        if atom.kind == "block" and mode == "drop-residual" and arch.layout == "post":
            # post-norm: the skip connections sit inside the norms, ln1(x + attn(x)) and
            # ln2(h + mlp(h)); without them the block computes ln2(mlp(h')) with h' = ln1(attn(x)).
            atoms += [Atom("attn", atom.layer), Atom("mlp", atom.layer)]
        else:
            atoms.append(atom)
    for atom in atoms:
        if atom.kind == "head":
            heads.setdefault(atom.layer, []).append(atom.head)
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
    return out


def mean_writes(model, batches, over: str = "position") -> dict:
    """The mean write of every atom over the non-padding tokens of ``batches`` (one extra clean pass).

    Keys are :class:`Atom` s (``block``/``attn``/``mlp``) and ``Atom("attn_z", l)`` for the heads'
    ``z`` of layer ``l``; values ``(pos, d)`` (``over="position"``: mean over documents at each
    position) or ``(d,)`` (``over="all"``).
    """
    arch, bridge = model.arch, model.bridge
    sums: dict = {}
    counts: dict = {}
    for batch in batches:
        b, p = batch.input_ids.shape
        raw: dict = {}
        pts = []
        for l in range(arch.n_layers):
            keys = {("block", "in"), ("block", "out"), ("o", "in")}
            for kind in ("attn", "mlp"):
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
        mask = batch.mask.to(model.device).double()[..., None]  # (b, p, 1)
        for l in range(arch.n_layers):
            writes = {Atom("block", l): raw[(l, "block", "out")] - raw[(l, "block", "in")]}
            for kind in ("attn", "mlp"):
                w = raw.get((l, *write_point(arch, Atom(kind, l))))
                bp = base_point(arch, Atom(kind, l))
                if w is not None:
                    writes[Atom(kind, l)] = w if bp is None else w - raw[(l, *bp)]
            if (l, "o", "in") in raw:
                writes[Atom("attn_z", l)] = raw[(l, "o", "in")]
            for atom, w in writes.items():
                s = (w * mask).sum(0)  # (p, d)
                c = mask.sum(0)  # (p, 1)
                if atom in sums:
                    n = max(sums[atom].shape[0], p)
                    sums[atom] = _pad_rows(sums[atom], n) + _pad_rows(s, n)
                    counts[atom] = _pad_rows(counts[atom], n) + _pad_rows(c, n)
                else:
                    sums[atom], counts[atom] = s, c
    if over == "all":
        return {a: (s.sum(0) / counts[a].sum()).float() for a, s in sums.items()}
    return {a: (s / counts[a].clamp_min(1)).float() for a, s in sums.items()}


def _pad_rows(x: Tensor, n: int) -> Tensor:
    return x if x.shape[0] == n else torch.cat([x, x.new_zeros(n - x.shape[0], *x.shape[1:])])
