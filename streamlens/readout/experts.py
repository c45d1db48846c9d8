"""Per-expert contributions of mixture-of-experts blocks (``decompose(..., unit="expert")``).

A MoE block's write is ``Σ_e r_e(x) · E_e(x) + rest``: each routed expert's share (router weight
times expert output, :func:`streamlens.model.experts.expert_writes`) plus what the block adds
beyond its routed experts (shared experts and their gate; zero in Mixtral or OLMoE). Each share is
one component ``expert.l.e``; the rest is ``mlp_rest.l``, so the components of a layer add up to
its write exactly, and through the final norm at its frozen scale to the logit.
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


def expert_components(model: Model, layer: int, mlp_write: Tensor, call, shape: tuple[int, int], bidx, pidx
                      ) -> list[tuple[Component, Tensor]]:
    """``[(Component, write (b, s, d))]``: every routed expert of ``layer`` and the rest of its MoE write."""
    check_splittable(model, layer)
    b, p = shape
    shares = expert_writes(model, layer, call)  # (E, tokens, d)
    if shares.shape[1] != b * p and shares.shape[1:3] != (b, p):
        raise StreamlensError(f"layer {layer}'s experts were called on {shares.shape[1]} tokens, not the batch's {b * p}")
    out = [(Component(f"expert.{layer}.{e}", "expert", layer, expert=e),
            hooks.select_positions_of(w, (b, p), bidx, pidx).float()) for e, w in enumerate(shares)]
    rest = mlp_write.float() - sum(w for _, w in out)
    return out + [(Component(f"mlp_rest.{layer}", "mlp", layer), rest)]
