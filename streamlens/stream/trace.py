"""Capture every read from and write to the residual stream.

For each layer ``l`` a sub-layer *reads* the stream (``attn_read``), normalises what it read
(``attn_read_normed``, what it computes on) and *writes* an update back (``attn_out``, alias
``attn_write``); likewise ``mlp_*``. Between them sit ``resid_pre``, ``resid_mid`` (sequential
blocks only) and ``resid_post``. What the names mean follows the model's measured layout
(its rule is in :mod:`streamlens.model.layouts`; the engine is :mod:`streamlens.stream.engine`):

=================  =======================  ==================  =====================  ==========================
name               pre-norm (GPT-2, Llama)  parallel (NeoX)     sandwich (Gemma 2)     post-norm (BERT)
=================  =======================  ==================  =====================  ==========================
attn_read          resid_pre                resid_pre           resid_pre              resid_pre
attn_read_normed   ln1(resid_pre)           ln1(resid_pre)      ln1(resid_pre)         resid_pre (no norm)
attn_out           attn(...)                attn(...)           ln1_post(attn(...))    ln1 input − resid_pre
resid_mid          resid_pre + attn_out     —                   resid_pre + attn_out   ln1(resid_pre + attn_out)
mlp_read           resid_mid                resid_pre           resid_mid              resid_mid
mlp_out            mlp(ln2(resid_mid))      mlp(ln2(resid_pre)) ln2_post(mlp(...))     ln2 input − resid_mid
resid_post         resid_mid + mlp_out      pre + attn + mlp    resid_mid + mlp_out    ln2(resid_mid + mlp_out)
=================  =======================  ==================  =====================  ==========================

In the post-sub-layer-norm layout (OLMo 2) ``attn_read_normed`` is ``resid_pre`` itself and
``attn_out = ln1_post(attn(resid_pre))``; single-writer blocks (Mamba) have only ``attn_*`` and no
``resid_mid``. The ``attn`` names are the block's token mixer whatever it is: in a hybrid model's SSM,
linear-attention or convolution block they can also be read as ``mixer_out``, ``linear_attn_out``,
``conv_out`` (and ``*_read``, ``*_read_normed``), the bridge's names (``model.arch.writers`` lists them).

More writers than two: Falcon-H1's Mamba mixer writes beside attention on the same read, as
``mamba_out`` (``mamba_read``, ``mamba_read_normed``), and ``resid_mid = resid_pre + attn_out + mamba_out``
(each write times its own output multiplier; ``*_read_normed`` is what each mixer receives). Gemma 4
adds a per-layer-input write after the MLP, ``ple_out``, reading ``ple_read = resid_mid + mlp_out``, and
scales the whole stream at the end of the block: ``resid_post = s · (ple_read + ple_out)``.

``head_out`` (``heads=True``, attention blocks only) has shape ``(batch, pos, head, d_model)``: head ``h``'s write
``z_h @ W_O[h]``; ``head_out.sum(head) + attn_bias_out == attn_out`` (for Gemma 2's extra norm, at
that norm's scale on this input). Globals: ``embed``, ``pos_embed``, ``final_in``, ``final_scale``,
``final_out`` and ``logits``.

Attention reads across positions (``patterns=True``, see :mod:`streamlens.stream.attention`):
``pattern`` ``(batch, sel, head, source)``, the rows of each head's attention pattern at the traced
query positions over every source position; with ``sources=True`` also ``head_source_out``
``(batch, sel, head, source, d_model)``, each head's write split by the source position it read,
``head_source_out.sum(source) == head_out``.

Example:
    >>> tr = streamlens.trace(model, ["The cat sat", "Hello"], positions="last")
    >>> tr["resid_post", 3].shape          # (batch, selected positions, d_model)
    >>> tr.stack("attn_out").labels        # ('attn_out.0', 'attn_out.1', ...)
    >>> tr.closure_error()                 # <= 1e-5 on pre-norm models in float32
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from streamlens.errors import StreamlensError
from streamlens.model import hooks
from streamlens.model.layouts import SUBLAYERS
from streamlens.model.loading import Model, as_model
from streamlens.model.norms import NormSpec
from streamlens.model.precision import up
from streamlens.model.probe import Architecture
from streamlens.present.results import Result, fmt
from streamlens.stream.attention import AttentionReader, source_writes
from streamlens.stream.engine import GLOBAL_NAMES, LAYER_NAMES, capture, check_sublayers
from streamlens.stream.inputs import Inputs, Positions, encode, recorded, select_positions

ALIASES = {"attn_write": "attn_out", "mlp_write": "mlp_out", "head_write": "head_out"}
#: Per-layer names of a trace: the engine's, plus the attention reads (``patterns=True`` / ``sources=True``).
TRACE_NAMES = LAYER_NAMES + ("pattern", "head_source_out", "ple_read", "ple_out")
#: The axes after ``(layer, batch, sel)`` of each per-layer name in a :class:`LayerStack`.
_DIMS = {"head_out": ("head", "d_model"), "pattern": ("head", "source"), "head_source_out": ("head", "source", "d_model")}


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True)
class LayerStack:
    """A stack of one named tensor over layers, with its labels: ``tensor[i]`` is layer ``layers[i]``."""

    name: str
    layers: tuple[int, ...]
    tensor: Tensor  # (layer, batch, pos, ...)
    dims: tuple[str, ...]

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(f"{self.name}.{l}" for l in self.layers)


@dataclass(frozen=True, eq=False)
class ResidualTrace(Result):
    """Every captured read and write of the residual stream for one batch of inputs.

    Index with ``trace[name, layer]`` (e.g. ``trace["attn_out", 3]``) or ``trace[name]`` for a
    global (``"embed"``, ``"final_out"``, ``"logits"``). Every tensor has shape
    ``(batch, sel, ...)`` where ``sel`` indexes ``positions`` (absolute token positions, per input)
    and ``mask`` says which entries are real tokens (padding is False).
    """

    model_name: str
    arch: Architecture
    input_ids: Int[Tensor, "batch pos"]
    str_tokens: tuple[tuple[str, ...], ...]
    positions: Int[Tensor, "batch sel"]
    mask: Bool[Tensor, "batch sel"]
    layers: tuple[int, ...]
    sublayers: tuple[str, ...]
    acts: Mapping[tuple[str, int | None], Tensor] = field(repr=False)
    norms: Mapping[Any, NormSpec] = field(repr=False, default_factory=dict)

    def __post_init__(self):
        if self.positions.shape != self.mask.shape:
            raise StreamlensError(f"positions {tuple(self.positions.shape)} and mask {tuple(self.mask.shape)} differ in shape")

    # -------------------------------------------------------------- access
    def _key(self, name: str, layer: int | None) -> tuple[str, int | None]:
        name = ALIASES.get(name, name)
        if name in GLOBAL_NAMES:
            return name, None
        name = self._writer_alias(name, layer)
        if name not in TRACE_NAMES and not self._co_writer_name(name):
            raise StreamlensError(f"unknown name {name!r}; layer names: {TRACE_NAMES}; globals: {GLOBAL_NAMES}")
        if layer is None:
            raise StreamlensError(f"{name!r} is per layer: use trace[{name!r}, layer]")
        n = self.arch.n_layers
        if not -n <= layer < n:
            raise StreamlensError(f"layer {layer} is out of range for a {n}-layer model")
        return name, layer % n

    def _co_writer_name(self, name: str) -> bool:
        """``mamba_out`` / ``mamba_read`` / ``mamba_read_normed``: a writer beside the token mixer (Falcon-H1)."""
        return any(name in (f"{c}_out", f"{c}_read", f"{c}_read_normed") for c in self.arch.co_writers)

    def _writer_alias(self, name: str, layer: int | None) -> str:
        """``mixer_out`` / ``linear_attn_read_normed`` / ``conv_out``: the token-mixer slot (``attn_*``) of a
        block whose token mixer the bridge calls that (SSM, linear-attention and convolution blocks)."""
        kind = next((k for k in ("linear_attn", "mixer", "conv") if name.startswith(k + "_")), None)
        if kind is None or f"attn_{name[len(kind) + 1:]}" not in LAYER_NAMES or layer is None:
            return name
        n = self.arch.n_layers
        slot = f"attn_{name[len(kind) + 1:]}"
        if not -n <= layer < n or not self.arch.writers:
            return slot
        actual = self.arch.writers[layer % n][0]
        if actual != kind:
            raise StreamlensError(f"layer {layer % n}'s token mixer is {actual!r}, not {kind!r}: read it as "
                                  f"trace[{slot!r}, {layer % n}]")
        return slot

    def __getitem__(self, key) -> Tensor:
        name, layer = (key, None) if isinstance(key, str) else key
        k = self._key(name, layer)
        if k not in self.acts:
            if k[1] is not None and k[1] not in self.layers:
                raise StreamlensError(f"layer {k[1]} was not traced (traced layers: {list(self.layers)})")
            raise StreamlensError(f"{k[0]!r} was not captured for this model/trace (sublayers={self.sublayers})")
        return self.acts[k]

    def get(self, name: str, layer: int | None = None) -> Tensor:
        return self[name, layer]

    def stack(self, name: str) -> LayerStack:
        """``name`` over every traced layer: a :class:`LayerStack` of shape ``(layer, batch, sel, ...)``."""
        ts = [self[name, l] for l in self.layers]
        name = ALIASES.get(name, name)
        return LayerStack(name, self.layers, torch.stack(ts), ("layer", "batch", "sel") + _DIMS.get(name, ("d_model",)))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k[0] for k in self.acts))

    # -------------------------------------------------------------- checks
    def closure_error(self) -> float:
        """Largest relative deviation, over layers and real positions, from the model's own update rule.

        The rule is the layout's (:meth:`streamlens.model.layouts.Layout.equations`): for pre-norm
        ``resid_mid = resid_pre + attn_out`` and ``resid_post = resid_mid + mlp_out``; for post-norm
        with the model's own norms. With heads, also ``head_out.sum(head) + attn_bias_out = attn_out``;
        and the first block's input against the embeddings, where they sum to it. Each deviation is
        ``‖predicted − recorded‖ / ‖recorded‖`` per position.
        """
        if set(self.sublayers) != set(SUBLAYERS):
            raise StreamlensError("closure_error needs both sub-layers traced (sublayers=('attn', 'mlp'))")
        worst = torch.zeros(())
        m = self.mask

        def dev(predicted, recorded):
            predicted, recorded = predicted.float(), recorded.float()
            r = (predicted - recorded).norm(dim=-1) / recorded.norm(dim=-1).clamp_min(1e-12)
            return r[m].max() if m.any() else torch.zeros(())

        for l in self.layers:
            rule = self.arch.rule_of(l)
            named = {k: v for (k, layer), v in self.acts.items() if layer == l}
            errs = [dev(predicted, recorded) for _, recorded, predicted in
                    rule.equations(named, lambda comp, l=l: self.norms[(l, comp)])]
            if "head_out" in named:
                errs.append(dev(named["head_out"].float().sum(-2) + named["attn_bias_out"].float(), named["attn_out"]))
            if "head_source_out" in named:  # the per-source split of each head's write
                errs.append(dev(named["head_source_out"].float().sum(-2), named["head_out"]))
            worst = torch.stack([worst, *errs]).max()
        if self.arch.embed_is_sum and 0 in self.layers and ("embed", None) in self.acts:
            emb = self["embed"] + (self["pos_embed"] if ("pos_embed", None) in self.acts else 0)
            worst = torch.maximum(worst, dev(emb, self["resid_pre", 0]))
        return float(worst)

    # -------------------------------------------------------------- summaries
    def to_dataframe(self) -> pd.DataFrame:
        """Per-layer summary, averaged over real (non-padding) positions: one row per layer.

        Columns: ``layer``, norms of ``resid_pre``/``resid_post`` and of each sub-layer's read,
        normalised read and write, ``*_rel_update = ‖write‖ / ‖read‖``, ``block_rel_update =
        ‖resid_post − resid_pre‖ / ‖resid_pre‖``, ``cos_pre_post`` and ``n_positions``.
        """
        from streamlens.stream.stats import StatAccumulator

        acc = StatAccumulator()
        for l in self.layers:
            acc.add_layer(l, {k[0]: v for k, v in self.acts.items() if k[1] == l}, self.mask)
        return acc.frame()

    def plot(self):
        from streamlens.present import figures

        return figures.trace_summary(self.to_dataframe(), title=f"Residual stream of {self.model_name}")

    rows_key = "layers"

    def metadata(self) -> dict[str, Any]:
        closure = self.closure_error() if set(self.sublayers) == set(SUBLAYERS) else None
        return {"model": self.model_name, "arch": self.arch.to_dict(), "closure_error": closure}

    def tensors(self) -> dict[str, Any]:
        """Every captured tensor (``"attn_out.3"``, ``"logits"``, ...) with the inputs, positions and mask."""
        return {"input_ids": self.input_ids, "positions": self.positions, "mask": self.mask,
                "acts": {f"{n}" if l is None else f"{n}.{l}": t for (n, l), t in self.acts.items()}}

    def describe(self) -> str:
        text = (f"of {self.model_name}: {self.mask.shape[0]} inputs, {int(self.mask.sum())} positions, "
                f"layers {self.layers[0]}–{self.layers[-1]} ({self.arch.layout} layout)")
        if set(self.sublayers) == set(SUBLAYERS):
            text += f"; closure error {fmt(self.closure_error())}"
        return text

    def __repr__(self) -> str:
        b, s = self.mask.shape
        return (f"ResidualTrace({self.model_name!r}, batch={b}, positions={s}, layers={len(self.layers)}/"
                f"{self.arch.n_layers}, names={list(self.names)})")


# ---------------------------------------------------------------------------- verbs
def _storer(store_dtype, store_device, *, copy: bool):
    # ``copy``: a hook's tensor is the model's own activation, so keeping it needs a copy; a
    # position-gathered tensor is new already and is only moved or cast.
    # by default a bfloat16/float16 activation is kept in float32 (an exact cast: results come back in float32)
    def store(t: Tensor) -> Tensor:
        return t.to(device=store_device or t.device, dtype=store_dtype or up(t).dtype, copy=copy)

    return store


@recorded
def trace(
    model: Model | Any,
    inputs: Inputs,
    *,
    positions: Positions = None,
    layers: int | Sequence[int] | None = None,
    sublayers: str | Sequence[str] = SUBLAYERS,
    heads: bool = False,
    patterns: bool = False,
    sources: bool = False,
    store_dtype: torch.dtype | None = None,
    store_device: str | torch.device | None = None,
    prepend_bos: bool | None = None,
) -> ResidualTrace:
    """Run ``model`` on ``inputs`` and record every read from and write to the residual stream.

    Args:
        model: a :class:`~streamlens.Model` (or anything :func:`streamlens.load` takes).
        inputs: a string, a list of strings (right-padded batch), or token ids ``(batch, pos)``.
        positions: ``None`` for all, ``"last"`` for each input's last real token, ints (negative
            ints count back from each input's last real token), a ``slice`` or a boolean mask
            (:func:`streamlens.stream.inputs.select_positions`).
        layers: the layers to record (default all).
        sublayers: ``("attn", "mlp")`` or one of them.
        heads: also split each attention write into per-head writes (``head_out``).
        patterns: also record each head's attention pattern at the traced positions (``pattern``,
            ``(batch, sel, head, source)``), checked against what the heads really mixed.
        sources: also split each head's write at the traced positions by source position
            (``head_source_out``, ``(batch, sel, head, source, d_model)``; implies ``patterns`` and
            ``heads``). Its size is ``batch × sel × heads × pos × d_model`` per layer: choose
            ``positions`` (e.g. ``"last"``) to keep it small.
        store_dtype: dtype to store activations in (e.g. ``torch.float16`` to halve memory). Default: the
            model's own dtype, except that a bfloat16/float16 model's activations are kept in float32
            (exactly the model's values; ``store_dtype=torch.bfloat16`` keeps them as they are).
        store_device: where to keep them (e.g. ``"cpu"`` while the model runs on a GPU).
        prepend_bos: put the tokenizer's BOS token in front of each text (None, the default: when it
            has one; see :mod:`streamlens.stream.inputs`); recorded in the result.

    Returns:
        A :class:`ResidualTrace`.
    """
    model = as_model(model)
    layers_t = model.check_layers(layers)
    subs = check_sublayers(sublayers)
    batch = encode(model, inputs, prepend_bos=prepend_bos)
    pos_idx, sel_mask = select_positions(batch, positions)
    store = _storer(store_dtype, store_device, copy=positions is None)
    acts: dict[tuple[str, int | None], Tensor] = {}
    heads = heads or sources
    reader = None
    if patterns or sources:
        reader = AttentionReader(model, tuple(batch.input_ids.shape), pos_idx, layers_t, all_positions=positions is None)

    def on_layer(layer, named):
        for k, v in named.items():
            acts[(k, layer)] = v
        if reader is not None:  # this layer's attention has run: its reads are complete
            reader.check_layer(layer, sel_mask)
            reads = reader.reads.pop(layer)
            acts[("pattern", layer)] = store(reads.pattern)
            if sources:
                acts[("head_source_out", layer)] = store(source_writes(model, layer, reads))

    def on_global(name, t):
        acts[(name, None)] = t

    with hooks.attached(reader.hooks() if reader is not None else []):
        logits = capture(model, batch, None if positions is None else pos_idx, layers=layers_t, sublayers=subs,
                         heads=heads, store=store, on_layer=on_layer, on_global=on_global)
    # The logits are a fresh tensor already: move or cast them, never copy them (50k x pos floats).
    acts[("logits", None)] = logits.to(device=store_device or logits.device, dtype=store_dtype or up(logits).dtype)
    if model.final_norm is not None and ("final_in", None) in acts:
        acts[("final_scale", None)] = model.final_norm.scale(acts[("final_in", None)])
    norms = dict(model.block_norms)
    if model.final_norm is not None:
        norms["final"] = model.final_norm
    return ResidualTrace(
        model_name=model.name, arch=model.arch, input_ids=batch.input_ids, str_tokens=batch.str_tokens,
        positions=pos_idx, mask=sel_mask, layers=layers_t, sublayers=subs, acts=acts, norms=norms,
    )
