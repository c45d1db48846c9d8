"""The architecture facts streamlens derives from the model itself: measured, not looked up.

At load time one short probe input runs through the model with every raw hook point recorded, and
streamlens checks, on the model's own numbers:

* which norm each norm module computes (:func:`streamlens.model.norms.identify_norm`);
* which update rule every block follows: the first layout of :data:`streamlens.model.layouts.LAYOUTS`
  whose points exist and whose equations hold (relative error ≤ 1e-4), every sub-layer reading the
  stream the layout says it reads;
* whether the first block's input is exactly the token (+ positional) embedding, whether the final
  norm reads the last block's output, and whether the logits are exactly ``unembed(ln_final(x))``.

A model that fits no layout is refused with each layout's error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from streamlens.errors import UnsupportedModelError
from streamlens.model import hooks, layouts
from streamlens.model.checks import check_causal, check_residual_shape, check_stack, relative_error
from streamlens.model.layouts import SUBLAYERS, Layout
from streamlens.model.norms import NormKind, identify_norm
from streamlens.model.writers import (PLACED, co_writer_candidates, measured_scales, stream_scale,
                                      true_write_candidates)

if TYPE_CHECKING:
    from streamlens.model.loading import Model

_TOL = 1e-4


@dataclass(frozen=True)
class Architecture:
    """Facts about a model, derived from its modules and checked on a probe input."""

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int | None
    d_vocab: int
    n_ctx: int
    norm: NormKind
    layout: str
    positional: str
    has_pos_embed: bool
    embed_is_sum: bool
    final_norm: NormKind | None
    final_reads_last_resid: bool
    logits_are_unembed: bool
    unembed_bias: bool
    causal: bool

    #: Measured adjustments of the rule: true write points ``(slot, component, side)`` and the residual multiplier.
    true_writes: tuple[tuple[str, str, str], ...] = ()
    write_scale: float = 1.0
    #: Writers beside the token mixer sharing its read (Falcon-H1: ``("mamba",)``), and per-writer multipliers
    #: ``((writer, r), ...)`` where writers are scaled differently (Falcon-H1's attention and SSM out-multipliers).
    co_writers: tuple[str, ...] = ()
    writer_scales: tuple[tuple[str, float], ...] = ()
    #: Per block, the scale of the whole stream at its end (Gemma 4's ``layer_scalar``; () where there is none).
    stream_scales: tuple[float, ...] = ()
    #: The writers of each block in the order they write, in the bridge's names: the token mixer, its
    #: co-writers, the channel mixer: ``(("attn", "mlp"), ("mixer", "mlp"), ("attn", "mamba", "mlp"), ...)``.
    writers: tuple[tuple[str, ...], ...] = ()
    #: The model's own final transform of ``z = unembed(ln_final(x))``: ``logits = cap · tanh(scale · z / cap)``
    #: (no cap: ``scale · z``). Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``; Gemma 2's soft-cap.
    logit_scale: float = 1.0
    logit_softcap: float | None = None
    #: Why the logits are not a known transform of ``unembed(ln_final(x))`` ('' when they are).
    readout_problem: str = ""

    @property
    def readout(self) -> str:
        """The readout in words: ``unembed``, ``0.5 · unembed``, ``softcap(30) of unembed``."""
        z = "unembed" if self.logit_scale == 1.0 else f"{self.logit_scale:g} · unembed"
        return z if self.logit_softcap is None else f"softcap({self.logit_softcap:g}) of {z}"

    def final_transform(self, z: Tensor) -> Tensor:
        """The model's own map from ``unembed(ln_final(x))`` to its logits (scale, then soft-cap)."""
        return self.soft_cap(z * self.logit_scale if self.logit_scale != 1.0 else z)

    def soft_cap(self, z: Tensor) -> Tensor:
        """The final soft-cap alone, ``cap · tanh(z / cap)`` (the identity without one)."""
        return z if self.logit_softcap is None else torch.tanh(z / self.logit_softcap) * self.logit_softcap

    #: Per-block layout names where blocks follow different additive rules (``layout`` is then ``"a+b"``).
    block_layouts: tuple[str, ...] = ()

    def rule_of(self, layer: int) -> Layout:
        """Block ``layer``'s :class:`~streamlens.model.layouts.Layout` (with the measured adjustments)."""
        name = self.block_layouts[layer] if self.block_layouts else self.layout
        rule = layouts.get(name).adjusted({s: (c, side) for s, c, side in self.true_writes}, self.write_scale,
                                          self.co_writers, dict(self.writer_scales))
        return rule.with_stream_scale(self.stream_scales[layer]) if self.stream_scales else rule

    def reach(self, layer: int | None) -> float:
        """What a write of block ``layer`` (None: the embedding) is multiplied by on its way to the final residual:
        the product of the stream scales of that block and every later one (1 without stream scales)."""
        out = 1.0
        for s in self.stream_scales[0 if layer is None else layer:]:
            out *= s
        return out

    @property
    def rule(self) -> Layout:
        """The model's :class:`~streamlens.model.layouts.Layout` (a :class:`~streamlens.model.layouts.Mixed`
        one where blocks differ: ask :meth:`rule_of` per block)."""
        if self.block_layouts:
            return layouts.Mixed([self.rule_of(l) for l in range(self.n_layers)])
        return self.rule_of(0)

    @property
    def parallel(self) -> bool:
        """Attention and MLP read the same input (GPT-J, GPT-NeoX/Pythia)."""
        return self.rule.mlp_reads() == "resid_pre"

    @property
    def norm_placement(self) -> str:
        """``"pre"`` (norm on each sub-layer's read) or ``"post"`` (norm after the residual sum)."""
        return "pre" if self.rule.additive else "post"

    @property
    def extra_norms(self) -> bool:
        """An extra norm on each sub-layer's write (Gemma 2's ``post_attention_layernorm``)."""
        return self.rule.write_norm("attn") is not None

    @property
    def has_resid_mid(self) -> bool:
        return self.rule.has_resid_mid

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(parallel=self.parallel, norm_placement=self.norm_placement, extra_norms=self.extra_norms)
        return d


