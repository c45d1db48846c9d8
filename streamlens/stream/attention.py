"""What an attention head reads across positions: its pattern and the values it mixes.

A head ``h`` of layer ``l`` reads the stream at *every* earlier position ``k`` through its values,
``v_k = norm(x_k) W_V + b_V``, and writes at the query position ``q``

    head_out[q, h] = z[q, h] W_O[h],   z[q, h] = Σ_k A[h, q, k] · v_k[kv(h)]

so its write splits exactly by source position: ``head_out[q, h] = Σ_k A[h, q, k] · (v_k[kv(h)] W_O[h])``.
The value bias ``b_V`` travels with its source (the pattern sums to one). ``kv(h) = h // (n_heads //
n_kv_heads)`` is the value head that query head ``h`` shares under grouped-query attention. Rotary
and ALiBi positions, soft-capped scores and sliding windows only change ``A``, which is read as the
model computed it (the bridge's ``attn.hook_pattern``, after the softmax); Gemma 2's extra
post-attention norm is applied at its scale on this input, as for ``head_out``.

Nothing here assumes an architecture: every layer's reads are checked against the heads' mixed
values the output projection receives (``attn.o.hook_in``), and a model where ``Σ_k A v ≠ z`` is
refused with the measured error.

Example:
    >>> from streamlens.model import hooks
    >>> from streamlens.stream.inputs import encode, select_positions
    >>> batch = encode(model, ["The capital of France is", "Hello"])
    >>> pos_idx, _ = select_positions(batch, "last")
    >>> reader = AttentionReader(model, tuple(batch.input_ids.shape), pos_idx, layers=[3])
    >>> with hooks.attached(reader.hooks()):
    ...     _ = model.run(batch.input_ids, batch.mask)
    >>> reader.check_layer(3) <= 1e-4        # Σ_k A v equals what the output projection received
    True
    >>> reads = reader.reads[3]
    >>> reads.pattern.shape[:2]              # (batch, sel), then (head, source): rows of A at the queries
    torch.Size([2, 1])
    >>> w = source_writes(model, 3, reads)   # (batch, sel, head, source, d_model)
    >>> tr = sl.trace(model, ["The capital of France is", "Hello"], positions="last", heads=True)
    >>> torch.allclose(w.sum(-2), tr["head_out", 3], atol=1e-6)
    True
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from streamlens.errors import StreamlensError, UnsupportedModelError
from streamlens.model import hooks
from streamlens.model.affine import measure
from streamlens.model.hooks import select_positions_of
from streamlens.model.precision import check_tol
from streamlens.present.results import Result

#: Largest relative gap allowed between ``Σ_k A v`` and the z the output projection receives (float32).
READ_TOL = 1e-4


def attention_component(model, layer: int, name: str):
    """The bridge sub-component ``name`` (``"v"``, ``"q"``, ``"k"``, ``"o"``) of layer ``layer``'s attention."""
    attn = hooks.block_component(model.bridge, layer, "attn")
    comp = None if attn is None else getattr(attn, name, None)
    if comp is None:
        raise UnsupportedModelError(
            f"{model.name}: layer {layer}'s attention exposes no separate {name} projection (attn.{name}), so what its "
            "heads read at each source position cannot be recorded"
        )
    return comp


def attention_points(model, layer: int) -> dict[str, torch.nn.Module]:
    """The hook points of one layer's attention read: pattern, values, value input, mixed values ``z``."""
    attn = hooks.block_component(model.bridge, layer, "attn")
    pts = {
        "pattern": hooks.hook_point(attn, "pattern"),
        "v": hooks.hook_point(attention_component(model, layer, "v"), "out"),
        "v_in": hooks.hook_point(attention_component(model, layer, "v"), "in"),
        "z": hooks.block_point(model.bridge, layer, "o", "in"),
    }
    if model.arch.rule.write_norm("attn") is not None:
        pts["raw_out"] = hooks.block_point(model.bridge, layer, "attn", "out")
    missing = [k for k, v in pts.items() if v is None]
    if missing:
        raise UnsupportedModelError(
            f"{model.name}: layer {layer}'s attention has no {', '.join(missing)} hook point, so what its heads read "
            "at each source position cannot be recorded"
        )
    return pts


def kv_index(arch) -> Int[Tensor, " head"]:
    """The value head each query head reads (grouped-query attention shares one among ``n_heads // n_kv_heads``)."""
    if arch.n_heads % arch.n_kv_heads:
        raise UnsupportedModelError(f"{arch.n_heads} query heads cannot share {arch.n_kv_heads} key/value heads evenly")
    return torch.arange(arch.n_heads) // (arch.n_heads // arch.n_kv_heads)


