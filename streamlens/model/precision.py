"""Low precision (``bfloat16``, ``float16``): what is computed in which dtype, and the checks' tolerances.

A model loaded with ``dtype=torch.bfloat16`` or ``torch.float16`` runs its own forward in that dtype:
the residual stream, every write and every recorded activation are the model's low-precision values.
Everything streamlens computes *from* them is computed in float32 (float64 where sums already were):
a low-precision tensor is upcast first (exactly: every bfloat16/float16 value is a float32 value), so
norms, softmaxes, dot products with the unembedding and sums over data never overflow or round in
half precision, and results come back in float32. "Exact" then means exact for the stored stream: a
decomposition adds up, to float32 rounding, to the float32 evaluation of the stored low-precision
writes (see the README's "Low precision"); the model's own low-precision output differs from that by
its rounding, and the checks that compare with the model's own tensors allow for it
(:func:`check_tol`).
"""

from __future__ import annotations

import torch
from torch import Tensor

LOW = (torch.bfloat16, torch.float16)


def is_low(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is a half-precision float (bfloat16 or float16)."""
    return dtype in LOW


def up(t: Tensor) -> Tensor:
    """``t`` in float32 when it is bfloat16/float16 (an exact cast); any other tensor as it is."""
    return t.float() if t.dtype in LOW else t


def check_tol(dtype: torch.dtype, tol: float) -> float:
    """A check's tolerance ``tol`` (stated for float32) for a model running in ``dtype``: in half precision
    at least four machine epsilons of ``dtype`` (bfloat16 3.1e-2, float16 3.9e-3), the rounding of one
    stored low-precision value relative to its size, since the model's own tensors carry it."""
    return max(tol, 4 * torch.finfo(dtype).eps) if dtype in LOW else tol
