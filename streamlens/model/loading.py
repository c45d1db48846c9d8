"""Loading a model: the one :class:`Model` handle every streamlens verb takes.

``streamlens.load(source)`` returns a :class:`Model`: a ``TransformerBridge`` (TransformerLens 4.x)
plus an :class:`~streamlens.model.probe.Architecture` measured on the model at load time (see
:mod:`streamlens.model.probe`; the update rules are in :mod:`streamlens.model.layouts`).

What ``load`` guarantees, and what every verb checks before it runs (:meth:`Model.require_eval`):

* **Your model is not changed.** A HuggingFace model handed over in memory (``load(hf_model, tok)``)
  is deep-copied first: wrapping turns its sub-modules into bridge components and switches its
  attention to the eager implementation, so streamlens works on the copy and your model keeps its
  modules, attention implementation and outputs. ``in_place=True`` wraps it in place instead (no
  second copy of the weights, with a warning saying what changes).
* **Raw weights only.** A ``TransformerBridge`` in compatibility mode (layer norms folded, weights
  centred: ``enable_compatibility_mode()``) is refused: its per-component values differ from the raw
  model's, and every streamlens number is defined on the raw model.
* **Real tensors.** A model with parameters on the ``meta`` device (no data) is refused.
* **Eval mode.** ``load`` switches a model handed over in train mode to eval mode with a warning;
  every verb refuses a model any of whose sub-modules was put back into train mode (naming it).
* **Finite values.** Every forward (:meth:`Model.run`) checks each block's output and the logits
  (one ``isfinite`` reduction per block, one synchronisation per forward) and raises an error naming
  the first layer whose output is not finite.
* **One call at a time.** Each model has a lock (:func:`streamlens.model.hooks.model_lock`) held while
  streamlens' hooks are attached and the model runs: calls on one model from several threads are
  serialised (each waits for the other), so each gets the numbers it would get alone.
"""

from __future__ import annotations

import copy
import inspect
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from streamlens.errors import StreamlensError, UnsupportedModelError
from streamlens.model import affine, hooks
from streamlens.model.norms import NormSpec
from streamlens.model.probe import probe


