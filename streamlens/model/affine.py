"""Measured affine maps: the attention output projection per head, the MLP down projection, the unembedding.

Each map is measured on the module itself as ``f(x) = x W + b`` with ``b = f(0)`` and ``W = f(I) − b``,
so it does not depend on how the module stores its weight (``Linear``, GPT-2's ``Conv1D``, ...). The
per-head split of an attention write and the per-neuron split of an MLP write rest on these maps:

* ``attn_out = Σ_h z_h W_O[h] + b_O`` with ``z`` the output projection's input, ``(n_heads, d_head)`` per position;
* ``mlp_out = Σ_n act_n W_down[n] + b_down`` with ``act`` the down projection's input (the neurons);
* ``logits = x W_U^T + b_U`` with ``x`` the final norm's output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from streamlens.errors import UnsupportedModelError
from streamlens.model import hooks
from streamlens.model.precision import is_low

if TYPE_CHECKING:
    from streamlens.model.loading import Model


def measure(module: nn.Module, width: int) -> tuple[Float[Tensor, "width d_out"], Float[Tensor, " d_out"]]:
    """``(W, b)`` of an affine ``module`` taking ``width`` inputs, in float32: ``module(x) = x @ W + b``.

    A bfloat16/float16 module is measured on a float32 copy of itself: in half precision ``f(I)`` would be
    ``W + b`` rounded, so ``f(I) − b`` would not give back ``W`` (the copy's ``W`` and ``b`` are the stored
    half-precision values exactly)."""
    p = next(module.parameters())
    if is_low(p.dtype):
        import copy

        module = copy.deepcopy(module).float()
        p = next(module.parameters())
    with torch.no_grad():
        b = module(torch.zeros(1, width, device=p.device, dtype=p.dtype)).float()[0]
        w = module(torch.eye(width, device=p.device, dtype=p.dtype)).float() - b
    return w, b


def output_projection(model: Model, layer: int) -> tuple[Float[Tensor, "head d_head d_model"], Float[Tensor, " d_model"]]:
    """``(W_O, b_O)`` of layer ``layer``'s attention output projection, ``W_O`` split per head."""
    o = hooks.block_component(model.bridge, layer, "o")
    if o is None:
        raise UnsupportedModelError(
            f"layer {layer}'s attention has no separate output projection (attn.o), so per-head writes cannot be split"
        )
    a = model.arch
    width = getattr(o.original_component, "in_features", None)
    if isinstance(width, int) and width != a.n_heads * a.d_head:  # Gemma 4's global layers: a head width of their own
        raise UnsupportedModelError(
            f"layer {layer}'s attention output projection takes {width} inputs, not {a.n_heads} heads × {a.d_head} "
            "(the model's head width): per-head writes of layers with their own head width are not split")
    w, b = measure(o.original_component, a.n_heads * a.d_head)
    return w.reshape(a.n_heads, a.d_head, a.d_model), b


def down_projection(model: Model, layer: int) -> tuple[Float[Tensor, "d_mlp d_model"], Float[Tensor, " d_model"], Any]:
    """``(W, b, hook)``: the MLP's write as ``act @ W + b`` (its down projection, times any residual multiplier)
    and the hook point that sees ``act``."""
    mlp = hooks.block_component(model.bridge, layer, "mlp")
    out = None if mlp is None else hooks.child(mlp, "out")
    hp = hooks.hook_point(out, "in")
    if out is None or hp is None or not hasattr(out, "original_component"):
        raise UnsupportedModelError(f"layer {layer}'s MLP has no down projection (mlp.out) to split into neurons")
    lin = out.original_component
    width = int(getattr(lin, "in_features", 0) or model.arch.d_mlp)
    w, b = measure(lin, width)
    # scaled writes (Granite's residual multiplier, Falcon-H1's MLP down multiplier applied after mlp.out):
    # the write is r · (act @ W + b). Callers check the product against the recorded write (neurons.py).
    r = model.arch.rule_of(layer).scale_of("mlp")
    mults = getattr(getattr(model.hf, "config", None), "mlp_multipliers", None)
    if isinstance(mults, (list, tuple)) and len(mults) == 2 and all(isinstance(v, (int, float)) for v in mults):
        r *= float(mults[1])  # (gate multiplier, down multiplier)
    return (w, b, hp) if r == 1.0 else (w * r, b * r, hp)


def unembedding(model: Model) -> tuple[Float[Tensor, "d_vocab d_model"], Float[Tensor, " d_vocab"] | None]:
    """``(W, b)`` of the unembedding: ``logits = x @ W.T + b``, W of shape ``(d_vocab, d_model)``."""
    lin = model.bridge.unembed.original_component
    w = lin.weight.detach()
    b = getattr(lin, "bias", None)
    return w, (b.detach() if isinstance(b, Tensor) else None)
