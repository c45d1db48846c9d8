"""Per-expert contributions of mixture-of-experts blocks (``decompose(..., unit="expert")``).

A MoE block's write is ``Σ_e r_e(x) · E_e(x) + rest``: each routed expert's share (router weight
times expert output, :func:`streamlens.model.experts.expert_writes`) plus what the block adds
beyond its routed experts (shared experts and their gate; zero in Mixtral or OLMoE). Each share is
one component ``expert.l.e``; the rest is ``mlp_rest.l``, so the components of a layer add up to
its write exactly, and through the final norm at its frozen scale to the logit.

Where the MoE output passes through a norm before it is written (Afmoe's sandwich, FlexOlmo's norm after
the sub-layer), that norm at its scale on the MoE output ``s(moe)`` is linear: ``g ⊙ C share_e / s(moe)``
is expert ``e``'s share of the write, exactly as a head's share passes through Gemma 2's extra norm; the
norm's bias goes with ``mlp_rest.l``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from streamlens.errors import StreamlensError
from streamlens.model import hooks
from streamlens.model.experts import check_splittable, expert_writes
from streamlens.readout.components import Component

if TYPE_CHECKING:
    from streamlens.model.loading import Model


def expert_components(model: Model, layer: int, mlp_write: Tensor, call, shape: tuple[int, int], bidx, pidx,
                      moe_out: Tensor | None = None) -> list[tuple[Component, Tensor]]:
    """``[(Component, write (b, s, d))]``: every routed expert of ``layer`` and the rest of its MoE write.

    ``moe_out``: the MoE block's own output at the kept positions, where a norm follows it (its scale)."""
    norm = check_splittable(model, layer)
    b, p = shape
    shares = expert_writes(model, layer, call)  # (E, tokens, d)
    if shares.shape[1] != b * p and shares.shape[1:3] != (b, p):
        raise StreamlensError(f"layer {layer}'s experts were called on {shares.shape[1]} tokens, not the batch's {b * p}")
    out = [(Component(f"expert.{layer}.{e}", "expert", layer, expert=e),
            hooks.select_positions_of(w, (b, p), bidx, pidx).float()) for e, w in enumerate(shares)]
    if norm is not None:  # the norm after the MoE block, at its frozen scale on the whole MoE output: linear
        if moe_out is None:
            raise StreamlensError(f"layer {layer}: the MoE output before its norm {norm} was not recorded")
        spec, r = model.block_norms[(layer, norm)], model.arch.rule_of(layer).scale_of("mlp")
        scale = spec.scale(moe_out)
        out = [(c, spec.linear_part(w, scale) * r) for c, w in out]
    rest = mlp_write.float() - sum(w for _, w in out)
    return out + [(Component(f"mlp_rest.{layer}", "mlp", layer), rest)]