#: Every raw point some layout reads (Gemma 4's per-layer-input write beyond the common block points).
_LAYOUT_POINTS = tuple(sorted(set().union(*(lay.points(SUBLAYERS, True) for lay in layouts.LAYOUTS))))


def _record_all(model: Model, ids: Tensor, mask: Tensor) -> tuple[dict, Tensor]:
    """Every raw block and global point of one forward, by ``(layer or None, component, side)``."""
    rec: dict[tuple, Tensor] = {}
    attach = []
    shape = tuple(ids.shape)

    def keep(key):
        return lambda t: rec.__setitem__(key, hooks.select_positions_of(t, shape, None, None, all_positions=True).clone())

    for layer in range(len(model.bridge.blocks)):
        unplaced = tuple((n, side) for n, m in model.bridge.blocks[layer].named_children()
                         if hasattr(m, "hook_out") and not n.startswith("_") and n not in PLACED for side in ("in", "out"))
        for comp, side in dict.fromkeys(hooks.BLOCK_POINTS + tuple(true_write_candidates(model.bridge, layer).values())
                                        + unplaced + _LAYOUT_POINTS):
            hp = hooks.block_point(model.bridge, layer, comp, side)
            if hp is not None:
                attach.append((hp, keep((layer, comp, side))))
    for comp, side in hooks.GLOBAL_POINTS:
        hp = hooks.global_point(model.bridge, comp, side)
        if hp is not None:
            attach.append((hp, keep((None, comp, side))))
    with torch.no_grad(), hooks.attached(attach):
        logits = model.run(ids, mask)
    return rec, logits


