"""Typed records of a logit decomposition: what a component is, and what one batch of prompts gave.

A :class:`Component` names one writer into the stream (``attn.3``, ``head.3.1``, ``neuron.5.17``,
``bias``, ...). A :class:`BatchDecomposition` is one batch's exact contributions, kept with the
writes they came from so that a later step (the per-neuron split) can refine a component.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxtyping import Float, Int
from torch import Tensor

#: What a component is: ``embed`` (token/positional embedding), ``attn`` (or the token mixer the bridge
#: calls ``mixer``, ``linear_attn`` or ``conv`` in SSM, linear-attention and convolution blocks), ``mamba`` (a
#: Mamba mixer beside attention, Falcon-H1), ``ple`` (Gemma 4's per-layer-input write), ``head``,
#: ``mlp``, ``neuron``, ``source`` (a head's share read at one source position), ``expert`` (one routed expert
#: of a mixture of experts), or ``bias`` (the output bias of a layer's attention, and the last component: the
#: final norm's bias plus the unembedding's bias).
KINDS = ("embed", "attn", "mixer", "linear_attn", "conv", "mamba", "ple", "head", "mlp", "neuron", "source", "expert", "bias")


@dataclass(frozen=True)
class Component:
    """One writer: its label, kind and where it sits (layer, head, neuron, source position where they apply)."""

    label: str
    kind: str
    layer: int | None = None
    head: int | None = None
    neuron: int | None = None
    source: int | None = None
    expert: int | None = None


BIAS = Component("bias", "bias")


@dataclass(eq=False)
class BatchDecomposition:
    """One batch's decomposition: ``values[c]`` is ``components[c]``'s contribution; the last row is ``BIAS``.

    ``writes[c]`` is the write of component ``c`` (``(b, s, d)``, float32) and ``final_in`` the final
    norm's input, kept for refinements that need them (neurons); ``readout`` is the ``(u, c)`` pair of
    the targets (``(b, s, k, d)`` and ``(b, s, k)``) when a refinement needs it.
    """

    components: list[Component]
    writes: list[Tensor] = field(repr=False)
    values: Float[Tensor, "component batch sel target"] = field(repr=False)
    ablated: Float[Tensor, "component batch sel target"] = field(repr=False)
    model_values: Float[Tensor, "batch sel target"] = field(repr=False)
    ids: Int[Tensor, "batch sel target"] | None = field(repr=False, default=None)
    contrast: Int[Tensor, "batch sel target"] | None = field(repr=False, default=None)
    final_in: Tensor | None = field(repr=False, default=None)
    readout: tuple[Tensor, Tensor] | None = field(repr=False, default=None)
    neuron_acts: dict[int, Tensor] = field(repr=False, default_factory=dict)
    neuron_values: dict[int, Tensor] = field(repr=False, default_factory=dict)
    #: Soft-capped models: the capped logits the model outputs (``model_values`` are the pre-cap ones).
    capped_values: Tensor | None = field(repr=False, default=None)

    def index(self, label: str) -> int:
        return [c.label for c in self.components].index(label)
