"""Layouts: where a block reads and writes the residual stream, and its update rule, stated once each.

A block's *layout* is its update rule. nanoGPT states the pre-norm one in two lines::

    x = x + self.attn(self.ln_1(x))     # resid_mid  = resid_pre + attn_out
    x = x + self.mlp(self.ln_2(x))      # resid_post = resid_mid + mlp_out

Each class below states one rule and the raw hook points (``(component, side)`` of the bridge's
block, see :mod:`streamlens.model.hooks`) where its reads and writes can be seen. Everything that
depends on the rule asks the layout: the probe that detects it (:mod:`streamlens.model.probe`), the
names the capture engine hands out (:mod:`streamlens.stream.engine`), the closure check
(:meth:`streamlens.ResidualTrace.closure_error`), the removal hooks (:mod:`streamlens.intervene.removal`)
and the gradient split (:mod:`streamlens.depth.gradients`). Adding a layout is one class here, added
to :data:`LAYOUTS`, plus its tests.

=================  =======================================================================================
layout             rule
=================  =======================================================================================
``pre``            ``resid_mid = resid_pre + attn(ln1(resid_pre))``; ``resid_post = resid_mid + mlp(ln2(resid_mid))``
``parallel``       ``resid_post = resid_pre + attn(ln1(resid_pre)) + mlp(ln2(resid_pre))``  (GPT-J, GPT-NeoX)
``sandwich``       ``pre`` with an extra norm on each write: ``attn_out = ln1_post(attn(...))``  (Gemma 2)
``post``           ``resid_mid = ln1(resid_pre + attn(resid_pre))``; ``resid_post = ln2(resid_mid + mlp(resid_mid))``
``post_sub``       ``resid_mid = resid_pre + ln1_post(attn(resid_pre))``; ``resid_post = resid_mid + ln2_post(mlp(...))``
                   (the norm after the sub-layer, none before it: OLMo 2/3, FlexOlmo, EXAONE 4)
``single``         ``resid_post = resid_pre + mixer(norm(resid_pre))``: one writer per block (Mamba, Nemotron-H)
``single_shared``  ``resid_post = resid_pre + mixer(norm(resid_pre + t))``, ``t`` read but not written (Zamba 2's
                   hybrid blocks: ``t`` from the shared transformer)
``sandwich_ple``   ``sandwich``, then a per-layer-input write and a scale of the whole stream (Gemma 4):
                   ``ple_read = resid_mid + mlp_out``; ``resid_post = s · (ple_read + ple_out)``
=================  =======================================================================================

A block is a set of writers in two *slots* (:data:`streamlens.model.hooks.SLOTS`): ``attn`` is the
token mixer (attention, or the bridge's ``mixer`` / ``linear_attn`` / ``conv``) and ``mlp`` the channel
mixer (MLP or mixture of experts); every rule holds whatever fills them (Jamba, LFM2, Qwen3-Next follow
``pre``). The token mixer may have *co-writers* sharing its read (Falcon-H1's ``mamba`` beside attention:
``mamba_out``; the token-mixer write is then ``attn_out + mamba_out``). Measured adjustments of any rule
(:meth:`Layout.adjusted`), kept only where the equations then hold on the model's own numbers:

* *true writes*: a point inside a slot the bridge's hook aliases name as its write (Bloom's ``attn.o``,
  MPT's ``mlp.out``, whose sub-module outputs already include the residual);
* *scaled writes*: ``x + r · f(x)``, one ``r`` for all writers (Granite's ``residual_multiplier``) or one
  per writer (Falcon-H1's attention and SSM out-multipliers, applied after the output hook);
* *co-writers*, above; and a *stream scale* at the end of the block (Gemma 4's ``layer_scalar``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

from torch import Tensor

Point = tuple[str, str]
#: The sub-layers (writers) of a block, in the order they write.
SUBLAYERS = ("attn", "mlp")
_NORM = {"attn": "ln1", "mlp": "ln2"}


class Layout:
    """One update rule: its read and write points, its named tensors and its equations.

    Subclasses declare where things are; the methods below are shared. ``has_ln2`` is False for
    models whose two sub-layers share one input norm (GPT-J).
    """

    name: ClassVar[str]
    rule: ClassVar[str]
    #: ``resid_post = resid_pre + Σ writes``: False where the skip connections pass through norms (post-norm).
    additive: ClassVar[bool] = True
    #: Points that must be absent for this layout to apply (an extra norm rules out the plain rule).
    absent: ClassVar[tuple[Point, ...]] = (("ln1_post", "out"),)

    #: The slots this rule has (single-writer blocks have only the token mixer).
    slots: ClassVar[tuple[str, ...]] = SUBLAYERS
    #: Measured adjustments (see :meth:`adjusted`): true write points per slot, and the residual multiplier.
    true_writes: Mapping[str, Point] = {}
    scale: float = 1.0
    #: Writers beside the token mixer that share its read (Falcon-H1's ``mamba``), and per-writer scales.
    co_writers: tuple[str, ...] = ()
    scales: Mapping[str, float] = {}
    #: A scale of the whole stream at the end of the block (Gemma 4's ``layer_scalar``; 1: none).
    stream_scale: float = 1.0

    @property
    def has_resid_mid(self) -> bool:
        return self.resid_mid_point is not None

    def adjusted(self, true_writes: Mapping[str, Point] | None = None, scale: float = 1.0,
                 co_writers: Sequence[str] = (), scales: Mapping[str, float] | None = None) -> Layout:
        """This rule with the writes read at ``true_writes`` (per slot) and multiplied by ``scale``, with
        ``co_writers`` beside the token mixer and per-writer ``scales`` (overriding ``scale``; 1 is dropped)."""
        scales = {w: float(v) for w, v in (scales or {}).items() if float(v) != 1.0}
        if not true_writes and scale == 1.0 and not co_writers and not scales:
            return self
        out = copy.copy(self)
        out.true_writes, out.scale = dict(true_writes or {}), float(scale)
        out.co_writers, out.scales = tuple(co_writers), scales
        return out

    def with_stream_scale(self, s: float) -> Layout:
        """This rule with the stream multiplied by ``s`` at the end of the block."""
        out = copy.copy(self) if float(s) != self.stream_scale else self
        out.stream_scale = float(s)
        return out

    def scale_of(self, writer: str) -> float:
        """The multiplier of ``writer``'s write (a slot or a co-writer): ``x + r · f(x)``."""
        return self.scales.get(writer, self.scale)

    @property
    def writers(self) -> tuple[str, ...]:
        """The writers of this rule, in the order they write: the token mixer, its co-writers, the channel mixer."""
        return (self.slots[0], *self.co_writers, *self.slots[1:])

    @property
    def adjustments(self) -> str:
        """The adjustments in words ('' for none)."""
        parts = [f"{sub} writes at {'.'.join(p[:1])}.hook_{p[1]}" for sub, p in self.true_writes.items()]
        parts += [f"{c} writes beside attn" for c in self.co_writers]
        if self.scale != 1.0:
            parts.append(f"writes scaled by {self.scale:g}")
        parts += [f"{w} writes scaled by {v:g}" for w, v in sorted(self.scales.items())]
        return "; ".join(parts)

    def mixer_write(self, named: Mapping[str, Tensor]) -> Tensor:
        """The token-mixer slot's whole write: ``attn_out`` plus every co-writer's write."""
        w = named["attn_out"]
        for c in self.co_writers:
            w = w + named[f"{c}_out"]
        return w

    @property
    def mixer_terms(self) -> str:
        """``attn_out`` (``attn_out + mamba_out`` with co-writers), for the equations' statements."""
        return " + ".join(["attn_out", *(f"{c}_out" for c in self.co_writers)])

    # ------------------------------------------------------------------ declarations
    resid_mid_point: ClassVar[Point | None] = ("ln2", "in")

    def write_point(self, sub: str) -> Point:
        """Where sub-layer ``sub``'s write into the stream can be read (and replaced)."""
        if sub in self.true_writes:
            return self.true_writes[sub]
        return self.raw_write_point(sub)

    def raw_write_point(self, sub: str) -> Point:
        """The write point of the plain rule (before any true-write adjustment)."""
        return sub, "out"

    def base_point(self, sub: str) -> Point | None:
        """Where the stream the raw point of :meth:`write_point` includes can be read (None: the raw point is the write)."""
        return None

    def write_norm(self, sub: str) -> str | None:
        """The extra norm a sub-layer's raw output passes through before it is written (sandwich only)."""
        return None

    def read_normed_point(self, sub: str, has_ln2: bool) -> Point | None:
        """Where the normalised read of ``sub`` can be seen (None: the sub-layer reads the stream unnormalised).

        With co-writers each token mixer's own input (Falcon-H1 multiplies attention's by ``attention_in_multiplier``)."""
        if self.co_writers and sub == "attn":
            return "attn", "in"
        return (_NORM[sub] if has_ln2 or sub == "attn" else "ln1"), "out"

    def mlp_reads(self) -> str:
        """The named point the MLP reads: ``resid_mid`` (sequential) or ``resid_pre`` (parallel)."""
        return "resid_mid"

    def equations(self, named: Mapping[str, Tensor], norm: Callable[[str], Callable[[Tensor], Tensor]]
                  ) -> list[tuple[str, Tensor, Tensor]]:
        """The update rule as ``(statement, got, want)`` triples over one layer's named tensors.

        ``norm(component)`` gives the block's norm ``component`` as a function (used by post-norm).
        """
        pre, post = named["resid_pre"], named["resid_post"]
        mid, attn, mlp = named["resid_mid"], self.mixer_write(named), named["mlp_out"]
        return [(f"resid_mid = resid_pre + {self.mixer_terms}", mid, pre + attn),
                ("resid_post = resid_mid + mlp_out", post, mid + mlp)]

    # ------------------------------------------------------------------ shared
    def points(self, sublayers: Sequence[str], has_ln2: bool) -> set[Point]:
        """The raw points one layer needs for the named tensors of ``sublayers``."""
        pts = {("block", "in"), ("block", "out")}
        if self.resid_mid_point is not None:
            pts.add(self.resid_mid_point)
        for sub in (s for s in sublayers if s in self.slots):
            pts.add(self.write_point(sub))
            if self.base_point(sub) is not None:
                pts.add(self.base_point(sub))
            if self.read_normed_point(sub, has_ln2) is not None:
                pts.add(self.read_normed_point(sub, has_ln2))
        if "attn" in sublayers:
            pts |= {(c, side) for c in self.co_writers for side in ("in", "out")}
        return pts

    def head_points(self) -> set[Point]:
        """Extra raw points for per-head writes: the output projection's input (and the raw output for an extra norm)."""
        return {("o", "in")} | ({("attn", "out")} if self.write_norm("attn") else set())

    def read_points(self, has_ln2: bool) -> dict[str, Point]:
        """Where each sub-layer's read enters its norm (checked by the probe against the named read)."""
        if self.read_normed_point("attn", has_ln2) is None:
            return {}
        return {"attn_read": ("ln1", "in"), "mlp_read": ((_NORM["mlp"] if has_ln2 else "ln1"), "in")}

    def write(self, raw: Mapping[Point, Tensor], sub: str) -> Tensor:
        """Sub-layer ``sub``'s write from the raw points."""
        w = raw[self.write_point(sub)]
        base = self.base_point(sub)
        w = w if base is None else w - raw[base]
        return w if self.scale_of(sub) == 1.0 else w * self.scale_of(sub)

    def named(self, raw: Mapping[Point, Tensor], sublayers: Sequence[str], has_ln2: bool) -> dict[str, Tensor]:
        """One layer's named tensors from its raw points (aliases share storage: ``attn_read`` is ``resid_pre``)."""
        out = {"resid_pre": raw[("block", "in")], "resid_post": raw[("block", "out")]}
        if self.resid_mid_point is not None:
            out["resid_mid"] = raw[self.resid_mid_point]
        reads = {"attn": out["resid_pre"], "mlp": out.get(self.mlp_reads())}
        for sub in (s for s in sublayers if s in self.slots):
            normed = self.read_normed_point(sub, has_ln2)
            out[f"{sub}_read"] = reads[sub]
            out[f"{sub}_read_normed"] = reads[sub] if normed is None else raw[normed]
            out[f"{sub}_out"] = self.write(raw, sub)
        for c in self.co_writers if "attn" in sublayers else ():  # they share the token mixer's read
            out[f"{c}_read"], out[f"{c}_read_normed"] = out["attn_read"], raw[(c, "in")]
            w = raw[(c, "out")]
            out[f"{c}_out"] = w if self.scale_of(c) == 1.0 else w * self.scale_of(c)
        return out

    def _key(self) -> tuple:
        return (self.name, tuple(sorted(self.true_writes.items())), self.scale, self.co_writers,
                tuple(sorted(self.scales.items())), self.stream_scale)

    def __eq__(self, other) -> bool:
        return isinstance(other, Layout) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        extra = f" ({self.adjustments})" if self.adjustments else ""
        return f"<layout {self.name}: {self.rule}{extra}>"