def layout_errors(model: Model, layer: int, raw: dict, has_ln2: bool) -> dict[Layout, float]:
    """Each applicable layout's worst relative error on ``layer``'s recorded points (its equations and reads).

    Each layout is tried plain and with the measured adjustments the model offers (the bridge's true
    write points, the config's residual multiplier); keys are the (adjusted) layouts, in the order tried.
    """
    errs: dict[Layout, float] = {}
    true = true_write_candidates(model.bridge, layer)
    r = getattr(getattr(model.hf, "config", None), "residual_multiplier", None)
    scales = [1.0] + ([float(r)] if isinstance(r, (int, float)) and float(r) not in (0.0, 1.0) else [])
    co = co_writer_candidates(model, layer, raw)
    for base in layouts.LAYOUTS:
        tries = [base.adjusted(tw, sc) for tw in ({}, true) for sc in scales]
        if co and isinstance(base, (layouts.PreNorm, layouts.Parallel)):
            tries += [base.adjusted(tw, 1.0, co, measured_scales(model, base, raw, co)) for tw in ({}, true)]
        if base.name == "sandwich_ple" and all(p in raw for p in base.points(SUBLAYERS, has_ln2)):
            tries = [stream_scale(model, layer, lay, raw) for lay in tries]
        for lay in dict.fromkeys(tries):
            need = lay.points(SUBLAYERS, has_ln2) | set(lay.read_points(has_ln2).values())
            need |= {lay.raw_write_point(sub) for sub in lay.slots}  # a true write replaces a point the rule has
            if any(p not in raw for p in need) or any(p in raw for p in lay.absent):
                continue
            norms = {comp: model.block_norms.get((layer, comp)) for comp in ("ln1", "ln2")}
            if not lay.additive and None in norms.values():
                continue
            named = lay.named(raw, SUBLAYERS, has_ln2)
            worst = [relative_error(predicted, recorded) for _, recorded, predicted in lay.equations(named, norms.get)]
            worst += [relative_error(raw[p], named[read]) for read, p in lay.read_points(has_ln2).items()]
            errs[lay] = max(worst)
    return errs


def _no_points(model: Model, layer: int) -> str:
    """Why a block offers nothing to check: the sub-layers the bridge exposes in it."""
    parts = [n for n, m in model.bridge.blocks[layer].named_children() if hasattr(m, "hook_out") and not n.startswith("_")]
    if not parts:
        return f"the bridge exposes no sub-layers inside block {layer} (it wraps the block whole), so its writes cannot be read"
    return f"block {layer} exposes {', '.join(parts)}, which fit no known rule"


def _unplaced(model: Model, layer: int, raw: dict) -> str:
    """The part of a block that keeps it from fitting a rule, in words (or '')."""
    if ("block", "out") not in raw:
        return f": the bridge never calls block {layer}'s output hook, so its output cannot be read"
    parts = [n for n, m in model.bridge.blocks[layer].named_children()
             if hasattr(m, "hook_out") and not n.startswith("_") and n not in PLACED]
    if parts:
        return (f": block {layer} also has {', '.join(parts)}, which no rule places (a third writer, an input "
                "transform or a scale of the stream)")
    return ""