class Model:
    """The one model handle every streamlens verb takes.

    Attributes:
        bridge: the ``TransformerBridge`` (TransformerLens 4.x) wrapping the HuggingFace model.
        hf: the HuggingFace model inside it (its sub-modules are bridge components with hook points).
        tokenizer: the HuggingFace tokenizer, or None.
        arch: the measured :class:`Architecture`.
        name: where the model came from (folder, hub name or short name).
    """

    def __init__(self, bridge: nn.Module, *, name: str | None = None):
        if getattr(bridge, "compatibility_mode", False):
            raise UnsupportedModelError(
                "this TransformerBridge is in compatibility mode (layer norms folded, weights centred), so per-component "
                "values differ from the raw model's; streamlens measures the raw model: load it without "
                "enable_compatibility_mode()"
            )
        self.bridge = bridge
        self.hf = bridge.original_model
        hooks.register_model(bridge)
        _refuse_meta(bridge, name or type(bridge.original_model).__name__)
        self.tokenizer = bridge.tokenizer
        self.name = name or str(getattr(bridge.cfg, "model_name", type(self.hf).__name__))
        if self.hf.training:
            warnings.warn(
                f"{self.name} was in train mode (dropout on); streamlens switched it to eval mode",
                stacklevel=3,
            )
        self.hf.eval()
        self.bridge.eval()
        self._forward_kwargs = set(inspect.signature(self.hf.forward).parameters)
        self.final_norm: NormSpec | None = None
        self.block_norms: dict[tuple[int, str], NormSpec] = {}
        self.arch = probe(self)
        self._head_weights: dict[int, tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    def require_eval(self) -> None:
        """Refuse a model that cannot give its own numbers now: any sub-module in train mode (dropout would add
        noise), or parameters moved to the ``meta`` device."""
        if getattr(self.bridge, "compatibility_mode", False):
            raise UnsupportedModelError(f"{self.name} was put into compatibility mode (folded/centred weights) after "
                                        "loading; streamlens measures the raw model: load it again")
        for module in (self.hf, self.bridge):  # the HuggingFace names first: they are the ones a user knows
            name = next((n.replace("._original_component", "") or "the whole model"
                         for n, m in module.named_modules() if m.training), None)
            if name is not None:
                raise StreamlensError(
                    f"{self.name} is (partly) in train mode (dropout on), which makes every result noisy: {name!r} "
                    "is in train mode; call model.eval() first"
                )
        _refuse_meta(self.bridge, self.name)

    def check_layer(self, layer: int) -> int:
        from streamlens.stream.inputs import as_int

        n = self.arch.n_layers
        layer = as_int(layer, "layer")
        if not -n <= layer < n:
            raise StreamlensError(f"layer {layer} is out of range for a {n}-layer model")
        return layer % n

    def check_layers(self, layers) -> tuple[int, ...]:
        if layers is None:
            return tuple(range(self.arch.n_layers))
        from streamlens.stream.inputs import is_int_like

        if is_int_like(layers):
            layers = [layers]
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise StreamlensError(f"layers must be an int, a list of ints or None, got {layers!r}")
        out = sorted({self.check_layer(l) for l in layers})
        if not out:
            raise StreamlensError("layers is empty: choose at least one layer")
        return tuple(out)

    def run(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        """The HuggingFace forward on a right-padded batch; returns logits ``(batch, pos, vocab)``."""
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device).long()}
        if "use_cache" in self._forward_kwargs:
            kwargs["use_cache"] = False
        finite: list[tuple[int, Tensor]] = []  # (layer, all finite?) per block, checked once after the forward
        watch = [(hp, lambda t, l=l: finite.append((l, torch.isfinite(t).all())))
                 for l in range(self.arch.n_layers) if (hp := hooks.block_point(self.bridge, l, "block", "out")) is not None] \
            if hasattr(self, "arch") else []
        with hooks.model_lock(self.bridge), hooks.attached(watch):
            out = self.hf(**kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        ok = torch.isfinite(logits).all()
        if finite:
            ok = ok & torch.stack([f for _, f in finite]).all()
        if not bool(ok):
            bad = [l for l, f in finite if not bool(f)]
            where = f"the output of layer {min(bad)} (block {min(bad)} of {self.arch.n_layers})" if bad else "the logits"
            raise StreamlensError(
                f"{self.name} produced non-finite values (NaN or inf), first in {where}: check the weights of that layer "
                "and the dtype (float16 overflows)"
            )
        return logits

    # ------------------------------------------------------------------ weights
    def unembed_weight(self) -> tuple[Tensor, Tensor | None]:
        """``(W, b)`` of the unembedding: ``logits = x @ W.T + b``, W of shape ``(d_vocab, d_model)``."""
        return affine.unembedding(self)

    def head_weights(self, layer: int) -> tuple[Tensor, Tensor]:
        """``(W_O, b_O)`` of layer ``layer``'s output projection, ``W_O`` of shape ``(n_heads, d_head, d_model)``
        (see :func:`streamlens.model.affine.output_projection`); measured once per layer."""
        if layer not in self._head_weights:
            self._head_weights[layer] = affine.output_projection(self, layer)
        return self._head_weights[layer]

    # ------------------------------------------------------------------ display
    def __repr__(self) -> str:
        a = self.arch
        return (
            f"Model({self.name!r}: {a.name}, {a.n_layers} layers, d_model {a.d_model}, {a.n_heads} heads"
            f" ({a.n_kv_heads} kv), {a.norm}, {a.layout} layout)"
        )

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in self.arch.to_dict().items())
        return f"<b>streamlens.Model</b> <code>{self.name}</code><table>{rows}</table>"


