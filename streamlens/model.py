"""Loading a model, and the architecture facts streamlens derives from the model itself.

``streamlens.load(source)`` returns a :class:`Model`: a ``TransformerBridge`` (TransformerLens 4.x)
plus an :class:`Architecture` that is *measured*, not looked up. At load time streamlens runs one
short probe input and checks, with the model's own numbers:

* which norm each norm module computes (LayerNorm, RMSNorm, Gemma's ``1 + w`` RMSNorm);
* the block's update rule (its *layout*):

  - ``pre``:      ``resid_mid = resid_pre + attn(ln1(resid_pre))``, ``resid_post = resid_mid + mlp(ln2(resid_mid))``
  - ``parallel``: ``resid_post = resid_pre + attn(ln1(resid_pre)) + mlp(ln2(resid_pre))``  (GPT-J, GPT-NeoX)
  - ``sandwich``: ``pre`` with an extra norm on each write, ``attn_write = ln1_post(attn(...))``  (Gemma 2)
  - ``post``:     ``resid_mid = ln1(resid_pre + attn(resid_pre))``, ``resid_post = ln2(resid_mid + mlp(resid_mid))``  (BERT)

* whether the first block's input is exactly the token (+ positional) embedding, whether the final
  norm reads the last block's output, and whether the logits are exactly ``unembed(ln_final(x))``.

A model that fits none of these is refused with an error that says which check failed.

Models always run in eval mode: ``load`` switches a model handed over in train mode to eval mode
with a warning; every streamlens verb refuses a model that was put back into train mode later.
"""

from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from streamlens import hooks
from streamlens.errors import StreamlensError, UnsupportedModelError
from streamlens.norms import NormKind, NormSpec, identify_norm

Layout = Literal["pre", "parallel", "sandwich", "post"]
_TOL = 1e-4


@dataclass(frozen=True)
class Architecture:
    """Facts about a model, derived from its modules and checked on a probe input."""

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int | None
    d_vocab: int
    n_ctx: int
    norm: NormKind
    layout: Layout
    positional: str
    has_pos_embed: bool
    embed_is_sum: bool
    final_norm: NormKind | None
    final_reads_last_resid: bool
    logits_are_unembed: bool
    unembed_bias: bool
    causal: bool

    @property
    def parallel(self) -> bool:
        """Attention and MLP read the same input (GPT-J, GPT-NeoX/Pythia)."""
        return self.layout == "parallel"

    @property
    def norm_placement(self) -> str:
        """``"pre"`` (norm on each sub-layer's read) or ``"post"`` (norm after the residual sum)."""
        return "post" if self.layout == "post" else "pre"

    @property
    def extra_norms(self) -> bool:
        """An extra norm on each sub-layer's write (Gemma 2's ``post_attention_layernorm``)."""
        return self.layout == "sandwich"

    @property
    def has_resid_mid(self) -> bool:
        return self.layout != "parallel"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(parallel=self.parallel, norm_placement=self.norm_placement, extra_norms=self.extra_norms)
        return d


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
        self.arch = _probe(self)
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
        lin = self.bridge.unembed.original_component
        w = lin.weight.detach()
        b = getattr(lin, "bias", None)
        return w, (b.detach() if isinstance(b, Tensor) else None)

    def head_weights(self, layer: int) -> tuple[Tensor, Tensor]:
        """``(W_O, b_O)`` of layer ``layer``'s output projection as an affine map measured on the module.

        ``W_O`` has shape ``(n_heads, d_head, d_model)``; ``o(z) = einsum(z_h, W_O[h]) summed over h + b_O``.
        Measured as ``o(I) - o(0)`` so it does not depend on the module's weight layout (Linear, Conv1D, ...).
        """
        if layer not in self._head_weights:
            o = hooks.block_component(self.bridge, layer, "o")
            if o is None:
                raise UnsupportedModelError(
                    f"layer {layer}'s attention has no separate output projection (attn.o), so per-head writes cannot be split"
                )
            o = o.original_component
            a = self.arch
            width = a.n_heads * a.d_head
            p = next(o.parameters())
            with torch.no_grad():
                b = o(torch.zeros(1, width, device=p.device, dtype=p.dtype)).float()[0]
                w = o(torch.eye(width, device=p.device, dtype=p.dtype)).float() - b
            self._head_weights[layer] = (w.reshape(a.n_heads, a.d_head, a.d_model), b)
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