class PreNorm(Layout):
    name = "pre"
    rule = "resid_mid = resid_pre + attn(ln1(resid_pre)); resid_post = resid_mid + mlp(ln2(resid_mid))"


class Parallel(Layout):
    name = "parallel"
    rule = "resid_post = resid_pre + attn(ln1(resid_pre)) + mlp(ln2(resid_pre))"
    resid_mid_point = None

    def mlp_reads(self) -> str:
        return "resid_pre"

    def equations(self, named, norm):
        pre, post = named["resid_pre"], named["resid_post"]
        return [(f"resid_post = resid_pre + {self.mixer_terms} + mlp_out", post,
                 pre + self.mixer_write(named) + named["mlp_out"])]


class Sandwich(Layout):
    name = "sandwich"
    rule = "resid_mid = resid_pre + ln1_post(attn(ln1(resid_pre))); resid_post = resid_mid + ln2_post(mlp(ln2(resid_mid)))"
    absent = ()

    def raw_write_point(self, sub: str) -> Point:
        return f"{_NORM[sub]}_post", "out"

    def write_norm(self, sub: str) -> str | None:
        return f"{_NORM[sub]}_post"


class PostNorm(Layout):
    name = "post"
    rule = "resid_mid = ln1(resid_pre + attn(resid_pre)); resid_post = ln2(resid_mid + mlp(resid_mid))"
    additive = False
    resid_mid_point = ("ln1", "out")

    def raw_write_point(self, sub: str) -> Point:
        return _NORM[sub], "in"  # what enters the norm: the stream plus the write

    def base_point(self, sub: str) -> Point:
        return ("block", "in") if sub == "attn" else ("ln1", "out")

    def read_normed_point(self, sub: str, has_ln2: bool) -> Point | None:
        return None

    def equations(self, named, norm):
        pre, mid, post = named["resid_pre"], named["resid_mid"], named["resid_post"]
        return [("resid_mid = ln1(resid_pre + attn_out)", mid, norm("ln1")(pre.float() + named["attn_out"].float())),
                ("resid_post = ln2(resid_mid + mlp_out)", post, norm("ln2")(mid.float() + named["mlp_out"].float()))]


