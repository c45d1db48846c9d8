"""Mixture-of-experts blocks, one expert at a time.

A sparse MoE layer writes ``Σ_e r_e(x) · E_e(x)`` (plus, in some models, shared experts that every
token uses): router weight times expert output, summed over the ``k`` experts each token is routed
to. In the transformers versions streamlens supports, the routed part is one module, ``experts``,
called as ``experts(hidden_states, top_k_index, top_k_weights)`` (Mixtral, OLMoE, Qwen-MoE,
DeepSeek, GPT-OSS, ...). Since its output is linear in ``top_k_weights``, calling it again with
every weight but expert ``e``'s set to zero gives expert ``e``'s exact share, and zeroing expert
``e``'s weights removes exactly that share (no renormalisation of the others)::

    with recording(model, moe_layers(model)) as calls:     # the experts' inputs, per MoE layer
        model.run(ids, mask)
    shares = expert_writes(model, 3, calls[3])             # (n_experts, tokens, d_model)
    with hooks.attached([(experts_module(model, 3), hooks.PreHook(drop_experts([5])))]):
        model.run(ids, mask)                               # layer 3 without expert 5

Llama 4 calls its experts differently: ``experts(x)`` with ``x`` of shape ``(n_experts * tokens, d)``,
every token once per expert with its input already multiplied by its router score (zero where the
expert is not chosen), and returns the outputs in the same stacked layout. Expert ``e``'s exact share
is then its block of the output, ``out.view(n_experts, tokens, d)[e]``, and removing it zeroes that
block (a forward hook instead of a pre-hook): :func:`removal_hook` gives the right one for either.

What the MoE layer writes beyond the routed experts (shared experts, their gate) stays one
remainder, so the parts always add up to the layer's write.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from streamlens.errors import UnsupportedModelError
from streamlens.model import hooks

if TYPE_CHECKING:
    from streamlens.model.loading import Model


def _unwrap(module: nn.Module) -> nn.Module:
    while hasattr(module, "original_component") and module.original_component is not None:
        module = module.original_component
    return module


def experts_module(model: Model, layer: int) -> nn.Module | None:
    """The routed-experts module of block ``layer``'s MLP slot, or None where the block has no experts."""
    mlp = hooks.block_component(model.bridge, layer, "mlp")
    if mlp is None:
        return None
    ex = getattr(_unwrap(mlp), "experts", None)
    if not isinstance(ex, nn.Module):
        return None
    ex = _unwrap(ex)
    return ex if call_style(ex) else None


def call_style(ex: nn.Module) -> str | None:
    """``"routed"`` (``experts(hidden, top_k_index, top_k_weights)``), ``"stacked"`` (Llama 4:
    ``experts(x)`` on every expert's copy of the tokens, stacked on the first axis) or None."""
    params = [p for p in inspect.signature(ex.forward).parameters.values() if p.name != "self"]
    if len(params) >= 3:
        return "routed"
    n = getattr(ex, "num_experts", None)
    weights = [p for p in ex.parameters(recurse=False)]
    if len(params) == 1 and isinstance(n, int) and weights and all(p.dim() == 3 and p.shape[0] == n for p in weights):
        return "stacked"
    return None


def n_experts(model: Model, layer: int) -> int:
    """How many routed experts block ``layer`` has (0: not a MoE block)."""
    ex = experts_module(model, layer)
    if ex is None:
        return 0
    n = getattr(ex, "num_experts", None) or getattr(getattr(model.hf, "config", None), "num_local_experts", None)
    return int(n) if n else 0


def moe_layers(model: Model) -> tuple[int, ...]:
    return tuple(l for l in range(model.arch.n_layers) if n_experts(model, l) > 0)


def check_splittable(model: Model, layer: int) -> str | None:
    """Refuse a per-expert split where the MoE output is not added to the stream as it is, or through one norm
    (sandwich, post-sub-layer norm: returns that norm's name, whose frozen scale makes it linear in the shares)."""
    rule = model.arch.rule_of(layer)
    norm = rule.write_norm("mlp")
    if norm is not None and "mlp" not in rule.true_writes and rule.base_point("mlp") is None \
            and (layer, norm) in model.block_norms:
        return norm
    if rule.write_point("mlp") != ("mlp", "out") or rule.base_point("mlp") is not None:
        raise UnsupportedModelError(
            f"experts of layer {layer}: {model.name}'s MLP write is not the MoE block's output as it is "
            f"({model.arch.layout} layout), so per-expert shares would not add up to it"
        )
    return None