@dataclass
class LayerReads:
    """One layer's attention read, at the chosen query positions.

    ``pattern`` is ``(batch, sel, head, source)`` (rows of ``A`` at the queries, every source
    position), ``v`` the values ``(batch, source, kv_head, d_head)`` at every position, ``v_in`` the
    value projection's input ``(batch, source, d_model)`` (kept only when asked), ``z`` the mixed
    values at the queries ``(batch, sel, head, d_head)``, ``post_scale`` Gemma 2's extra norm's scale
    at the queries ``(batch, sel, 1)`` (None for other layouts).
    """

    pattern: Float[Tensor, "batch sel head source"]
    v: Float[Tensor, "batch source kv_head d_head"]
    z: Float[Tensor, "batch sel head d_head"]
    v_in: Float[Tensor, "batch source d_model"] | None = None
    post_scale: Float[Tensor, "batch sel 1"] | None = None

    def values_per_head(self, kv: Tensor) -> Float[Tensor, "batch source head d_head"]:
        return self.v[:, :, kv.to(self.v.device)]

    def mixed(self, kv: Tensor) -> Float[Tensor, "batch sel head d_head"]:
        """``Σ_k A[q, k] v_k``: what the heads' values mix into at each query."""
        return torch.einsum("bshk,bkhe->bshe", self.pattern, self.values_per_head(kv))

    def error(self, kv: Tensor, mask: Tensor | None = None) -> float:
        """Relative gap between ``Σ_k A v`` and the ``z`` the output projection received (real queries only)."""
        got, want = self.mixed(kv), self.z
        if mask is not None:
            got, want = got[mask.to(got.device)], want[mask.to(want.device)]
        return float((got - want).norm() / want.norm().clamp_min(1e-12))


class AttentionReader:
    """Forward hooks that record each layer's attention read at the query positions ``pos_idx``.

    Memory: per layer, the pattern rows at the queries ``(batch, sel, head, pos)`` and the values
    ``(batch, pos, kv_head, d_head)``; never the full ``(pos, pos)`` pattern unless every position
    is selected.
    """

    def __init__(self, model, shape: tuple[int, int], pos_idx: Int[Tensor, "batch sel"], layers: Sequence[int], *,
                 all_positions: bool = False, keep_value_input: bool = False):
        self.model, self.shape, self.layers = model, shape, tuple(layers)
        dev = model.device
        self._bidx = torch.arange(shape[0], device=dev)[:, None]
        self._pidx = pos_idx.to(dev)
        self._all = all_positions
        self._keep_in = keep_value_input
        self._raw: dict[int, dict[str, Tensor]] = {}
        self.reads: dict[int, LayerReads] = {}
        self.kv = kv_index(model.arch)

    def _pick(self, t: Tensor) -> Tensor:
        return select_positions_of(t, self.shape, self._bidx, self._pidx, all_positions=self._all)

    def hooks(self) -> list[tuple[torch.nn.Module, object]]:
        a = self.model.arch
        extra = a.rule.write_norm("attn")  # Gemma 2's norm on the attention write, or None
        out = []
        for layer in self.layers:
            pts = attention_points(self.model, layer)

            def grab(t, layer=layer, key=None):
                raw = self._raw.setdefault(layer, {})
                b, p = self.shape
                if key == "pattern":  # (b, head, q, k) -> rows at the queries, (b, sel, head, k)
                    t = t.detach().float()
                    raw[key] = t.permute(0, 2, 1, 3) if self._all else t[self._bidx, :, self._pidx, :]
                elif key in ("v", "v_in"):  # every source position is needed
                    t = select_positions_of(t, self.shape, None, None, all_positions=True).float()
                    raw[key] = t.reshape(b, p, a.n_kv_heads, -1) if key == "v" else t
                elif key == "z":
                    t = self._pick(t).float()
                    raw[key] = t.reshape(*t.shape[:2], a.n_heads, a.d_head)
                else:  # raw attention output before Gemma 2's extra norm
                    raw[key] = self.model.block_norms[(layer, extra)].scale(self._pick(t))
                if {"pattern", "v", "z"} <= raw.keys() and ("raw_out" in raw or extra is None) \
                        and ("v_in" in raw or not self._keep_in):
                    raw = self._raw.pop(layer)
                    self.reads[layer] = LayerReads(raw["pattern"], raw["v"], raw["z"], raw.get("v_in"),
                                                   raw.get("raw_out"))
                return None

            for key, hp in pts.items():
                if key == "v_in" and not self._keep_in:
                    continue
                out.append((hp, lambda t, grab=grab, key=key: grab(t, key=key)))
        return out

    def check_layer(self, layer: int, mask: Tensor | None = None, tol: float | None = None) -> float:
        """``‖Σ_k A v − z‖ / ‖z‖`` at ``layer`` (real queries where ``mask`` says); refuses the model above ``tol``
        (default ``READ_TOL``; in half precision :func:`streamlens.model.precision.check_tol` of it, since ``z``
        is the model's own rounded value while ``Σ_k A v`` is computed in float32 from the stored ``A`` and ``v``)."""
        tol = check_tol(self.model.dtype, READ_TOL) if tol is None else tol
        if layer not in self.reads:
            raise UnsupportedModelError(
                f"{self.model.name}: layer {layer}'s attention did not hand over its pattern, values and mixed values "
                "(the bridge's hook_pattern / v / o points did not all fire)"
            )
        err = self.reads[layer].error(self.kv, mask)
        if not err <= tol:
            raise UnsupportedModelError(
                f"{self.model.name}: at layer {layer} the attention pattern times the values differs from what the "
                f"output projection receives (relative error {err:.1e}), so the head writes do not split by source "
                "position (attention that is not a weighted sum of per-position values, e.g. sinks or extra mixing)"
            )
        return err

    def check(self, mask: Tensor | None = None, tol: float | None = None) -> float:
        """The largest :meth:`check_layer` gap over the recorded layers."""
        return max((self.check_layer(l, mask, tol) for l in self.layers), default=0.0)


