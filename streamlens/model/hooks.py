"""Where streamlens listens: the bridge's hook points, and a context that always detaches.

A ``TransformerBridge`` wraps each HuggingFace sub-module in a component with ``hook_in`` and
``hook_out`` points (identity modules). streamlens attaches plain PyTorch forward hooks to those
points for the duration of one call and removes every one of them in a ``finally`` block, so a
failed call leaves the model exactly as it was. The component names are the bridge's, the same for
every architecture it supports: ``blocks[l].{ln1, attn, ln2, mlp, ln1_post, ln2_post}``, ``embed``,
``pos_embed``, ``ln_final``, ``unembed``. Where the bridge wraps a block whole (RecurrentGemma, Zamba 2's
hybrid blocks), the HuggingFace sub-modules that fill its slots (:data:`HF_PARTS`) are hooked directly,
on their input or output (:class:`Side`).

Threads: hooks on a module fire for every forward through it, whichever thread runs it, so two
calls on one model at once would see each other's tensors. Each model therefore has one lock
(:func:`model_lock`, re-entrant), held by :func:`attached` while its hooks are on and by
``Model.run`` while the model runs: concurrent calls on one model are serialised (the second waits
for the first), and each gets exactly the numbers it would get alone. Different models run in parallel.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

#: Raw hook points inside one block, as ``(component, "in" | "out")``.
BLOCK_POINTS: tuple[tuple[str, str], ...] = (
    ("block", "in"),
    ("ln1", "in"),
    ("ln1", "out"),
    ("attn", "in"),
    ("attn", "out"),
    ("ln1_post", "out"),
    ("ln2", "in"),
    ("ln2", "out"),
    ("mlp", "in"),
    ("mlp", "out"),
    ("ln2_post", "out"),
    ("block", "out"),
    ("o", "in"),
)

GLOBAL_POINTS: tuple[tuple[str, str], ...] = (
    ("embed", "out"),
    ("pos_embed", "out"),
    ("ln_final", "in"),
    ("ln_final", "out"),
    ("unembed", "in"),
    ("unembed", "out"),
)

HookFn = Callable[[Tensor], Tensor | None]


def child(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return getattr(module, name)
    except AttributeError:
        return None


#: A block is a set of writers in two slots: the token mixer (``attn``: attention, or the bridge's ``mixer``
#: for SSM/Mamba blocks, ``linear_attn`` for linear attention / gated DeltaNet, ``conv`` for short
#: convolutions) and the channel mixer (``mlp``: an MLP or a mixture of experts). A slot name resolves to
#: whichever of these components the block has, in this order; ``ln1`` is also the bridge's ``norm`` of
#: single-writer (Mamba-style) blocks.
SLOTS: dict[str, tuple[str, ...]] = {
    "attn": ("attn", "mixer", "linear_attn", "conv"),
    "mlp": ("mlp",),
    "ln1": ("ln1", "norm"),
}


def writer_name(bridge: nn.Module, layer: int, slot: str) -> str | None:
    """The bridge's name of the component filling ``slot`` (``"attn"``/``"mlp"``) in block ``layer``, or None
    (the slot's own name where the bridge wraps the block whole and a HuggingFace sub-module fills it)."""
    block = bridge.blocks[layer]
    name = next((name for name in SLOTS.get(slot, (slot,)) if child(block, name) is not None), None)
    if name is None and slot in ("attn", "mlp"):
        return next((writer for path, writer in HF_PARTS[slot] if _hf_child(bridge, layer, path) is not None), None)
    return name


#: Where the bridge wraps a block whole and exposes none of its sub-layers (RecurrentGemma, Zamba 2's hybrid
#: blocks), the HuggingFace sub-modules stand in for the bridge's components; streamlens then hooks their
#: outputs and inputs directly (:class:`Side`). Per component, ``(dotted path, writer name)`` tried in order.
HF_PARTS: dict[str, tuple[tuple[str, str], ...]] = {
    "ln1": (("temporal_pre_norm", "ln1"), ("mamba_decoder.input_layernorm", "ln1")),
    "attn": (("temporal_block", "attn"), ("mamba_decoder.mamba", "mixer")),
    "ln2": (("channel_pre_norm", "ln2"),),
    "mlp": (("mlp_block", "mlp"),),
}


def _wrapped_whole(block: nn.Module) -> bool:
    return not any(hasattr(m, "hook_out") for n, m in block.named_children() if not n.startswith("_"))


def _hf_part(bridge: nn.Module, layer: int, component: str) -> nn.Module | None:
    """The HuggingFace sub-module standing in for ``component`` of a block the bridge wraps whole, or None."""
    if component not in HF_PARTS:
        return None
    return next((m for path, _ in HF_PARTS[component] if (m := _hf_child(bridge, layer, path)) is not None), None)


def _hf_child(bridge: nn.Module, layer: int, path: str) -> nn.Module | None:
    block = bridge.blocks[layer]
    module = getattr(block, "original_component", None)
    if module is None or not _wrapped_whole(block):
        return None
    for part in path.split("."):
        module = None if module is None else child(module, part)
    return module


@dataclass(frozen=True)
class Side:
    """A hook point on a plain (HuggingFace) module: its input (``"in"``, first argument) or output (``"out"``,
    the first element of a tuple output). :func:`attached` hooks it like a bridge HookPoint."""

    module: nn.Module
    side: str


def block_component(bridge: nn.Module, layer: int, component: str) -> nn.Module | None:
    """The bridge component ``component`` of block ``layer`` (``"block"`` for the block itself).

    ``component`` may be a slot (:data:`SLOTS`) or a dotted path inside one (``"attn.o"``, ``"mlp.out"``).
    """
    block = bridge.blocks[layer]
    if component == "block":
        return block
    if component == "o":
        attn = child(block, "attn")
        return None if attn is None else child(attn, "o")
    head, _, rest = component.partition(".")
    name = writer_name(bridge, layer, head)
    module = None if name is None else child(block, name)
    if module is None and not rest:
        return _hf_part(bridge, layer, component)
    for part in rest.split(".") if rest else ():
        module = None if module is None else child(module, part)
    return module


def hook_point(component: nn.Module | None, side: str) -> nn.Module | Side | None:
    if component is None:
        return None
    if not hasattr(component, "hook_out"):  # a HuggingFace sub-module standing in for a bridge component
        return Side(component, side)
    return child(component, f"hook_{side}")


def block_point(bridge: nn.Module, layer: int, component: str, side: str) -> nn.Module | None:
    """The HookPoint for ``(component, side)`` of block ``layer``, or None where the model has none."""
    return hook_point(block_component(bridge, layer, component), side)


def global_point(bridge: nn.Module, component: str, side: str) -> nn.Module | None:
    return hook_point(child(bridge, component), side)


def param_device(module: nn.Module, default: torch.device) -> torch.device:
    """Where ``module`` computes: its first parameter's device (``default`` without one, or on ``meta``:
    weights offloaded by a ``device_map`` are brought in by the module's own hooks). With blocks on several
    devices, a tensor replayed into a block, or a mean write added in it, is moved here first."""
    p = next(module.parameters(), None)
    return default if p is None or p.device.type == "meta" else p.device


# every module of a registered model -> that model's lock (weak: a model that is dropped is forgotten)
_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()


def register_model(root: nn.Module) -> None:
    """Give ``root`` and each of its sub-modules the model's one lock (see :func:`model_lock`)."""
    lock = _LOCKS.get(root) or threading.RLock()
    for m in root.modules():
        _LOCKS[m] = lock


def model_lock(module: nn.Module):
    """The lock of the model ``module`` belongs to (re-entrant), or a no-op for a module of no registered model."""
    return _LOCKS.get(module) or nullcontext()


class PreHook:
    """A forward pre-hook ``fn(module, args, kwargs) -> (args, kwargs)`` for :func:`attached`."""

    def __init__(self, fn: Callable):
        self.fn = fn


@contextmanager
def attached(hooks: Sequence[tuple[nn.Module, HookFn]], *, model: nn.Module | None = None) -> Iterator[None]:
    """Attach ``fn`` as a forward hook on each module for the duration of the block.

    ``fn`` receives the module's output tensor; a non-None return value replaces it (used for
    interventions). Every handle is removed on exit, whether the block ended normally or raised.
    The model's lock (:func:`model_lock`) is held meanwhile, so no other thread's forward sees these hooks:
    the lock of ``model`` (any of its modules) when given (needed where the caller runs the model's modules
    itself, with or without hooks), else that of the first hooked module.
    """
    handles = []
    owner = model if model is not None else (_module_of(hooks[0][0]) if hooks else None)
    with model_lock(owner) if owner is not None else nullcontext():
        try:
            for module, fn in hooks:
                if isinstance(module, Side):
                    handles.append(module.module.register_forward_hook(_wrap_output(fn)) if module.side == "out" else
                                   module.module.register_forward_pre_hook(_wrap_input(fn), with_kwargs=True))
                elif isinstance(fn, PreHook):  # changes a module's inputs (an expert's routing weight)
                    handles.append(module.register_forward_pre_hook(fn.fn, with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(_wrap(fn)))
            yield
        finally:
            for h in handles:
                h.remove()


def _module_of(point) -> nn.Module:
    return point.module if isinstance(point, Side) else point


def _wrap(fn: HookFn):
    def hook(module: nn.Module, args, output):
        if isinstance(output, torch.Tensor):
            return fn(output)
        return None

    return hook


def _wrap_output(fn: HookFn):
    """For a :class:`Side`: the output tensor, or the first element of a HuggingFace module's tuple output."""
    def hook(module: nn.Module, args, output):
        if isinstance(output, torch.Tensor):
            return fn(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):  # (hidden, extra)
            new = fn(output[0])
            return None if new is None else (new, *output[1:])
        return None

    return hook


def _wrap_input(fn: HookFn):
    def pre(module: nn.Module, args, kwargs):
        if args and isinstance(args[0], torch.Tensor):
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        key = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
        new = None if key is None else fn(kwargs[key])
        return None if new is None else (args, {**kwargs, key: new})

    return pre


def select_positions_of(t: Tensor, shape: tuple[int, int], bidx: Tensor | None, pidx: Tensor | None, *,
                        all_positions: bool = False) -> Tensor:
    """A hook's tensor as ``(batch, sel, ...)`` at positions ``pidx`` (``bidx = arange(batch)[:, None]``).

    ``shape`` is the batch's ``(batch, pos)``. Handles the shapes models hand to hooks: ``(batch * pos, d)``
    (OPT flattens before ln2) and ``(1, pos, d)`` (learned positional embeddings, shared by the batch).
    With ``all_positions`` every position is kept and nothing is gathered.
    """
    b, p = shape
    t = t.detach()
    if t.dim() == 2 and t.shape[0] == b * p:
        t = t.reshape(b, p, t.shape[-1])
    if t.shape[0] == 1 and b > 1:
        t = t.expand(b, *t.shape[1:])
    return t if all_positions else t[bidx, pidx]
