"""Norms are identified by running them: every supported form, and a refusal for the rest."""

import pytest
import torch
from torch import nn

from streamlens.errors import UnsupportedModelError
from streamlens.model.norms import identify_norm

D = 16


class LayerNorm1P(nn.LayerNorm):
    """Nemotron's LayerNorm with gain ``1 + w``."""

    def forward(self, x):
        return nn.functional.layer_norm(x, self.normalized_shape, self.weight + 1.0, self.bias, self.eps)


class ScaledRMS(nn.Module):
    """Not a named formula, but of the form ``g ⊙ x / rms(x) + b``: g and b are measured."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(D))
        self.eps = 1e-6

    def forward(self, x):
        return 2 * self.w * x / (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt() + 0.25


class NotANorm(nn.Module):
    def forward(self, x):
        return torch.tanh(x)


def _randomised(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    return m


@pytest.mark.parametrize("module, kind", [
    (nn.LayerNorm(D), "layernorm"),
    (nn.RMSNorm(D, eps=1e-6), "rmsnorm"),
    (LayerNorm1P(D), "layernorm_offset"),
    (nn.Identity(), "identity"),
    (ScaledRMS(), "rmsnorm_fit"),
])
def test_each_form_is_identified_and_reproduced(module, kind):
    module = _randomised(module).eval()
    spec = identify_norm(module, D, where="test")
    assert spec.kind == kind
    x = torch.randn(5, 3, D, generator=torch.Generator().manual_seed(3)) * 2
    with torch.no_grad():
        want = module(x)
    torch.testing.assert_close(spec(x), want, rtol=1e-5, atol=1e-5)
    # at a frozen scale the norm is affine: linear part + bias
    s = spec.scale(x)
    torch.testing.assert_close(spec.linear_part(x, s) + spec.bias_part(x), want, rtol=1e-5, atol=1e-5)


def test_a_module_of_another_form_is_refused_by_name():
    with pytest.raises(UnsupportedModelError, match=r"blocks\.3\.ln1 \(NotANorm\) is not a norm of the form"):
        identify_norm(NotANorm(), D, where="blocks.3.ln1")