def expert_writes(model: Model, layer: int, call: tuple[Tensor, Tensor, Tensor], *, scaled: bool = True) -> Tensor:
    """``(n_experts, tokens, d_model)``: each routed expert's share of the MoE output, for one recorded call.

    ``call`` is ``(hidden_states, top_k_index, top_k_weights)`` as the experts module received it, or
    ``(output,)`` of a stacked experts module (Llama 4); shares are in the stream's units (times the
    model's residual multiplier; ``scaled=False``: as the experts module outputs them).
    """
    ex = experts_module(model, layer)
    r = model.arch.rule_of(layer).scale_of("mlp") if scaled else 1.0
    if len(call) == 1:  # stacked: (n_experts * tokens, d) -> each expert's block is its share
        w = call[0].float().reshape(n_experts(model, layer), -1, call[0].shape[-1])
        return w * r if r != 1.0 else w
    hidden, idx, weights = call
    outs = []
    with torch.no_grad():
        for e in range(n_experts(model, layer)):
            outs.append(ex.forward(hidden, idx, weights * (idx == e).to(weights.dtype)).float())  # no hooks
    w = torch.stack(outs)
    return w * r if r != 1.0 else w


@contextmanager
def recording(model: Model, layers: Sequence[int]) -> Iterator[dict[int, tuple[Tensor, Tensor, Tensor]]]:
    """Record the ``(hidden_states, top_k_index, top_k_weights)`` each experts module of ``layers`` is called with
    (``(output,)`` for a stacked experts module)."""
    calls: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
    handles = []

    def keep(layer):
        def pre(module, args, kwargs):
            vals = list(args) + [v for k, v in kwargs.items()]
            calls[layer] = tuple(v.detach() for v in vals[:3])
        return pre

    def keep_out(layer):
        def post(module, args, out):
            calls[layer] = (out.detach(),)
        return post

    try:
        for l in layers:
            ex = experts_module(model, l)
            if call_style(ex) == "stacked":
                handles.append(ex.register_forward_hook(keep_out(l)))
            else:
                handles.append(ex.register_forward_pre_hook(keep(l), with_kwargs=True))
        yield calls
    finally:
        for h in handles:
            h.remove()


def removal_hook(model: Model, layer: int, experts: Sequence[int]) -> tuple[nn.Module, Callable]:
    """``(module, hook)`` for :func:`streamlens.model.hooks.attached` that removes exactly the shares of ``experts``
    of block ``layer``: a pre-hook zeroing their routing weights, or (stacked experts) a hook zeroing their outputs."""
    ex = experts_module(model, layer)
    if call_style(ex) == "stacked":
        n, drop = n_experts(model, layer), sorted(set(experts))

        def zero(out: Tensor) -> Tensor:
            out = out.clone()
            out.view(n, -1, out.shape[-1])[drop] = 0
            return out

        return ex, zero
    return ex, hooks.PreHook(drop_experts(experts))


def replacement_hooks(model: Model, layer: int, new: dict[int, Callable[[Tensor], Tensor]]) -> list:
    """Hooks for :func:`streamlens.model.hooks.attached` that replace expert ``e``'s share of block ``layer``'s experts
    output by ``new[e](share)`` (shares as the module outputs them, ``(tokens, d)``): the ``mean`` removal mode."""
    ex = experts_module(model, layer)
    if call_style(ex) == "stacked":
        n = n_experts(model, layer)

        def stacked(out: Tensor) -> Tensor:
            out = out.clone()
            view = out.view(n, -1, out.shape[-1])
            for e, f in new.items():
                view[e] = f(view[e])
            return out

        return [(ex, stacked)]
    held: dict = {}

    def pre(module, args, kwargs):
        vals = list(args) + list(kwargs.values())
        held["call"] = vals[:3]

    def post(out: Tensor) -> Tensor:
        hidden, idx, w = held.pop("call")
        for e, f in new.items():
            share = ex.forward(hidden, idx, w * (idx == e).to(w.dtype))  # expert e's share (no hooks)
            out = out - share + f(share)
        return out

    return [(ex, hooks.PreHook(pre)), (ex, post)]


def drop_experts(experts: Sequence[int]) -> Callable:
    """A forward pre-hook (with kwargs) that zeroes the routing weights of ``experts``: removes exactly their share."""
    drop = torch.tensor(sorted(set(experts)))

    def pre(module, args, kwargs):
        args = list(args)
        names = [p for p in inspect.signature(module.forward).parameters if p != "self"]
        if len(args) >= 3:
            idx, w = args[1], args[2]
            args[2] = w * ~torch.isin(idx, drop.to(idx.device))
        else:  # passed by keyword
            idx = args[1] if len(args) > 1 else kwargs[names[1]]
            kwargs[names[2]] = kwargs[names[2]] * ~torch.isin(idx, drop.to(idx.device))
        return tuple(args), kwargs

    return pre