# ---------------------------------------------------------------------- loading
def _refuse_meta(module: nn.Module, name: str) -> None:
    meta = next((n for n, p in module.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise StreamlensError(f"{name} has parameters on the 'meta' device (no data), e.g. {meta!r}: "
                              "load real weights (or move the model to 'cpu'/'cuda' with its weights) first")


def _check_device(device) -> None:
    """Refuse a device this torch build cannot use, before anything loads."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise StreamlensError(f"unknown device {device!r} ({str(e).splitlines()[0]})") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StreamlensError(f"device {device!r} asked for, but this torch build ({torch.__version__}) sees no CUDA "
                              "GPU; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise StreamlensError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) exist")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise StreamlensError(f"device {device!r} asked for, but MPS is not available here")
    if dev.type == "meta":
        raise StreamlensError("device 'meta' holds no data: streamlens needs real tensors")


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
    if dtype not in names:
        raise StreamlensError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def load(source: Any, tokenizer: Any = None, *, device: str | torch.device | None = None, dtype=None,
         in_place: bool = False, device_map: str | dict | None = None, n_devices: int | None = None,
         max_memory: dict | None = None) -> Model:
    """Load a model into a streamlens :class:`Model`.

    Args:
        source: a folder saved with ``save_pretrained`` (works offline), a HuggingFace hub name (same
            code path, needs the network), a short name streamlens knows (``"smollm2-135m"``), an
            existing ``TransformerBridge``, a HuggingFace ``PreTrainedModel`` (pass its ``tokenizer``
            too), or a :class:`Model` (returned as it is).
        tokenizer: the tokenizer for an in-memory HuggingFace model.
        device: ``"cpu"``, ``"cuda"``, ... (default: CPU).
        dtype: ``torch.float32`` (default), ``"bfloat16"``, ...
        in_place: for a HuggingFace model passed in memory: wrap it in place instead of a deep copy.
        device_map, n_devices, max_memory: multi-device placement, passed through to the bridge
            (``TransformerBridge.boot_transformers``, accelerate-dispatched): ``device_map="auto"`` or a
            dict of module name -> device, or ``n_devices=N``; exclusive with ``device``.

    A HuggingFace model passed in memory is deep-copied (with its tokenizer) and the copy is wrapped:
    wrapping turns sub-modules into bridge components and switches attention to the eager
    implementation, which would change your model. ``in_place=True`` saves the copy's memory and
    warns that your model is being rewired.
    """
    from transformer_lens.model_bridge import TransformerBridge

    from streamlens.model import zoo

    torch_dtype = _parse_dtype(dtype)
    _check_device(device)
    placement = {k: v for k, v in (("device_map", device_map), ("n_devices", n_devices), ("max_memory", max_memory))
                 if v is not None}
    if placement and device is not None:
        raise StreamlensError(f"device={device!r} and {', '.join(placement)} are exclusive: give one placement")
    if isinstance(source, Model):
        return source
    if isinstance(source, TransformerBridge):
        return Model(source)
    if isinstance(source, nn.Module) and hasattr(source, "config"):
        name = getattr(source.config, "_name_or_path", "") or type(source).__name__
        _refuse_meta(source, name)
        if in_place:
            warnings.warn(f"load(..., in_place=True) rewires {name} in place: its sub-modules become bridge components "
                          "and its attention switches to the eager implementation", stacklevel=2)
        else:
            source, tokenizer = copy.deepcopy(source), copy.deepcopy(tokenizer)
        bridge = TransformerBridge.boot_transformers(
            name, hf_model=source, tokenizer=tokenizer, device=device, **({"dtype": torch_dtype} if torch_dtype else {})
        )
        return Model(bridge, name=name)
    if isinstance(source, os.PathLike):
        source = str(source)
    if not isinstance(source, str) or not source:
        raise StreamlensError(
            f"cannot load a model from {type(source).__name__}: pass a folder, a hub name, a short name "
            f"({', '.join(zoo.KNOWN)}), a TransformerBridge or a HuggingFace model"
        )
    if source in zoo.KNOWN:
        folder = zoo.materialise(source)
        return _boot(str(folder), device, torch_dtype, name=source, **placement)
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise StreamlensError(f"model folder {source!r} has no config.json (save it with save_pretrained)")
        # absolute: a relative folder named like a TransformerLens alias ("mixtral") would be looked up on the hub
        return _boot(str(path.resolve()), device, torch_dtype, name=source, **placement)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise StreamlensError(f"model folder {source!r} does not exist")
    return _boot(source, device, torch_dtype, name=source, **placement)


def _boot(where: str, device, dtype, *, name: str, **placement) -> Model:
    from transformer_lens.model_bridge import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(where, device=device, **({"dtype": dtype} if dtype else {}),
                                                     **placement)
    except (OSError, ValueError, KeyError, AttributeError, RuntimeError, NotImplementedError) as e:
        detail = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if Path(where).expanduser().is_dir():  # a folder that exists: the bridge could not place or build it
            raise UnsupportedModelError(
                f"could not load model folder {where!r}: TransformerBridge cannot build this model ({detail})"
            ) from e
        if not isinstance(e, (OSError, ValueError)):
            raise
        raise StreamlensError(
            f"could not load model {where!r}: not a local folder, and the HuggingFace hub did not provide it ({detail})"
        ) from e
    return Model(bridge, name=name)


def as_model(model: Any) -> Model:
    """Accept a :class:`Model` or anything :func:`load` takes."""
    m = model if isinstance(model, Model) else load(model)
    m.require_eval()
    return m