class PostSubLayerNorm(Sandwich):
    """The norm after each sub-layer and none before it: ``x + norm(f(x))`` (OLMo 2/3, FlexOlmo, EXAONE 4)."""

    name = "post_sub"
    rule = "resid_mid = resid_pre + ln1_post(attn(resid_pre)); resid_post = resid_mid + ln2_post(mlp(resid_mid))"
    absent = (("ln1", "out"), ("ln2", "out"))
    resid_mid_point = ("mlp", "in")

    def read_normed_point(self, sub: str, has_ln2: bool) -> Point | None:
        return None

    def read_points(self, has_ln2: bool) -> dict[str, Point]:
        return {"attn_read": ("attn", "in")}


class SingleWriter(Layout):
    """One writer per block, ``x + mixer(norm(x))`` (Mamba, Mamba 2, FalconMamba, Nemotron-H, Zamba 2's Mamba blocks)."""

    name = "single"
    rule = "resid_post = resid_pre + mixer(norm(resid_pre))"
    slots = ("attn",)
    absent = (("ln1_post", "out"), ("mlp", "out"), ("ln2", "in"))
    resid_mid_point = None

    def read_points(self, has_ln2: bool) -> dict[str, Point]:
        return {"attn_read": ("ln1", "in")}

    def equations(self, named, norm):
        pre, post = named["resid_pre"], named["resid_post"]
        return [("resid_post = resid_pre + attn_out", post, pre + named["attn_out"])]


