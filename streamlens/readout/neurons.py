"""The per-neuron split of an MLP's contribution (``unit="neuron"``).

The MLP write is ``mlp_out = Σ_n act_n W_down[n] + b_down`` (the down projection measured as an
affine map, :func:`streamlens.model.affine.down_projection`). Through the final norm at its frozen
scale ``s``, neuron ``n`` contributes ``act_n / s · (g ⊙ C W_down[n]) · u`` to a readout ``u``.
:func:`split_neurons` keeps each layer's ``top`` neurons by mean |contribution| over the whole data
set and folds the rest (other neurons and ``b_down``) into ``mlp_rest.l``, so the sum is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from streamlens.errors import UnsupportedModelError
from streamlens.model.affine import down_projection
from streamlens.model.precision import check_tol, up
from streamlens.readout.components import BatchDecomposition, Component

if TYPE_CHECKING:
    from streamlens.model.loading import Model


def neuron_values(model: Model, layer: int, acts: Tensor, mlp_write: Tensor, scale: Tensor, u: Tensor) -> Tensor:
    """Each neuron's contribution ``(b, s, k, d_mlp)`` to the readout ``u`` ``(b, s, k, d)`` at the frozen ``scale``."""
    w, b_down, _ = down_projection(model, layer)
    acts, mlp_write = up(acts), up(mlp_write)  # half precision: checked and split in float32
    err = ((acts @ w + b_down - mlp_write).norm() / mlp_write.norm().clamp_min(1e-12)).item()
    if not err <= check_tol(model.dtype, 1e-4):  # the model's own write carries its rounding
        raise UnsupportedModelError(
            f"layer {layer}: the down projection's input (the neuron activations) times its weights does not give the "
            f"MLP write (relative error {err:.1e}), so neuron contributions would not add up"
        )
    wn = model.final_norm.linear_part(w, torch.ones((), device=w.device))  # (d_mlp, d): g ⊙ C W
    proj = torch.einsum("nd,bskd->bskn", wn, u)
    return (acts[:, :, None, :] / scale[..., None] * proj).cpu()  # (b, s, k, d_mlp)


def split_neurons(model: Model, parts: list[BatchDecomposition], layers: Sequence[int], top: int) -> None:
    """Replace ``mlp.l`` by its ``top`` largest neurons (by mean |value| over every batch) and ``mlp_rest.l``."""
    norm = model.final_norm
    for l in layers:
        w = down_projection(model, l)[0]
        score = torch.cat([p.neuron_values[l].abs().flatten(0, 2) for p in parts]).mean(0)  # (d_mlp,)
        idx = score.topk(min(top, score.numel())).indices.sort().values
        for p in parts:
            c = p.index(f"mlp.{l}")
            nv = p.neuron_values[l][..., idx].permute(3, 0, 1, 2)  # (top, b, s, k)
            rest = p.values[c] - nv.sum(0)
            act, (u, cb) = p.neuron_acts[l], p.readout
            nw = act[..., idx].permute(2, 0, 1)[..., None] * w[idx][:, None, None]  # (top, b, s, d): each neuron's write
            rw = p.writes[c] - nw.sum(0)
            renorm = norm(p.final_in[None] - torch.cat([nw, rw[None]]))  # (top+1, b, s, d)
            abl = (torch.einsum("nbsd,bskd->nbsk", renorm, u) + cb).cpu()
            new = [Component(f"neuron.{l}.{int(n)}", "neuron", l, neuron=int(n)) for n in idx] + \
                  [Component(f"mlp_rest.{l}", "mlp", l)]
            p.components[c:c + 1] = new
            p.writes[c:c + 1] = list(nw) + [rw]
            p.values = torch.cat([p.values[:c], nv, rest[None], p.values[c + 1:]])
            p.ablated = torch.cat([p.ablated[:c], abl, p.ablated[c + 1:]])