def _readout(model: Model, final_out, unembed_in, unembed_out, logits) -> tuple[float, float | None, str]:
    """``(logit_scale, logit_softcap, problem)``: how the logits follow from ``z = unembed(ln_final(x))``.

    Checked in order on the probe's numbers: the config's final soft-cap (``final_logit_softcapping`` or
    ``logits_soft_cap``), then ``logits = z``, then ``logits = s · z`` with one positive ``s`` measured by least squares.
    """
    if unembed_out is None:
        return 1.0, None, "the model has no unembedding the bridge can hook"
    if final_out is not None and unembed_in is not None and relative_error(unembed_in, final_out) > _TOL:
        ends = (getattr(model.bridge, "unembed", None), getattr(model.bridge, "ln_final", None))
        head = [n for n, m in model.hf.named_children()
                if hasattr(m, "hook_out") and all(m is not e for e in ends) and not isinstance(m, nn.ModuleList)
                and n not in ("model", "transformer", "embed_tokens")]
        return 1.0, None, (f"a prediction head ({', '.join(head) or 'a module'}) sits between the final norm and the "
                           "unembedding, so the logits are not linear in the final norm's output")
    z, logits = unembed_out.float(), logits.float()
    cfg = getattr(model.hf, "config", None)
    # the final soft-cap under either config name (Gemma 2's final_logit_softcapping, RecurrentGemma's logits_soft_cap)
    cap = next((v for k in ("final_logit_softcapping", "logits_soft_cap")
                if isinstance(v := getattr(cfg, k, None), (int, float))), None) if cfg is not None else None
    scale = float((logits * z).sum() / (z * z).sum().clamp_min(1e-30))
    if isinstance(cap, (int, float)) and cap > 0:
        capped = torch.tanh(z / cap) * cap
        if relative_error(capped, logits) <= _TOL:
            return 1.0, float(cap), ""
    if relative_error(z, logits) <= _TOL:
        return 1.0, None, ""
    if scale > 0 and relative_error(z * scale, logits) <= _TOL:
        for known in ("logit_scale", "lm_head_multiplier"):  # prefer the config's exact value where it is the one measured
            v = getattr(cfg, known, None)
            if isinstance(v, (int, float)) and abs(v - scale) <= 1e-4 * abs(v):
                scale = float(v)
        v = getattr(cfg, "logits_scaling", None)
        if isinstance(v, (int, float)) and v and abs(1 / v - scale) <= 1e-4 / abs(v):
            scale = 1.0 / float(v)
        return scale, None, ""
    return 1.0, None, ("the logits are no soft-cap or positive scale of unembed(ln_final(x)) "
                       f"(relative error of the best scale: {relative_error(z * scale, logits):.1e})")


