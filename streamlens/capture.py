"""Capture every read from and write to the residual stream.

For each layer ``l`` a sub-layer *reads* the stream (``attn_read``), normalises what it read
(``attn_read_normed``, what it computes on) and *writes* an update back (``attn_out``, alias
``attn_write``); likewise ``mlp_*``. Between them sit ``resid_pre``, ``resid_mid`` (sequential
blocks only) and ``resid_post``. What the names mean follows the model's measured layout
(see :mod:`streamlens.model`):

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

``head_out`` (``heads=True``) has shape ``(batch, pos, head, d_model)``: head ``h``'s write
``z_h @ W_O[h]``; ``head_out.sum(head) + attn_bias_out == attn_out`` (for Gemma 2's extra norm, at
that norm's scale on this input). Globals: ``embed``, ``pos_embed``, ``final_in``, ``final_scale``,
``final_out`` and ``logits``.

Example:
    >>> tr = streamlens.trace(model, ["The cat sat", "Hello"], positions="last")
    >>> tr["resid_post", 3].shape          # (batch, selected positions, d_model)
    >>> tr.stack("attn_out").labels        # ('attn_out.0', 'attn_out.1', ...)
    >>> tr.closure_error()                 # <= 1e-5 on pre-norm models in float32
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from streamlens import hooks
from streamlens.hooks import select_positions_of
from streamlens.errors import StreamlensError
from streamlens.inputs import Batch, Inputs, encode, select_positions
from streamlens.model import Architecture, Model, as_model
from streamlens.norms import NormSpec

SUBLAYERS = ("attn", "mlp")
ALIASES = {"attn_write": "attn_out", "mlp_write": "mlp_out", "head_write": "head_out"}
LAYER_NAMES = (
    "resid_pre", "attn_read", "attn_read_normed", "attn_out", "head_out", "attn_bias_out",
    "resid_mid", "mlp_read", "mlp_read_normed", "mlp_out", "resid_post",
)
GLOBAL_NAMES = ("embed", "pos_embed", "final_in", "final_scale", "final_out", "logits")


# ---------------------------------------------------------------------------- the plan
def _raw_points(arch: Architecture, sublayers: Sequence[str], heads: bool, has_ln2: bool) -> set[tuple[str, str]]:
    """The raw hook points one layer needs for the requested names."""
    pts = {("block", "in"), ("block", "out")}
    lay = arch.layout
    if lay in ("pre", "sandwich"):
        pts.add(("ln2", "in"))
    if lay == "post":
        pts |= {("ln1", "in"), ("ln1", "out"), ("ln2", "in")}
    if "attn" in sublayers and lay != "post":
        pts |= {("ln1", "out"), ("ln1_post", "out") if lay == "sandwich" else ("attn", "out")}
    if "mlp" in sublayers and lay != "post":
        pts |= {("ln2_post", "out") if lay == "sandwich" else ("mlp", "out")}
        pts.add(("ln2", "out") if has_ln2 else ("ln1", "out"))
    if heads:
        pts.add(("o", "in"))
        if lay == "sandwich":
            pts.add(("attn", "out"))
    return pts


def _assemble(arch: Architecture, raw: dict[tuple[str, str], Tensor], sublayers, has_ln2: bool) -> dict[str, Tensor]:
    """Named tensors of one layer from its raw points (aliases share storage)."""
    lay, out = arch.layout, {}
    pre, post = raw[("block", "in")], raw[("block", "out")]
    out["resid_pre"], out["resid_post"] = pre, post
    if lay == "post":
        mid = raw[("ln1", "out")]
        out["resid_mid"] = mid
        if "attn" in sublayers:
            out.update(attn_read=pre, attn_read_normed=pre, attn_out=raw[("ln1", "in")] - pre)
        if "mlp" in sublayers:
            out.update(mlp_read=mid, mlp_read_normed=mid, mlp_out=raw[("ln2", "in")] - mid)
        return out
    if lay != "parallel":
        out["resid_mid"] = raw[("ln2", "in")]
    if "attn" in sublayers:
        out.update(attn_read=pre, attn_read_normed=raw[("ln1", "out")])
        out["attn_out"] = raw[("ln1_post", "out")] if lay == "sandwich" else raw[("attn", "out")]
    if "mlp" in sublayers:
        out["mlp_read"] = pre if lay == "parallel" else out["resid_mid"]
        out["mlp_read_normed"] = raw[("ln2", "out")] if has_ln2 else raw[("ln1", "out")]
        out["mlp_out"] = raw[("ln2_post", "out")] if lay == "sandwich" else raw[("mlp", "out")]
    return out


def _head_split(model: Model, layer: int, z: Tensor, raw: dict, store: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """``(head_out, attn_bias_out)``: per-head writes ``(b, p, h, d)`` and the output-bias share ``(b, p, d)``."""
    a = model.arch
    w_o, b_o = model.head_weights(layer)
    zh = z.float().reshape(*z.shape[:-1], a.n_heads, a.d_head)  # (b, p, h, d_head)
    head = torch.einsum("bphk,hkm->bphm", zh, w_o.to(zh.device))  # (b, p, h, d_model)
    bias = b_o.to(zh.device).expand(*z.shape[:-1], a.d_model)
    if a.layout == "sandwich":
        # Gemma 2: attn_write = ln1_post(attn_raw). At ln1_post's scale on this input the map is
        # affine, so it distributes over the heads exactly; its own bias goes with the o bias.
        norm: NormSpec = model.block_norms[(layer, "ln1_post")]
        scale = norm.scale(raw[("attn", "out")])[..., None, :]  # (b, p, 1, 1)
        head = norm.linear_part(head, scale)
        bias = norm.linear_part(bias, scale[..., 0, :]) + norm.bias_part(bias)
    return store(head), store(bias)


def _run_capture(
    model: Model,
    batch: Batch,
    pos_idx: Int[Tensor, "batch sel"],
    *,
    layers: Sequence[int],
    sublayers: Sequence[str],
    heads: bool,
    store: Callable[[Tensor], Tensor],
    on_layer: Callable[[int, dict[str, Tensor]], None],
    on_global: Callable[[str, Tensor], None] | None = None,
    all_positions: bool = False,
) -> Tensor:
    """Run ``model`` on ``batch`` and hand each layer's named tensors to ``on_layer`` as soon as the layer ends.

    Only the positions in ``pos_idx`` are kept; a layer's raw points are dropped once it is
    assembled, so streaming consumers hold one layer at a time. Returns the logits at ``pos_idx``.
    """
    arch, bridge = model.arch, model.bridge
    b, p = batch.input_ids.shape
    dev = model.device
    bidx = torch.arange(b, device=dev)[:, None]
    pidx = pos_idx.to(dev)

    def pick(t: Tensor) -> Tensor:
        return select_positions_of(t, (b, p), bidx, pidx, all_positions=all_positions)

    has_ln2 = hooks.block_component(bridge, 0, "ln2") is not None
    need = _raw_points(arch, sublayers, heads, has_ln2)
    scratch: dict[int, dict] = {}
    attach = []
    for layer in layers:
        for comp, side in need:
            hp = hooks.block_point(bridge, layer, comp, side)
            if hp is None:
                raise StreamlensError(f"block {layer} has no {comp} {side} hook point, which tracing this model needs")

            def fn(t, layer=layer, key=(comp, side)):
                raw = scratch.setdefault(layer, {})
                raw[key] = pick(t)
                if key == ("block", "out"):
                    raw = scratch.pop(layer)
                    named = _assemble(arch, raw, sublayers, has_ln2)
                    if heads:
                        named["head_out"], named["attn_bias_out"] = _head_split(model, layer, raw[("o", "in")], raw, store)
                    stored: dict[int, Tensor] = {}  # aliases (attn_read is resid_pre, ...) are stored once
                    on_layer(layer, {k: v if k in ("head_out", "attn_bias_out") else stored.setdefault(id(v), store(v))
                                     for k, v in named.items()})
                return None

            attach.append((hp, fn))
    if on_global is not None:
        for comp, side, name in (("embed", "out", "embed"), ("pos_embed", "out", "pos_embed"),
                                 ("ln_final", "in", "final_in"), ("ln_final", "out", "final_out")):
            hp = hooks.global_point(bridge, comp, side)
            if hp is not None:
                attach.append((hp, lambda t, name=name: on_global(name, store(pick(t)))))
    with torch.no_grad(), hooks.attached(attach):
        logits = model.run(batch.input_ids, batch.mask)
    return logits if all_positions else logits[bidx, pidx]


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
class ResidualTrace:
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
        if name not in LAYER_NAMES:
            raise StreamlensError(f"unknown name {name!r}; layer names: {LAYER_NAMES}; globals: {GLOBAL_NAMES}")
        if layer is None:
            raise StreamlensError(f"{name!r} is per layer: use trace[{name!r}, layer]")
        n = self.arch.n_layers
        if not -n <= layer < n:
            raise StreamlensError(f"layer {layer} is out of range for a {n}-layer model")
        return name, layer % n

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
        extra = ("head",) if ALIASES.get(name, name) == "head_out" else ()
        return LayerStack(ALIASES.get(name, name), self.layers, torch.stack(ts), ("layer", "batch", "sel") + extra + ("d_model",))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k[0] for k in self.acts))

    # -------------------------------------------------------------- checks
    def closure_error(self) -> float:
        """Largest relative deviation, over layers and real positions, from the model's own update rule.

        pre/sandwich: ``resid_mid = resid_pre + attn_out`` and ``resid_post = resid_mid + mlp_out``;
        parallel: ``resid_post = resid_pre + attn_out + mlp_out``; post-norm: ``resid_mid =
        ln1(resid_pre + attn_out)`` and ``resid_post = ln2(resid_mid + mlp_out)`` with the model's
        own norms. Also the first block's input against the embeddings, where they sum to it.
        Each deviation is ``‖got − want‖ / ‖want‖`` per position.
        """
        if set(self.sublayers) != set(SUBLAYERS):
            raise StreamlensError("closure_error needs both sub-layers traced (sublayers=('attn', 'mlp'))")
        worst = torch.zeros(())
        m = self.mask

        def dev(got, want):
            got, want = got.float(), want.float()
            r = (got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-12)
            return r[m].max() if m.any() else torch.zeros(())

        lay = self.arch.layout
        for l in self.layers:
            pre, post = self["resid_pre", l], self["resid_post", l]
            attn, mlp = self["attn_out", l], self["mlp_out", l]
            if lay == "parallel":
                errs = [dev(pre + attn + mlp, post)]
            elif lay == "post":
                mid = self["resid_mid", l]
                errs = [dev(self.norms[(l, "ln1")](pre.float() + attn.float()), mid),
                        dev(self.norms[(l, "ln2")](mid.float() + mlp.float()), post)]
            else:
                mid = self["resid_mid", l]
                errs = [dev(pre + attn, mid), dev(mid + mlp, post)]
            if "head_out" in self.names:
                errs.append(dev(self["head_out", l].float().sum(-2) + self["attn_bias_out", l].float(), attn))
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
        from streamlens.stats import StatAccumulator

        acc = StatAccumulator()
        for l in self.layers:
            acc.add(l, {k[0]: v for k, v in self.acts.items() if k[1] == l}, self.mask)
        return acc.frame()

    def plot(self):
        from streamlens import plots

        return plots.trace_summary(self.to_dataframe(), title=f"Residual stream of {self.model_name}")

    def save(self, path: str | Path) -> Path:
        """Write the per-layer summary: ``.csv`` or ``.json`` by extension; ``.pt`` saves every tensor."""
        path = Path(path)
        if path.suffix == ".pt":
            torch.save({"model": self.model_name, "arch": self.arch.to_dict(), "input_ids": self.input_ids,
                        "positions": self.positions, "mask": self.mask,
                        "acts": {f"{n}" if l is None else f"{n}.{l}": t for (n, l), t in self.acts.items()}}, path)
        elif path.suffix == ".json":
            path.write_text(json.dumps({"model": self.model_name, "arch": self.arch.to_dict(),
                                        "closure_error": self.closure_error() if set(self.sublayers) == set(SUBLAYERS) else None,
                                        "layers": self.to_dataframe().to_dict(orient="records")}, indent=2))
        else:
            self.to_dataframe().to_csv(path, index=False)
        return path

    def __repr__(self) -> str:
        b, s = self.mask.shape
        return (f"ResidualTrace({self.model_name!r}, batch={b}, positions={s}, layers={len(self.layers)}/"
                f"{self.arch.n_layers}, names={list(self.names)})")

    def _repr_html_(self) -> str:
        head = f"<b>ResidualTrace</b> of <code>{self.model_name}</code>: {self.mask.shape[0]} inputs, " \
               f"{int(self.mask.sum())} positions, layers {self.layers[0]}–{self.layers[-1]} ({self.arch.layout} layout)"
        if set(self.sublayers) == set(SUBLAYERS):
            head += f"; closure error {self.closure_error():.1e}"
        return head + self.to_dataframe().to_html(index=False, float_format=lambda v: f"{v:.4g}")


# ---------------------------------------------------------------------------- verbs
def _check_sublayers(sublayers) -> tuple[str, ...]:
    if isinstance(sublayers, str):
        sublayers = (sublayers,)
    sublayers = tuple(sublayers)
    bad = [s for s in sublayers if s not in SUBLAYERS]
    if bad:
        raise StreamlensError(f"unknown sub-layer {bad[0]!r}; choose from {SUBLAYERS}")
    return sublayers


def _storer(store_dtype, store_device, *, copy: bool):
    # ``copy``: a hook's tensor is the model's own activation, so keeping it needs a copy; a
    # position-gathered tensor is new already and is only moved or cast.
    def store(t: Tensor) -> Tensor:
        return t.to(device=store_device or t.device, dtype=store_dtype or t.dtype, copy=copy)

    return store


def trace(
    model: Model | Any,
    inputs: Inputs,
    *,
    positions: int | str | Sequence[int] | None = None,
    layers: int | Sequence[int] | None = None,
    sublayers: str | Sequence[str] = SUBLAYERS,
    heads: bool = False,
    store_dtype: torch.dtype | None = None,
    store_device: str | torch.device | None = None,
) -> ResidualTrace:
    """Run ``model`` on ``inputs`` and record every read from and write to the residual stream.

    Args:
        model: a :class:`~streamlens.Model` (or anything :func:`streamlens.load` takes).
        inputs: a string, a list of strings (right-padded batch), or token ids ``(batch, pos)``.
        positions: ``None`` for all, ``"last"`` for each input's last real token, or ints
            (negative ints count back from each input's last real token).
        layers: the layers to record (default all).
        sublayers: ``("attn", "mlp")`` or one of them.
        heads: also split each attention write into per-head writes (``head_out``).
        store_dtype: dtype to store activations in (e.g. ``torch.float16`` to halve memory).
        store_device: where to keep them (e.g. ``"cpu"`` while the model runs on a GPU).

    Returns:
        A :class:`ResidualTrace`.
    """
    model = as_model(model)
    layers_t = model.check_layers(layers)
    subs = _check_sublayers(sublayers)
    batch = encode(model, inputs)
    pos_idx, sel_mask = select_positions(batch, positions)
    store = _storer(store_dtype, store_device, copy=positions is None)
    acts: dict[tuple[str, int | None], Tensor] = {}

    def on_layer(layer, named):
        for k, v in named.items():
            acts[(k, layer)] = v

    def on_global(name, t):
        acts[(name, None)] = t

    logits = _run_capture(model, batch, pos_idx, layers=layers_t, sublayers=subs, heads=heads, store=store,
                          on_layer=on_layer, on_global=on_global, all_positions=positions is None)
    # The logits are a fresh tensor already: move or cast them, never copy them (50k x pos floats).
    acts[("logits", None)] = logits.to(device=store_device or logits.device, dtype=store_dtype or logits.dtype)
    if model.final_norm is not None and ("final_in", None) in acts:
        acts[("final_scale", None)] = model.final_norm.scale(acts[("final_in", None)])
    norms = dict(model.block_norms)
    if model.final_norm is not None:
        norms["final"] = model.final_norm
    return ResidualTrace(
        model_name=model.name, arch=model.arch, input_ids=batch.input_ids, str_tokens=batch.str_tokens,
        positions=pos_idx, mask=sel_mask, layers=layers_t, sublayers=subs, acts=acts, norms=norms,
    )