class SharedRead(SingleWriter):
    """``single``, the mixer reading ``resid_pre + t`` (its ``attn_read``), ``t`` not written (Zamba 2's hybrids)."""

    name, rule = "single_shared", "resid_post = resid_pre + mixer(norm(resid_pre + t))"

    def read_points(self, has_ln2: bool) -> dict[str, Point]:
        return {}

    def points(self, sublayers: Sequence[str], has_ln2: bool) -> set[Point]:
        return super().points(sublayers, has_ln2) | {("ln1", "in")}

    def named(self, raw, sublayers, has_ln2):
        return {**super().named(raw, sublayers, has_ln2), **({"attn_read": raw[("ln1", "in")]} if "attn" in sublayers else {})}


class PerLayerInput(Sandwich):
    """Gemma 4: ``sandwich``, then a third writer and a scale of the whole stream at the end of the block::

        ple_read   = resid_mid + ln2_post(mlp(ln2(resid_mid)))
        ple_out    = post_per_layer_input_norm(per_layer_projection(act(per_layer_input_gate(ple_read)) ⊙ e_l))
        resid_post = s · (ple_read + ple_out)                  # s: the block's layer_scalar

    ``e_l`` is the token's per-layer input embedding for block ``l``. With ``s ≠ 1`` the final residual is
    not the plain sum of the writes: every write (and the embedding) reaches it multiplied by the product of
    the scales of its own and every later block, which the decomposition folds in
    (:mod:`streamlens.readout.writers`).
    """

    name = "sandwich_ple"
    rule = ("resid_mid = resid_pre + ln1_post(attn(ln1(resid_pre))); ple_read = resid_mid + ln2_post(mlp(ln2(resid_mid))); "
            "resid_post = s · (ple_read + ple(ple_read))")
    slots = ("attn", "mlp", "ple")
    _PLE = {"ple_read": ("per_layer_input_gate", "in"), "ple_out": ("post_per_layer_input_norm", "out")}

    def raw_write_point(self, sub: str) -> Point:
        return self._PLE["ple_out"] if sub == "ple" else super().raw_write_point(sub)

    def read_normed_point(self, sub: str, has_ln2: bool) -> Point | None:
        return None if sub == "ple" else super().read_normed_point(sub, has_ln2)

    def points(self, sublayers: Sequence[str], has_ln2: bool) -> set[Point]:
        return super().points([s for s in sublayers if s != "ple"], has_ln2) | set(self._PLE.values())

    def named(self, raw, sublayers, has_ln2):
        out = super().named(raw, [s for s in sublayers if s != "ple"], has_ln2)
        out["ple_read"] = out["ple_read_normed"] = raw[self._PLE["ple_read"]]
        out["ple_out"] = raw[self._PLE["ple_out"]]
        return out

    def equations(self, named, norm):
        pre, mid, late, post = named["resid_pre"], named["resid_mid"], named["ple_read"], named["resid_post"]
        return [("resid_mid = resid_pre + attn_out", mid, pre + named["attn_out"]),
                ("ple_read = resid_mid + mlp_out", late, mid + named["mlp_out"]),
                (f"resid_post = {self.stream_scale:g} · (ple_read + ple_out)", post,
                 (late + named["ple_out"]) * self.stream_scale)]


