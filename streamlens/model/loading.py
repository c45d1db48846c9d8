"""Loading a model: the one :class:`Model` handle every streamlens verb takes.

``streamlens.load(source)`` returns a :class:`Model`: a ``TransformerBridge`` (TransformerLens 4.x)
plus an :class:`~streamlens.model.probe.Architecture` measured on the model at load time (see
:mod:`streamlens.model.probe`; the update rules are in :mod:`streamlens.model.layouts`).

Models always run in eval mode: ``load`` switches a model handed over in train mode to eval mode
with a warning; every streamlens verb refuses a model that was put back into train mode later.
"""

from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from streamlens.errors import StreamlensError, UnsupportedModelError
from streamlens.model import affine
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
        self.bridge = bridge
        self.hf = bridge.original_model
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
        """Refuse to run a model that was put into train mode after loading (dropout would add noise)."""
        if self.hf.training or self.bridge.training:
            raise StreamlensError(
                f"{self.name} is in train mode (dropout on), which makes every result noisy; call model.eval() first"
            )

    def check_layer(self, layer: int) -> int:
        n = self.arch.n_layers
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise StreamlensError(f"layer must be an int, got {layer!r}")
        if not -n <= layer < n:
            raise StreamlensError(f"layer {layer} is out of range for a {n}-layer model")
        return layer % n

    def check_layers(self, layers) -> tuple[int, ...]:
        if layers is None:
            return tuple(range(self.arch.n_layers))
        if isinstance(layers, int):
            layers = [layers]
        out = sorted({self.check_layer(l) for l in layers})
        if not out:
            raise StreamlensError("layers is empty: choose at least one layer")
        return tuple(out)

    def run(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        """The HuggingFace forward on a right-padded batch; returns logits ``(batch, pos, vocab)``."""
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device).long()}
        if "use_cache" in self._forward_kwargs:
            kwargs["use_cache"] = False
        out = self.hf(**kwargs)
        return out.logits if hasattr(out, "logits") else out[0]

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
def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
    if dtype not in names:
        raise StreamlensError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def load(source: Any, tokenizer: Any = None, *, device: str | torch.device | None = None, dtype=None) -> Model:
    """Load a model into a streamlens :class:`Model`.

    Args:
        source: a folder saved with ``save_pretrained`` (works offline), a HuggingFace hub name (same
            code path, needs the network), a short name streamlens knows (``"smollm2-135m"``), an
            existing ``TransformerBridge``, a HuggingFace ``PreTrainedModel`` (pass its ``tokenizer``
            too), or a :class:`Model` (returned as it is).
        tokenizer: the tokenizer for an in-memory HuggingFace model.
        device: ``"cpu"``, ``"cuda"``, ... (default: CPU).
        dtype: ``torch.float32`` (default), ``"bfloat16"``, ...

    A HuggingFace model passed in memory is wrapped *in place* (its sub-modules become bridge
    components); its outputs do not change.
    """
    from transformer_lens.model_bridge import TransformerBridge

    from streamlens.model import zoo

    torch_dtype = _parse_dtype(dtype)
    if isinstance(source, Model):
        return source
    if isinstance(source, TransformerBridge):
        return Model(source)
    if isinstance(source, nn.Module) and hasattr(source, "config"):
        name = getattr(source.config, "_name_or_path", "") or type(source).__name__
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
        return _boot(str(folder), device, torch_dtype, name=source)
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise StreamlensError(f"model folder {source!r} has no config.json (save it with save_pretrained)")
        return _boot(str(path), device, torch_dtype, name=source)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise StreamlensError(f"model folder {source!r} does not exist")
    return _boot(source, device, torch_dtype, name=source)


def _boot(where: str, device, dtype, *, name: str) -> Model:
    from transformer_lens.model_bridge import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(where, device=device, **({"dtype": dtype} if dtype else {}))
    except (OSError, ValueError) as e:
        raise StreamlensError(
            f"could not load model {where!r}: not a local folder, and the HuggingFace hub did not provide it "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from e
    return Model(bridge, name=name)


def as_model(model: Any) -> Model:
    """Accept a :class:`Model` or anything :func:`load` takes."""
    m = model if isinstance(model, Model) else load(model)
    m.require_eval()
    return m
