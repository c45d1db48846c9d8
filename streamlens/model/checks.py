"""Refusals the probe measures before any layout is tried: the model must be one causal stack of blocks with
one ``d_model`` vector per position, run by the bridge as HuggingFace runs it. Each names what does not fit."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from streamlens.errors import UnsupportedModelError

if TYPE_CHECKING:
    from streamlens.model.loading import Model


def relative_error(got: Tensor, want: Tensor) -> float:
    """``‖got − want‖ / ‖want‖`` over the whole tensor."""
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()


def check_causal(model: Model, ids: Tensor, logits: Tensor) -> None:
    """Refuse a causal model whose bridged forward lets a position see later tokens (OpenAI GPT: the bridge drops
    the causal mask when an attention mask is given): changing the last token must leave earlier logits alone."""
    other = ids.clone()
    other[0, -1] = (other[0, -1] + 1) % int(model.bridge.cfg.d_vocab)
    with torch.no_grad():
        moved = model.run(other, torch.ones_like(other, dtype=torch.bool))
    err = relative_error(moved[:, :-1], logits[:, :-1])
    if err > 1e-5:
        raise UnsupportedModelError(
            f"{model.name}: the TransformerBridge does not run this model as HuggingFace does: with an attention mask its "
            f"forward is not causal (changing the last token changes the logits of earlier positions by {err:.1e} "
            "relative), so no trace of it would be the model's own"
        )


def check_stack(model: Model) -> None:
    """Refuse, by name, models without one stack of blocks or with a residual that is not one vector per position."""
    bridge = model.bridge
    if getattr(bridge, "blocks", None) is None or len(bridge.blocks) == 0:
        stacks = [n for n, m in bridge.named_children() if isinstance(m, nn.ModuleList)]
        raise UnsupportedModelError(
            f"{model.name}: the bridge has no single stack of blocks (it has {', '.join(stacks) or 'none'}), so there "
            "is no one residual stream to follow"
        )


def check_residual_shape(model: Model, rec: dict, shape: tuple[int, int], d_model: int) -> None:
    for (layer, comp, side), t in rec.items():
        if comp == "block" and t.dim() != 3 or comp == "block" and tuple(t.shape) != (*shape, d_model):
            raise UnsupportedModelError(
                f"{model.name}: the residual stream is not one d_model vector per position: block {layer}'s {side}put "
                f"has shape {tuple(t.shape)} for a batch of shape {shape} (d_model {d_model}); several parallel "
                "streams (hyper-connections) have no single sum of writes"
            )
