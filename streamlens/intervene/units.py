"""Units that can be removed from the residual stream: the unit grammar.

A *unit* is a block, a sub-layer (``attn``/``mlp``), one attention head, one routed expert of a
mixture of experts, or a span of consecutive blocks. Labels: ``"block.3"``, ``"attn.3"``, ``"mlp.3"``,
``"head.3.1"`` (layer 3, head 1), ``"expert.3.5"`` (layer 3, expert 5), ``"span.3:5"`` (blocks 3 and 4);
in SSM, linear-attention and convolution blocks the token mixer is ``"mixer.3"``, ``"linear_attn.3"`` or
``"conv.3"`` (the bridge's names; ``unit="attn"`` sweeps every block's token mixer); a writer beside the
token mixer is named as the bridge names it (Falcon-H1's ``"mamba.3"``: ``unit="mamba"``), Gemma 4's
per-layer-input write after the MLP is ``"ple.3"``. Several units
removed together form a *set* (:func:`combine`).
What removing a unit means, per mode, is in :mod:`streamlens.intervene.removal`.

    >>> parse_unit(model, "head.1.0").atoms
    (Atom(kind='head', layer=1, head=0),)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from streamlens.errors import StreamlensError
from streamlens.model import hooks
from streamlens.model.experts import moe_layers, n_experts

KINDS = ("block", "attn", "mlp", "head", "span", "expert", "mamba", "ple")
#: Removal modes (see :mod:`streamlens.intervene.removal`).
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
    if kind not in KINDS + _MIXERS + _EXTRA_WRITERS:
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
    if kind == "expert":  # one routed expert of a mixture-of-experts block: ``head`` is the expert's index
        n = n_experts(model, layer)
        if not isinstance(head, int) or not 0 <= head < n:
            raise StreamlensError(f"expert {head!r} does not exist: block {layer} has "
                                  + (f"{n} routed experts (0..{n - 1})" if n else "no mixture of experts"))
        return Unit(f"expert.{layer}.{head}", "expert", (Atom("expert", layer, head),), layer=layer, head=head)
    if kind == "head":
        if not isinstance(head, int) or not 0 <= head < a.n_heads:
            raise StreamlensError(f"head {head!r} does not exist: layer {layer} has {a.n_heads} heads (0..{a.n_heads - 1})")
        return Unit(f"head.{layer}.{head}", "head", (Atom("head", layer, head),), layer=layer, head=head)
    if kind in _EXTRA_WRITERS:  # a writer beside the token mixer (Falcon-H1's mamba) or after the MLP (Gemma 4)
        if kind not in a.rule_of(layer).writers:
            raise StreamlensError(f"block {layer} has no {kind!r} writer: its writers are {list(_writers(model, layer))}")
        return Unit(f"{kind}.{layer}", kind, (Atom(kind, layer),), layer=layer)
    if kind in _MIXERS:  # the token-mixer slot, named as the bridge names it in this block
        actual = hooks.writer_name(model.bridge, layer, "attn")
        if actual != kind:
            raise StreamlensError(f"block {layer}'s token mixer is {actual!r}, not {kind!r}: write '{actual}.{layer}'")
        kind = "attn"
    label = hooks.writer_name(model.bridge, layer, "attn") if kind == "attn" else kind
    return Unit(f"{label or kind}.{layer}", kind, (Atom(kind, layer),), layer=layer)


_MIXERS = ("mixer", "linear_attn", "conv")
#: Writers beyond the two slots: beside the token mixer sharing its read (Falcon-H1's mamba), after the MLP (Gemma 4).
_EXTRA_WRITERS = ("mamba", "ple")
_LABEL = re.compile(r"^(block|attn|mlp|mixer|linear_attn|conv|mamba|ple)\.(-?\d+)$|^(head|expert)\.(-?\d+)\.(\d+)$|^span\.(\d+):(\d+)$")


def parse_unit(model, spec) -> Unit:
    """A unit from a label (``"head.3.1"``), a :class:`Unit`, or a tuple (``("head", 3, 1)``)."""
    if isinstance(spec, Unit):
        return spec
    if isinstance(spec, str):
        m = _LABEL.match(spec.strip())
        if not m:
            raise StreamlensError(
                f"cannot read unit {spec!r}: write 'block.3', 'attn.3', 'mlp.3', 'head.3.1', 'expert.3.5' or 'span.3:5'"
            )
        if m.group(1):
            return unit_of(model, m.group(1), int(m.group(2)))
        if m.group(3):
            return unit_of(model, m.group(3), int(m.group(4)), int(m.group(5)))
        lo, hi = int(m.group(6)), int(m.group(7))
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
    if kind == "span":
        unit_of(model, "span", 0, width=width)  # checks the width
        return [unit_of(model, "span", s, width=width) for s in range(a.n_layers - width + 1)]
    if kind == "block":
        return [unit_of(model, kind, l) for l in range(a.n_layers)]
    # Hybrid models: heads only in attention blocks, a sub-layer only where its slot is filled.
    if kind == "head":
        layers = [l for l in range(a.n_layers) if hooks.block_point(model.bridge, l, "o", "in") is not None]
        units = [unit_of(model, "head", l, h) for l in layers for h in range(a.n_heads)]
    elif kind == "expert":
        units = [unit_of(model, "expert", l, e) for l in moe_layers(model) for e in range(n_experts(model, l))]
    else:
        units = [unit_of(model, kind, l) for l in range(a.n_layers)
                 if kind in _EXTRA_WRITERS and kind in a.rule_of(l).writers
                 or kind in a.rule_of(l).slots and hooks.writer_name(model.bridge, l, kind) is not None]
    if not units:
        raise StreamlensError(f"{model.name} has no {kind} units: its blocks' writers are "
                              f"{sorted({w for ws in a.writers for w in ws if w != '-'})}")
    return units


def _writers(model, layer: int) -> tuple[str, ...]:
    a = model.arch
    return tuple(w for w in a.writers[layer] if w != "-") if a.writers else ("attn", "mlp")


def check_mode(mode: str, unit: Unit) -> None:
    """Refuse an unknown mode, or drop-residual on anything but blocks."""
    if mode not in MODES:
        raise StreamlensError(f"unknown mode {mode!r}; choose one of {MODES}")
    if mode == "drop-residual" and any(a.kind == "expert" for a in unit.atoms):
        raise StreamlensError(f"an expert has no skip connection of its own: modes 'skip' (its routing weight zeroed) "
                              f"and 'mean' (its share replaced by its mean share), not {mode!r}")
    if mode == "drop-residual" and any(a.kind != "block" for a in unit.atoms):
        raise StreamlensError(
            f"mode 'drop-residual' removes a block's skip connection; it applies to blocks and spans, not {unit.label!r}"
        )




def parse_heads(model, heads) -> list[tuple[int, int]]:
    """Attention heads from ``"head.1.2"``, ``(1, 2)`` or a list of them: checked ``(layer, head)`` pairs."""
    if isinstance(heads, (str, Unit)) or (isinstance(heads, tuple) and heads and not isinstance(heads[0], tuple)):
        heads = [heads]
    out = []
    for spec in heads:
        if isinstance(spec, tuple) and spec and not isinstance(spec[0], str):
            spec = ("head", *spec)
        unit = parse_unit(model, spec)
        if unit.kind != "head":
            raise StreamlensError(f"{spec!r} is not an attention head: write 'head.LAYER.HEAD' or (LAYER, HEAD)")
        out.append((unit.layer, unit.head))
    return out