# ---------------------------------------------------------------------- probing
def _rel(a: Tensor, b: Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _capture_all(model: Model, ids: Tensor, mask: Tensor) -> tuple[dict, Tensor]:
    rec: dict[tuple, Tensor] = {}
    attach = []
    b, p = ids.shape
    for layer in range(len(model.bridge.blocks)):
        for comp, side in hooks.BLOCK_POINTS:
            hp = hooks.block_point(model.bridge, layer, comp, side)
            if hp is not None:
                attach.append((hp, lambda t, k=(layer, comp, side): rec.__setitem__(k, hooks.select_positions_of(t, (b, p), None, None, all_positions=True).clone())))
    for comp, side in hooks.GLOBAL_POINTS:
        hp = hooks.global_point(model.bridge, comp, side)
        if hp is not None:
            attach.append((hp, lambda t, k=(None, comp, side): rec.__setitem__(k, hooks.select_positions_of(t, (b, p), None, None, all_positions=True).clone())))
    with torch.no_grad(), hooks.attached(attach):
        logits = model.run(ids, mask)
    return rec, logits


def _probe(model: Model) -> Architecture:
    bridge, cfg = model.bridge, model.bridge.cfg
    n_layers = len(bridge.blocks)
    d_model = int(cfg.d_model)
    d_vocab = int(getattr(cfg, "d_vocab_out", None) or cfg.d_vocab)
    n_ctx = int(cfg.n_ctx)

    # Norms: identified by running them.
    kinds = set()
    for layer in range(n_layers):
        for comp in ("ln1", "ln2", "ln1_post", "ln2_post"):
            c = hooks.block_component(bridge, layer, comp)
            if c is not None:
                spec = identify_norm(c.original_component, d_model, where=f"blocks.{layer}.{comp}")
                model.block_norms[(layer, comp)] = spec
                kinds.add(spec.kind)
    if not kinds:
        raise UnsupportedModelError(f"{model.name}: no normalisation layers found in its blocks")
    if len(kinds) > 1:
        raise UnsupportedModelError(f"{model.name}: blocks mix norm kinds {sorted(kinds)}")
    ln_final = getattr(bridge, "ln_final", None)
    if ln_final is not None:
        model.final_norm = identify_norm(ln_final.original_component, d_model, where="ln_final")

    # One short probe input through the model, every raw point recorded.
    n = min(6, n_ctx)
    ids = (torch.arange(n) * 7 + 3)[None] % d_vocab
    rec, logits = _capture_all(model, ids, torch.ones_like(ids, dtype=torch.bool))

    def pt(layer, comp, side):
        return rec.get((layer, comp, side))

    layouts = []
    for layer in range(n_layers):
        errs = _layout_errors(model, layer, pt)
        ok = [k for k, v in errs.items() if v <= _TOL]
        if not ok:
            detail = "; ".join(f"{k}: {v:.1e}" for k, v in errs.items()) or "no hook points to check"
            raise UnsupportedModelError(
                f"{model.name}: block {layer} follows none of the update rules streamlens knows "
                f"(pre-norm, parallel, pre-norm with extra norms, post-norm); relative error of each: {detail}"
            )
        layouts.append(ok[0])
    if len(set(layouts)) > 1:
        raise UnsupportedModelError(f"{model.name}: blocks follow different update rules: {layouts}")

    embed, pos = pt(None, "embed", "out"), pt(None, "pos_embed", "out")
    first = pt(0, "block", "in")
    embed_is_sum = embed is not None and first is not None and _rel(embed + (pos if pos is not None else 0), first) <= _TOL
    last_out, final_in = pt(n_layers - 1, "block", "out"), pt(None, "ln_final", "in")
    final_reads = last_out is not None and final_in is not None and _rel(final_in, last_out) <= _TOL
    unembed_out = pt(None, "unembed", "out")
    logits_are_unembed = unembed_out is not None and _rel(unembed_out, logits) <= _TOL
    w, b = model.unembed_weight()

    n_heads = int(cfg.n_heads)
    return Architecture(
        name=type(model.hf).__name__,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(getattr(cfg, "n_key_value_heads", None) or n_heads),
        d_model=d_model,
        d_head=int(cfg.d_head),
        d_mlp=int(cfg.d_mlp) if getattr(cfg, "d_mlp", None) else None,
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        norm=kinds.pop(),
        layout=layouts[0],
        positional=str(getattr(cfg, "positional_embedding_type", "unknown")),
        has_pos_embed=pos is not None,
        embed_is_sum=embed_is_sum,
        final_norm=model.final_norm.kind if model.final_norm else None,
        final_reads_last_resid=final_reads,
        logits_are_unembed=logits_are_unembed,
        # The bridge gives a bias-free lm_head an all-zero bias *buffer*; only a learned one counts.
        unembed_bias=b is not None and (isinstance(model.bridge.unembed.original_component.bias, nn.Parameter)
                                        or bool(b.abs().max() > 0)),
        causal=str(getattr(cfg, "attention_dir", "causal")) == "causal",
    )


def _layout_errors(model: Model, layer: int, pt) -> dict[str, float]:
    pre, post = pt(layer, "block", "in"), pt(layer, "block", "out")
    attn, mlp = pt(layer, "attn", "out"), pt(layer, "mlp", "out")
    ln1_in, ln1_out = pt(layer, "ln1", "in"), pt(layer, "ln1", "out")
    ln2_in, ln2_out = pt(layer, "ln2", "in"), pt(layer, "ln2", "out")
    a_post, m_post = pt(layer, "ln1_post", "out"), pt(layer, "ln2_post", "out")
    errs: dict[str, float] = {}
    if pre is None or post is None:
        return errs
    if a_post is not None and m_post is not None and ln2_in is not None:
        errs["sandwich"] = max(_rel(pre + a_post, ln2_in), _rel(ln2_in + m_post, post))
    if attn is not None and mlp is not None and ln2_in is not None and a_post is None:
        errs["pre"] = max(_rel(pre + attn, ln2_in), _rel(ln2_in + mlp, post), _rel(ln1_in, pre) if ln1_in is not None else 1.0)
    if attn is not None and mlp is not None and a_post is None:
        same_read = 0.0 if ln2_in is None else _rel(ln2_in, pre)
        errs["parallel"] = max(_rel(pre + attn + mlp, post), same_read)
    if ln1_in is not None and ln1_out is not None and ln2_in is not None and ln2_out is not None:
        n1, n2 = model.block_norms.get((layer, "ln1")), model.block_norms.get((layer, "ln2"))
        if n1 is not None and n2 is not None:
            errs["post"] = max(_rel(n1(ln1_in), ln1_out), _rel(n2(ln2_in), post), _rel(ln2_out, post))
    return errs


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

    from streamlens import zoo

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