class Mixed:
    """Blocks that follow different additive rules (OLMo-Hybrid, Zamba 2). Model-wide questions are answered
    for all blocks; per-block ones go to ``Architecture.rule_of(layer)``."""

    additive = True

    def __init__(self, rules: Sequence[Layout]):
        self.rules = tuple(rules)
        self.name = "+".join(dict.fromkeys(r.name for r in self.rules))
        self.rule = "; ".join(dict.fromkeys(f"{r.name}: {r.rule}" for r in self.rules))
        self.slots = tuple(dict.fromkeys(s for r in self.rules for s in r.slots))
        self.adjustments = self.rules[0].adjustments
        self.has_resid_mid = all(r.has_resid_mid for r in self.rules)

    def write_norm(self, sub: str) -> str | None:
        return next((r.write_norm(sub) for r in self.rules if r.write_norm(sub)), None)

    def mlp_reads(self) -> str:
        return "resid_pre" if any(r.mlp_reads() == "resid_pre" for r in self.rules) else "resid_mid"

    def __repr__(self) -> str:
        return f"<layout {self.name}: per block>"


#: Every layout streamlens knows, in the order the probe tries them.
LAYOUTS: tuple[Layout, ...] = (Sandwich(), PreNorm(), Parallel(), PostNorm(), PostSubLayerNorm(), SingleWriter(),
                               PerLayerInput(), SharedRead())
_BY_NAME = {lay.name: lay for lay in LAYOUTS}


def get(name: str) -> Layout:
    """The layout called ``name``."""
    return _BY_NAME[name]
