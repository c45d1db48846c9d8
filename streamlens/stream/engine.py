"""The capture engine: run the model once and hand over each layer's named reads and writes as the layer ends.

Every verb that listens to the stream (``trace``, ``trace_stats``, ``decompose``, ``logit_lens``,
``dynamics``) runs the model through :func:`capture`. It attaches plain forward hooks at the raw
points the model's layout needs (:meth:`streamlens.model.layouts.Layout.points`), keeps only the
chosen positions, and when a block's output arrives it names the layer's tensors with the layout
(:meth:`~streamlens.model.layouts.Layout.named`) and calls ``on_layer(layer, named)`` at once, then
forgets them: a consumer that reduces as it goes holds one layer at a time.

Per-head writes (``heads=True``): ``head_out[..., h, :] = z_h W_O[h]`` and ``attn_bias_out = b_O``
from the output projection measured as an affine map (:mod:`streamlens.model.affine`), so that
``head_out.sum(head) + attn_bias_out == attn_out``. Where the layout passes the attention output
through an extra norm before writing it (Gemma 2), that norm at its scale on this input is affine
and is applied to each head (its bias goes with ``attn_bias_out``).

Example:
    >>> from streamlens.stream.inputs import encode
    >>> batch = encode(model, ["The cat sat"])
    >>> seen = []
    >>> logits = capture(model, batch, None, layers=[0, 1], on_layer=lambda l, named: seen.append(sorted(named)))
    >>> seen[0]
    ['attn_out', 'attn_read', 'attn_read_normed', 'mlp_out', 'mlp_read', 'mlp_read_normed', 'resid_mid', 'resid_post', 'resid_pre']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from streamlens.errors import StreamlensError
from streamlens.model import hooks
from streamlens.model.layouts import SUBLAYERS
from streamlens.model.loading import Model
from streamlens.stream.inputs import Batch

#: Names of one layer's tensors (what each means per layout: :mod:`streamlens.stream.trace`).
LAYER_NAMES = (
    "resid_pre", "attn_read", "attn_read_normed", "attn_out", "head_out", "attn_bias_out",
    "resid_mid", "mlp_read", "mlp_read_normed", "mlp_out", "resid_post",
)
#: Names outside the blocks, handed to ``on_global``.
GLOBAL_NAMES = ("embed", "pos_embed", "final_in", "final_scale", "final_out", "logits")
_GLOBAL_POINTS = (("embed", "out", "embed"), ("pos_embed", "out", "pos_embed"),
                  ("ln_final", "in", "final_in"), ("ln_final", "out", "final_out"))

Store = Callable[[Tensor], Tensor]


def check_finite(t: Tensor, what: str) -> Tensor:
    """``t`` if every value is finite; else an error naming ``what`` (one reduction, one synchronisation).

    ``Model.run`` already checks each block's output and the logits of every forward (naming the first
    layer that is not finite); this is for tensors computed outside it, e.g. logits of a replayed removal:
    ``check_finite(logits, f"the logits with {unit} removed")``.
    """
    if not bool(torch.isfinite(t).all()):
        raise StreamlensError(f"non-finite values (NaN or inf) in {what}: no metric is computed from them")
    return t


def check_sublayers(sublayers) -> tuple[str, ...]:
    if isinstance(sublayers, str):
        sublayers = (sublayers,)
    sublayers = tuple(sublayers)
    bad = [s for s in sublayers if s not in SUBLAYERS]
    if bad:
        raise StreamlensError(f"unknown sub-layer {bad[0]!r}; choose from {SUBLAYERS}")
    return sublayers


def head_split(model: Model, layer: int, z: Tensor, raw: dict, store: Store) -> tuple[Tensor, Tensor]:
    """``(head_out, attn_bias_out)``: per-head writes ``(b, p, h, d)`` and the output-bias share ``(b, p, d)``."""
    a = model.arch
    w_o, b_o = model.head_weights(layer)
    zh = z.float().reshape(*z.shape[:-1], a.n_heads, a.d_head)  # (b, p, h, d_head)
    head = torch.einsum("bphk,hkm->bphm", zh, w_o.to(zh.device))  # (b, p, h, d_model)
    bias = b_o.to(zh.device).expand(*z.shape[:-1], a.d_model)
    rule = a.rule_of(layer)
    extra = rule.write_norm("attn")
    if extra is not None:
        # attn_write = norm(attn_raw): at the norm's scale on this input the map is affine, so it
        # distributes over the heads exactly; the norm's own bias goes with the output bias.
        norm = model.block_norms[(layer, extra)]
        scale = norm.scale(raw[("attn", "out")])[..., None, :]  # (b, p, 1, 1)
        head = norm.linear_part(head, scale)
        bias = norm.linear_part(bias, scale[..., 0, :]) + norm.bias_part(bias)
    r = rule.scale_of("attn")
    if r != 1.0:  # scaled writes (Granite, Falcon-H1): x + r · attn(...)
        head, bias = head * r, bias * r
    return store(head), store(bias)


def capture(
    model: Model,
    batch: Batch,
    positions: Int[Tensor, "batch sel"] | None,
    *,
    layers: Sequence[int],
    sublayers: Sequence[str] = SUBLAYERS,
    heads: bool = False,
    store: Store = lambda t: t,
    on_layer: Callable[[int, dict[str, Tensor]], None],
    on_global: Callable[[str, Tensor], None] | None = None,
) -> Float[Tensor, "batch sel vocab"]:
    """Run ``model`` on ``batch``; hand each layer's named tensors to ``on_layer`` as soon as the layer ends.

    Args:
        positions: absolute position indices ``(batch, sel)`` to keep (see
            :func:`streamlens.stream.inputs.select_positions`), or None to keep every position.
        layers: the layers to name; sublayers: ``("attn", "mlp")`` or one of them; heads: add
            ``head_out`` / ``attn_bias_out``.
        store: applied to every tensor handed over (e.g. a cast, a move to the CPU, a copy).
        on_global: also called with ``embed``, ``pos_embed``, ``final_in`` and ``final_out``.

    Returns:
        The logits at the kept positions (not passed through ``store``).
    """
    arch, bridge = model.arch, model.bridge
    b, p = batch.input_ids.shape
    dev = model.device
    bidx = torch.arange(b, device=dev)[:, None]
    pidx = None if positions is None else positions.to(dev)

    def pick(t: Tensor) -> Tensor:
        return hooks.select_positions_of(t, (b, p), bidx, pidx, all_positions=pidx is None)

    # Per-head writes where the token mixer is attention (hybrid models: not in their SSM/conv blocks).
    head_layers = {l for l in layers if heads and hooks.block_point(bridge, l, "o", "in") is not None}
    if heads and not head_layers:
        raise StreamlensError(f"heads=True: none of layers {list(layers)} of {model.name} has attention heads with an "
                              "output projection (attn.o) to split")
    scratch: dict[int, dict] = {}
    attach = []
    for layer in layers:
        rule = arch.rule_of(layer)  # hybrid models may mix rules block by block
        has_ln2 = hooks.block_component(bridge, layer, "ln2") is not None
        need = rule.points(sublayers, has_ln2)
        for comp, side in need | (rule.head_points() if layer in head_layers else set()):
            hp = hooks.block_point(bridge, layer, comp, side)
            if hp is None:
                raise StreamlensError(f"block {layer} has no {comp} {side} hook point, which tracing this model needs")

            def fn(t, layer=layer, key=(comp, side), rule=rule, has_ln2=has_ln2):
                raw = scratch.setdefault(layer, {})
                raw[key] = pick(t)
                if key == ("block", "out"):
                    raw = scratch.pop(layer)
                    named = rule.named(raw, sublayers, has_ln2)
                    stored: dict[int, Tensor] = {}  # aliases (attn_read is resid_pre, ...) are stored once
                    named = {k: stored.setdefault(id(v), store(v)) for k, v in named.items()}
                    if layer in head_layers:
                        named["head_out"], named["attn_bias_out"] = head_split(model, layer, raw[("o", "in")], raw, store)
                    on_layer(layer, named)
                return None

            attach.append((hp, fn))
    if on_global is not None:
        for comp, side, name in _GLOBAL_POINTS:
            hp = hooks.global_point(bridge, comp, side)
            if hp is not None:
                attach.append((hp, lambda t, name=name: on_global(name, store(pick(t)))))
    with torch.no_grad(), hooks.attached(attach):
        logits = model.run(batch.input_ids, batch.mask)
    return logits if pidx is None else logits[bidx, pidx]