def head_output_map(model, layer: int, reads: LayerReads) -> Float[Tensor, "batch sel head d_head d_model"] | Tensor:
    """``W_O[h]`` as it acts at each query: ``(head, d_head, d_model)``, or per query for Gemma 2's extra norm."""
    w_o, _ = model.head_weights(layer)
    extra = model.arch.rule.write_norm("attn")
    if extra is None:
        return w_o
    norm = model.block_norms[(layer, extra)]
    return norm.linear_part(w_o, reads.post_scale[:, :, None, None])  # (b, sel, h, d_head, d_model)


def source_writes(model, layer: int, reads: LayerReads, heads: Sequence[int] | None = None
                  ) -> Float[Tensor, "batch sel head source d_model"]:
    """Per-source head writes ``A[h, q, k] · (v_k W_O[h])`` at the query positions: ``(batch, sel, head, source, d_model)``.

    ``.sum(-2)`` is ``head_out`` at those queries. The size is ``batch × sel × head × pos × d_model``:
    choose the query positions (and ``heads``) to keep it small.
    """
    a = model.arch
    hs = torch.arange(a.n_heads) if heads is None else torch.as_tensor(list(heads))
    kv = kv_index(a)[hs]
    w = head_output_map(model, layer, reads)
    dev = reads.v.device
    if w.dim() == 3:  # shared by every query: project the values once, (b, k, h, d)
        vw = torch.einsum("bkhe,hem->bkhm", reads.v[:, :, kv.to(dev)], w[hs.to(w.device)].to(dev))
        return reads.pattern[:, :, hs.to(dev), :, None] * vw.permute(0, 2, 1, 3)[:, None]
    vh = reads.v[:, :, kv.to(dev)]  # (b, k, h, e)
    return torch.einsum("bshk,bkhe,bshem->bshkm", reads.pattern[:, :, hs.to(dev)], vh, w[:, :, hs.to(w.device)].to(dev))


def adjoint(norm, r: Float[Tensor, "... d"], scale: Float[Tensor, "... 1"]) -> Float[Tensor, "... d"]:
    """The readout through a frozen-scale norm: ``r · linear_part(y, s) == adjoint(r, s) · y`` for every ``y``.

    ``linear_part(y) = g ⊙ C y / s`` with ``C`` the (symmetric) centring, so its adjoint is ``C (g ⊙ r) / s``.
    """
    r = r.float()
    if norm.gain is not None:
        r = r * norm.gain.to(r)
    if norm.centres:
        r = r - r.mean(-1, keepdim=True)
    return r / scale


def write_norm_adjoint(model, layer: int, reads: LayerReads, r: Tensor) -> Tensor:
    """``r`` read back through Gemma 2's extra norm on the attention write (at its scale at each query); else ``r``.

    ``r`` is ``(batch, sel, ..., d_model)``; the scale ``(batch, sel, 1)`` broadcasts over the middle axes.
    """
    extra = model.arch.rule.write_norm("attn")
    if extra is None:
        return r
    scale = reads.post_scale.reshape(*reads.post_scale.shape[:2], *[1] * (r.dim() - 3), 1)
    return adjoint(model.block_norms[(layer, extra)], r, scale)