def probe(model: Model) -> Architecture:
    """Measure ``model``'s :class:`Architecture` (and fill ``model.block_norms`` / ``model.final_norm``)."""
    check_stack(model)
    bridge, cfg = model.bridge, model.bridge.cfg
    n_layers = len(bridge.blocks)
    d_model = int(cfg.d_model)
    d_vocab = int(getattr(cfg, "d_vocab_out", None) or cfg.d_vocab)
    n_ctx = int(cfg.n_ctx)

    # Norms: identified by running them.
    kinds = set()
    for layer in range(n_layers):
        for comp in ("ln1", "ln2", "ln1_post", "ln2_post"):
            c = hooks.block_component(bridge, layer, comp)
            if c is not None:
                spec = identify_norm(getattr(c, "original_component", c), d_model, where=f"blocks.{layer}.{comp}")
                model.block_norms[(layer, comp)] = spec
                kinds.add(spec.kind)
    if not kinds:
        raise UnsupportedModelError(f"{model.name}: no normalisation layers found in its blocks ({_no_points(model, 0)})")
    if len(kinds - {"identity"}) > 1:  # a block without a norm (ModernBERT's first) mixes with any kind
        raise UnsupportedModelError(f"{model.name}: blocks mix norm kinds {sorted(kinds)}")
    ln_final = getattr(bridge, "ln_final", None)
    if ln_final is not None:
        model.final_norm = identify_norm(ln_final.original_component, d_model, where="ln_final")

    # One short probe input through the model, every raw point recorded.
    n = min(6, n_ctx)
    ids = (torch.arange(n) * 7 + 3)[None] % d_vocab
    try:
        rec, logits = _record_all(model, ids, torch.ones_like(ids, dtype=torch.bool))
    except torch.OutOfMemoryError:  # a RuntimeError, but the machine's fault, not the model's: never a refusal
        raise
    except (RuntimeError, AttributeError, TypeError, ValueError, IndexError) as e:
        # MemoryError, KeyboardInterrupt and anything else not listed propagate unchanged.
        raise UnsupportedModelError(
            f"{model.name}: the TransformerBridge cannot run this model's forward pass "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
        ) from e
    check_residual_shape(model, rec, tuple(ids.shape), d_model)
    if str(getattr(cfg, "attention_dir", "causal")) == "causal":
        check_causal(model, ids, logits)

    def pt(layer, comp, side):
        return rec.get((layer, comp, side))

    has_ln2 = hooks.block_component(bridge, 0, "ln2") is not None
    found = []
    for layer in range(n_layers):
        raw = {(comp, side): t for (l, comp, side), t in rec.items() if l == layer}
        errs = layout_errors(model, layer, raw, has_ln2)
        ok = [k for k, v in errs.items() if v <= _TOL]
        if not ok:
            plain = {k.name: v for k, v in errs.items() if not k.adjustments}
            detail = "; ".join(f"{k}: {v:.1e}" for k, v in plain.items()) or _no_points(model, layer)
            raise UnsupportedModelError(
                f"{model.name}: block {layer} follows none of the update rules streamlens knows "
                f"({', '.join(lay.name for lay in layouts.LAYOUTS)}){_unplaced(model, layer, raw)}; "
                f"relative error of each: {detail}"
            )
        found.append(ok[0])
    scales = tuple(lay.stream_scale for lay in found)
    found = [lay.with_stream_scale(1.0) for lay in found]  # the rule per block, apart from its own stream scale
    mixed = len(set(found)) > 1
    if mixed and (not all(lay.additive for lay in found)
                  or len({(tuple(sorted(lay.true_writes.items())), lay.scale, lay.co_writers,
                           tuple(sorted(lay.scales.items()))) for lay in found}) > 1):
        names = [f"{lay.name}" + (f" ({lay.adjustments})" if lay.adjustments else "") for lay in found]
        raise UnsupportedModelError(f"{model.name}: blocks follow different update rules: {names}")
    rule = found[0]

    embed, pos = pt(None, "embed", "out"), pt(None, "pos_embed", "out")
    first = pt(0, "block", "in")
    embed_is_sum = embed is not None and first is not None and relative_error(embed + (pos if pos is not None else 0), first) <= _TOL
    last_out, final_in = pt(n_layers - 1, "block", "out"), pt(None, "ln_final", "in")
    final_reads = last_out is not None and final_in is not None and relative_error(final_in, last_out) <= _TOL
    logit_scale, logit_softcap, readout_problem = _readout(model, pt(None, "ln_final", "out"), pt(None, "unembed", "in"),
                                                            pt(None, "unembed", "out"), logits)
    logits_are_unembed = not readout_problem
    w, b = model.unembed_weight()

    n_heads = int(cfg.n_heads)
    return Architecture(
        name=type(model.hf).__name__,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(getattr(cfg, "n_key_value_heads", None) or n_heads),
        d_model=d_model,
        d_head=int(cfg.d_head),
        d_mlp=int(cfg.d_mlp) if getattr(cfg, "d_mlp", None) else None,
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        norm=min(kinds - {"identity"} or kinds),
        layout="+".join(dict.fromkeys(lay.name for lay in found)),
        block_layouts=tuple(lay.name for lay in found) if mixed else (),
        true_writes=tuple((sub, *p) for sub, p in sorted(rule.true_writes.items())),
        write_scale=rule.scale,
        co_writers=rule.co_writers,
        stream_scales=scales if any(s != 1.0 for s in scales) else (),
        writer_scales=tuple(sorted(rule.scales.items())),
        writers=tuple(tuple(hooks.writer_name(bridge, l, sub) or (sub if sub not in hooks.SLOTS else "-")
                            for sub in found[l].writers) for l in range(n_layers)),
        positional=str(getattr(cfg, "positional_embedding_type", "unknown")),
        has_pos_embed=pos is not None,
        embed_is_sum=embed_is_sum,
        final_norm=model.final_norm.kind if model.final_norm else None,
        final_reads_last_resid=final_reads,
        logits_are_unembed=logits_are_unembed,
        logit_scale=logit_scale,
        logit_softcap=logit_softcap,
        readout_problem=readout_problem,
        # The bridge gives a bias-free lm_head an all-zero bias *buffer*; only a learned one counts.
        unembed_bias=b is not None and (isinstance(model.bridge.unembed.original_component.bias, nn.Parameter)
                                        or bool(b.abs().max() > 0)),
        causal=str(getattr(cfg, "attention_dir", "causal")) == "causal",
    )
