"""The readout: final norm + unembedding, read in vocabulary chunks, and the check that it is linear.

The logits are ``W_U · ln_final(x) + b_U``. With the final norm's scale held at its recorded value
the map from the final residual ``x`` to a logit is affine (:mod:`streamlens.model.norms`), which is
what makes a per-writer split exact. :func:`require_linear_readout` refuses a model where that does
not hold, with the reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from streamlens.errors import StreamlensError, UnsupportedModelError

if TYPE_CHECKING:
    from streamlens.model.loading import Model


def require_linear_readout(model: Model, verb: str) -> None:
    """Refuse models whose logits are not ``unembed(ln_final(sum of writes))``."""
    a = model.arch
    if not a.rule.additive:
        raise UnsupportedModelError(
            f"{verb}: {model.name} is post-norm (every block renormalises the residual), so its final residual is "
            "not a sum of per-layer writes and no per-writer split of its logits is exact"
        )
    if model.final_norm is None or not a.final_reads_last_resid:
        raise UnsupportedModelError(f"{verb}: {model.name}'s final norm does not read the last block's output directly")
    if not a.logits_are_unembed:
        raise UnsupportedModelError(f"{verb}: {model.name}'s readout does not fit: {a.readout_problem}")


def require_two_writers(model: Model, verb: str) -> None:
    """Refuse models whose blocks write more than attention and MLP, or scale the stream (verbs that follow
    ``resid_mid = resid_pre + attn_out`` position by position: information flow, value paths)."""
    a = model.arch
    extra = sorted({w for l in range(a.n_layers) for w in a.rule_of(l).writers} - {"attn", "mlp"})
    if extra or a.stream_scales:
        why = (f"its blocks also write through {', '.join(extra)}" if extra else "") + \
              ("; " if extra and a.stream_scales else "") + \
              ("each block scales the whole stream (a layer scalar)" if a.stream_scales else "")
        raise UnsupportedModelError(f"{verb}: {model.name} is not supported: {why}; {verb} follows attention and MLP "
                                    "writes only (decompose, trace and the skip evaluator handle every writer)")


def unembed_matrices(model: Model) -> tuple[Float[Tensor, "d_vocab d_model"], Float[Tensor, " d_vocab"]]:
    """``(W_U, b_U)`` in float32 with the model's positive logit scale folded in (``scale · (W x + b)``):
    the map to the logits, or to the pre-cap logits of a soft-capped model. ``b_U`` is zeros for a bias-free unembedding."""
    W, bU = model.unembed_weight()
    W = W.float()
    bU = torch.zeros(W.shape[0], device=W.device) if bU is None else bU.float()
    s = model.arch.logit_scale
    return (W, bU) if s == 1.0 else (W * s, bU * s)


def vocab_chunks(d_vocab: int, chunk_size: int) -> list[slice]:
    """Slices of ``chunk_size`` vocabulary rows covering ``0..d_vocab``."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise StreamlensError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return [slice(i, min(i + chunk_size, d_vocab)) for i in range(0, d_vocab, chunk_size)]