def source_contributions(model, layer: int, reads: LayerReads, r: Float[Tensor, "batch sel target d_model"]
                         ) -> Float[Tensor, "batch sel head source target"]:
    """``A[h, q, k] · (v_k W_O[h]) · r[q, t]`` for every head and source, without building a d_model tensor per source.

    ``r`` is the readout each query's write is read with (the final norm's adjoint applied to ``u``);
    Gemma 2's extra norm is folded into it here, at its scale at the query.
    """
    a = model.arch
    r = write_norm_adjoint(model, layer, reads, r)
    w_o, _ = model.head_weights(layer)
    dev = reads.v.device
    phi = torch.einsum("hem,bstm->bsthe", w_o.to(dev), r.to(dev))  # (b, s, t, h, d_head): W_O[h] r
    vh = reads.values_per_head(kv_index(a))  # (b, k, h, e)
    return reads.pattern[..., None] * torch.einsum("bkhe,bsthe->bshkt", vh, phi)


def value_map(model, layer: int) -> tuple[Float[Tensor, "d_model kv_head d_head"], Float[Tensor, "kv_head d_head"]]:
    """``(W_V, b_V)`` of layer ``layer``: ``v = x W_V + b_V``, measured on the module as ``v(I) − v(0)``."""
    a = model.arch
    w, b = measure(attention_component(model, layer, "v").original_component, a.d_model)
    return w.reshape(a.d_model, a.n_kv_heads, -1), b.reshape(a.n_kv_heads, -1)


# ---------------------------------------------------------------------------- patterns as a result
@dataclass(frozen=True, eq=False)
class AttentionPatterns(Result):
    """Every head's attention pattern on a batch: ``patterns[i]`` is layer ``layers[i]``, ``(batch, head, query, source)``."""

    model_name: str
    layers: tuple[int, ...]
    patterns: Float[Tensor, "layer batch head query source"]
    str_tokens: tuple[tuple[str, ...], ...]

    def __getitem__(self, layer: int) -> Float[Tensor, "batch head query source"]:
        if layer not in self.layers:
            raise StreamlensError(f"layer {layer} was not recorded (layers: {list(self.layers)})")
        return self.patterns[self.layers.index(layer)]

    def to_dataframe(self):
        """Tidy: one row per (prompt, layer, head, query, source) over real tokens, source ≤ query when causal."""
        import pandas as pd

        frames = []
        for i, toks in enumerate(self.str_tokens):
            n = len(toks)
            pat = self.patterns[:, i, :, :n, :n]  # (layer, head, q, k)
            idx = (pat > 0).nonzero() if n else torch.empty(0, 4, dtype=torch.long)
            l, h, q, k = idx.unbind(1)
            frames.append(pd.DataFrame({
                "prompt": i, "layer": torch.as_tensor(self.layers)[l].numpy(), "head": h.numpy(), "query": q.numpy(),
                "source": k.numpy(), "query_token": [toks[j] for j in q.tolist()],
                "source_token": [toks[j] for j in k.tolist()], "weight": pat[l, h, q, k].numpy()}))
        return pd.concat(frames, ignore_index=True)

    def plot(self, layer: int | None = None, *, prompt: int = 0):
        """One layer's heads (a menu picks the head), with token labels."""
        from streamlens.present.attention import pattern_figure

        layer = self.layers[0] if layer is None else layer
        return pattern_figure(self[layer][prompt], self.str_tokens[prompt],
                              title=f"{self.model_name} layer {layer}",
                              head_names=[f"head {layer}.{h}" for h in range(self.patterns.shape[2])])

    def metadata(self) -> dict:
        return {"model": self.model_name, "layers": list(self.layers)}

    def describe(self) -> str:
        L, b, h, q, _ = self.patterns.shape
        return f"of {self.model_name}: layers {list(self.layers)}, {b} prompts, {h} heads, {q} positions"

    def __repr__(self) -> str:
        L, b, h, q, _ = self.patterns.shape
        return f"AttentionPatterns({self.model_name!r}, layers={list(self.layers)}, prompts={b}, heads={h}, positions={q})"

    def _repr_html_(self) -> str:
        from streamlens.present.attention import pattern_html

        layer = self.layers[0]
        grids = "".join(pattern_html(self[layer][0, h], self.str_tokens[0], title=f"head {layer}.{h}")
                        for h in range(self.patterns.shape[2]))
        return (f"<b>AttentionPatterns</b> {html.escape(self.describe())} (prompt 0, layer {layer}; .plot(layer) for "
                f"the others)<br>{grids}")


def attention_patterns(model, inputs, *, layers=None) -> AttentionPatterns:
    """Record every head's attention pattern (as the model computed it, checked against the heads' outputs).

    Args:
        model: a :class:`~streamlens.Model`.
        inputs: a prompt, prompts (one padded batch) or token ids.
        layers: the layers to record (default all).
    """
    from streamlens.stream.trace import trace  # the trace records patterns through this module

    tr = trace(model, inputs, layers=layers, sublayers=("attn",), patterns=True)
    pats = torch.stack([tr["pattern", l].permute(0, 2, 1, 3) for l in tr.layers])  # (L, b, h, q, k)
    return AttentionPatterns(tr.model_name, tr.layers, pats, tr.str_tokens)
