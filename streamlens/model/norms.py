"""Normalisation layers as streamlens sees them: a scale, and a map that is linear once the scale is fixed.

Every norm streamlens supports has the form

    norm(x) = g ⊙ (C x) / s(x) + b

* LayerNorm:        C = I − 11ᵀ/d (centring),  s(x) = sqrt(var(x) + eps),        g = w
* RMSNorm:          C = I,                      s(x) = sqrt(mean(x²) + eps),      g = w
* Gemma's RMSNorm:  C = I,                      s(x) = sqrt(mean(x²) + eps),      g = 1 + w
* LayerNorm1P:      C = I − 11ᵀ/d,              s(x) = sqrt(var(x) + eps),        g = 1 + w   (Nemotron)
* Identity:         C = I,                      s(x) = 1,                          g = 1       (a block without a norm)
* any other module of this form: g and b are *measured* (least squares on random inputs, then checked)

With s held at the value it had on an input ("frozen scale"), norm is affine in x, so a residual
that is a sum of writes x = Σᵢ xᵢ maps to Σᵢ g ⊙ (C xᵢ)/s + b exactly. That identity is what makes the
logit decomposition exact.

The kind is never read from a class name: :func:`identify_norm` runs the module on random vectors
and keeps the formula that reproduces it, so a model streamlens has not seen still works, or fails
loudly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from streamlens.errors import UnsupportedModelError

NormKind = Literal["layernorm", "rmsnorm", "rmsnorm_offset", "layernorm_offset", "identity", "layernorm_fit",
                   "rmsnorm_fit"]


@dataclass(frozen=True)
class NormSpec:
    """A norm's kind, epsilon and parameters (``gain`` already includes Gemma's ``1 +``)."""

    kind: NormKind
    eps: float
    gain: Tensor | None  # (d_model,) or None for a norm without a learned scale
    bias: Tensor | None  # (d_model,) or None

    @property
    def centres(self) -> bool:
        return self.kind.startswith("layernorm")

    def scale(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... 1"]:
        """s(x): the per-vector divisor, sqrt(var + eps) or sqrt(mean square + eps) (1 for the identity)."""
        x = x.float()
        if self.kind == "identity":
            return torch.ones_like(x[..., :1])
        if self.centres:
            var = (x - x.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True)
        else:
            var = x.pow(2).mean(-1, keepdim=True)
        return (var + self.eps).sqrt()

    def linear_part(self, x: Float[Tensor, "... d"], scale: Float[Tensor, "... 1"]) -> Float[Tensor, "... d"]:
        """g ⊙ (C x) / s: the norm's output without its bias, at a frozen scale. Linear in x."""
        x = x.float()
        if self.centres:
            x = x - x.mean(-1, keepdim=True)
        y = x / scale
        if self.gain is not None:
            y = y * self.gain.to(y)
        return y

    def bias_part(self, like: Tensor) -> Tensor:
        """b broadcast to ``like``'s shape (zeros when the norm has no bias)."""
        if self.bias is None:
            return torch.zeros_like(like, dtype=torch.float32)
        return self.bias.to(like.device, torch.float32).expand_as(like)

    def __call__(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        """The norm itself, recomputed in float32 from its own statistics."""
        return self.linear_part(x, self.scale(x)) + self.bias_part(x)


def _param(module: torch.nn.Module, name: str) -> Tensor | None:
    p = getattr(module, name, None)
    return p.detach() if isinstance(p, Tensor) else None


def _eps(module: torch.nn.Module) -> float:
    for name in ("eps", "variance_epsilon", "epsilon", "layer_norm_eps"):
        v = getattr(module, name, None)
        if isinstance(v, (float, int)):
            return float(v)
    return 1e-5


def identify_norm(module: torch.nn.Module, d_model: int, *, where: str) -> NormSpec:
    """Work out which norm ``module`` computes by running it and comparing with each formula.

    Raises:
        UnsupportedModelError: when no supported formula reproduces the module's output.
    """
    weight, bias, eps = _param(module, "weight"), _param(module, "bias"), _eps(module)
    p = next(iter(module.parameters()), None)
    dtype = p.dtype if p is not None else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(8, d_model, generator=gen) * 3 + 0.5).to(device, dtype)
    with torch.no_grad():
        want = module(x).float()
    candidates = {
        "layernorm": NormSpec("layernorm", eps, weight, bias),
        "rmsnorm": NormSpec("rmsnorm", eps, weight, bias),
    }
    if weight is not None:
        candidates["rmsnorm_offset"] = NormSpec("rmsnorm_offset", eps, 1.0 + weight.float(), bias)
        candidates["layernorm_offset"] = NormSpec("layernorm_offset", eps, 1.0 + weight.float(), bias)
    candidates["identity"] = NormSpec("identity", 0.0, None, None)
    tol = 1e-4 if dtype == torch.float32 or dtype == torch.float64 else 2e-2
    errors = {kind: _rel(spec(x), want) for kind, spec in candidates.items()}
    best = min(errors, key=errors.get)
    if errors[best] <= tol:
        return candidates[best]
    # Not a known formula: measure g and b of g ⊙ C x / s(x) + b, for each choice of C and s, and keep what fits.
    gen_fit = torch.Generator().manual_seed(1)
    xf = (torch.randn(64, d_model, generator=gen_fit) * 3 + 0.5).to(device, dtype)
    with torch.no_grad():
        yf = module(xf).float()
    for kind, base in (("layernorm_fit", "layernorm"), ("rmsnorm_fit", "rmsnorm")):
        unit = NormSpec(base, eps, None, None)
        z = unit(xf)  # (n, d): C x / s(x)
        zc, yc = z - z.mean(0), yf - yf.mean(0)
        gain = (zc * yc).sum(0) / (zc * zc).sum(0).clamp_min(1e-12)  # per-coordinate least squares
        fitted = NormSpec(kind, eps, gain, yf.mean(0) - gain * z.mean(0))
        errors[kind] = _rel(fitted(x), want)
        if errors[kind] <= tol:
            return fitted
    detail = ", ".join(f"{k}: {v:.1e}" for k, v in errors.items())
    raise UnsupportedModelError(
        f"{where} ({type(module).__name__}) is not a norm of the form g ⊙ C x / s(x) + b (LayerNorm, RMSNorm and their "
        f"(1 + w) variants, the identity, or any measured g and b; relative error of each: {detail}), so streamlens "
        "cannot hold its scale fixed"
    )


def _rel(got: Tensor, want: Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
