"""Two-step paths through a head's values: (upstream writer at source k) → (head) → target, exactly.

The value a head reads at source ``k`` is ``ln1(x_k) W_V + b_V``, and ``x_k`` is the sum of every write
upstream of the head at ``k`` (embeddings, earlier heads and MLPs). With that norm's scale frozen at its
value on this input (the convention the decomposition uses for the final norm), the value, and so the
head's per-source contribution (:mod:`streamlens.readout.sources`), splits exactly over those writers;
the value norm's bias and ``b_V`` form one more term, ``value_bias``. :func:`value_paths` returns the
paths with ``check()`` and, per path, ``direct_effect_renormed``: the same path with the value norm
*recomputed* without the writer, to show what freezing the scale costs.

Queries and keys are not split: they enter through the softmax. Their causal counterpart is
:func:`streamlens.intervene.reads.remove_from_input`.

Example:
    >>> vp = sl.value_paths(model, "The capital of France is", " Paris", heads=["head.3.1"])
    >>> vp.check() <= 1e-4
    True
    >>> list(vp.top(3).columns)
    ['layer', 'head', 'writer', 'source', 'value']
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from streamlens.errors import StreamlensError, UnsupportedModelError
from streamlens.intervene.units import parse_heads
from streamlens.model import hooks
from streamlens.model.loading import as_model
from streamlens.model.precision import check_tol, up
from streamlens.present.results import Result, fmt
from streamlens.readout.sources import NOTE_QK, check_source_target, readout_rows, source_valid
from streamlens.readout.targets import readout, resolve
from streamlens.readout.unembed import require_linear_readout, require_two_writers
from streamlens.stream.attention import (AttentionReader, adjoint, kv_index, source_contributions, value_map,
                                         write_norm_adjoint)
from streamlens.stream.engine import capture
from streamlens.stream.inputs import encode, select_positions


@dataclass(frozen=True, eq=False)
class ValuePaths(Result):
    """Two-step paths (upstream writer at source ``k``) → (head) → target, through the head's values.

    ``values[j, n, i, s, t, k]``: writer ``writers[n]``'s share, at source ``k``, of head ``heads[j]``'s
    contribution to target ``t`` at prompt ``i``, query ``positions[i, s]``; the last writer is
    ``"value_bias"`` (the value norm's bias and ``b_V``). Summed over writers it is the head's
    per-source contribution ``source_values``, and over sources too the head's contribution
    ``head_values`` (exact at the value norm's frozen scale: :meth:`check`). ``renormed[j, n, ...]``
    is the same path with the value norm recomputed without the writer (pattern and final norm held).
    Queries and keys are not split (see :func:`~streamlens.readout.sources.remove_from_input`).
    """

    model_name: str
    heads: tuple[tuple[int, int], ...]
    writers: tuple[str, ...]
    writer_kinds: tuple[str, ...]
    writer_layers: tuple[int | None, ...]
    writer_heads: tuple[int | None, ...]
    values: Float[Tensor, "head writer prompt sel target source"] = field(repr=False)
    renormed: Float[Tensor, "head writer prompt sel target source"] = field(repr=False)
    source_values: Float[Tensor, "head prompt sel target source"] = field(repr=False)
    head_values: Float[Tensor, "head prompt sel target"] = field(repr=False)
    positions: Int[Tensor, "prompt sel"] = field(repr=False)
    str_tokens: tuple[tuple[str, ...], ...] = field(repr=False)
    target_labels: tuple[tuple[tuple[str, ...], ...], ...] = field(repr=False)
    causal: bool = True
    note: str = NOTE_QK

    def __post_init__(self):
        j, n = len(self.heads), len(self.writers)
        if self.values.shape[:2] != (j, n) or self.renormed.shape != self.values.shape:
            raise StreamlensError(f"{j} heads and {n} writers do not match values of shape {tuple(self.values.shape)}")

    def check(self) -> float:
        """Largest relative gap: paths summed over writers vs each head's per-source contribution, and over
        writers and sources vs the head's contribution (the value norm's frozen-scale identity)."""
        scale = self.head_values.abs().max().clamp_min(1e-12)
        per_src = (self.values.sum(1) - self.source_values).abs().max()
        total = (self.values.sum((1, 5)) - self.head_values).abs().max()
        return float(torch.maximum(per_src, total) / scale)

    def to_dataframe(self) -> pd.DataFrame:
        """Tidy: one row per (head, writer, prompt, query position, target, source) with the writer upstream
        of the head and the source readable from the query. Columns: ``layer``, ``head``, ``writer``,
        ``writer_kind``, ``writer_layer``, ``writer_head``, ``prompt``, ``sel``, ``position``, ``target``,
        ``source``, ``source_token``, ``value``, ``direct_effect_renormed`` and ``head_value``."""
        J, N, B, S, T, K = self.values.shape
        valid = source_valid(self.positions, [len(t) for t in self.str_tokens], K, self.causal)  # (B, S, K)
        rows = []
        for j, (L, H) in enumerate(self.heads):
            for n in range(N):
                wl = self.writer_layers[n]
                if wl is not None and wl >= L:
                    continue
                idx = valid[:, :, None, :].expand(B, S, T, K).nonzero()
                i, s, t, k = idx.unbind(1)
                rows.append(pd.DataFrame({
                    "layer": L, "head": H, "writer": self.writers[n], "writer_kind": self.writer_kinds[n],
                    "writer_layer": pd.array([wl] * len(i), dtype="Int64"),
                    "writer_head": pd.array([self.writer_heads[n]] * len(i), dtype="Int64"),
                    "prompt": i.numpy(), "sel": s.numpy(), "position": self.positions[i, s].numpy(),
                    "target": [self.target_labels[a][b][c] for a, b, c in zip(i.tolist(), s.tolist(), t.tolist())],
                    "source": k.numpy(), "source_token": [self.str_tokens[a][b] for a, b in zip(i.tolist(), k.tolist())],
                    "value": self.values[j, n, i, s, t, k].numpy(),
                    "direct_effect_renormed": self.renormed[j, n, i, s, t, k].numpy(),
                    "head_value": self.head_values[j, i, s, t].numpy(),
                }))
        return pd.concat(rows, ignore_index=True)

    def top(self, n: int = 10) -> pd.DataFrame:
        """The ``n`` paths with the largest mean |value| over prompts (grouped by head, writer and source)."""
        df = self.to_dataframe()
        g = df.groupby(["layer", "head", "writer", "source"], sort=False)["value"].mean().reset_index()
        return g.reindex(g["value"].abs().sort_values(ascending=False).index).head(n).reset_index(drop=True)

    def plot(self):
        from streamlens.present.attention import paths_figure

        return paths_figure(self)

    def metadata(self) -> dict:
        return {"model": self.model_name, "heads": [f"head.{l}.{h}" for l, h in self.heads], "check": self.check(),
                "note": self.note}

    def describe(self) -> str:
        return (f"of {self.model_name}: heads {[f'head.{l}.{h}' for l, h in self.heads]}, {len(self.writers)} writers, "
                f"check {fmt(self.check())}. {self.note}")

    def html_table(self) -> pd.DataFrame:
        return self.top(20)

    def __repr__(self) -> str:
        return (f"ValuePaths({self.model_name!r}, heads={['head.%d.%d' % h for h in self.heads]}, "
                f"writers={len(self.writers)}, prompts={self.values.shape[2]}, check={self.check():.1e})")


def upstream_writes(model, named: dict[int, dict[str, Tensor]], glob: dict[str, Tensor], upto: int, unit: str):
    """``[(label, kind, layer, head, write (b, p, d))]``: every write into the stream before block ``upto``."""
    a = model.arch
    if a.embed_is_sum and "embed" in glob:
        out = [("embed", "embed", None, None, glob["embed"])]
        if a.has_pos_embed and "pos_embed" in glob:
            out.append(("pos_embed", "embed", None, None, glob["pos_embed"]))
    else:
        out = [("embed", "embed", None, None, named[0]["resid_pre"])]
    for l in range(upto):
        if unit == "head":
            out += [(f"head.{l}.{h}", "head", l, h, named[l]["head_out"][:, :, h]) for h in range(a.n_heads)]
            out.append((f"attn_bias.{l}", "bias", l, None, named[l]["attn_bias_out"]))
        else:
            out.append((f"attn.{l}", "attn", l, None, named[l]["attn_out"]))
        out.append((f"mlp.{l}", "mlp", l, None, named[l]["mlp_out"]))
    return out


def value_paths(model, inputs, target, *, contrast=None, positions=-1, heads=None, top: int = 3,
                upstream: str = "head", chunk_size: int = 4096) -> ValuePaths:
    """Split chosen heads' contributions to ``target`` over (upstream writer at source k) → head → target.

    Args:
        model, inputs, target, contrast, positions: as for :func:`streamlens.decompose` (one padded batch).
        heads: the heads to expand (``"head.1.2"``, ``(1, 2)`` or a list); default the ``top`` heads by
            mean |contribution|.
        top: how many heads when ``heads`` is None.
        upstream: ``"head"`` (every upstream head, its layer's output bias, MLPs, embeddings) or ``"layer"``
            (``attn.l`` and ``mlp.l``).

    Returns:
        :class:`ValuePaths`; ``check()`` ≤ 1e-4 in float32. One forward pass; it keeps every layer's writes
        at every position (``layers × pos × heads × d_model`` floats for ``upstream="head"``).
    """
    model = as_model(model)
    require_linear_readout(model, "value_paths")
    require_two_writers(model, "value_paths")
    a = model.arch
    if upstream not in ("head", "layer"):
        raise StreamlensError(f"upstream must be 'head' or 'layer', got {upstream!r}")
    batch = encode(model, inputs)
    pos_idx, _ = select_positions(batch, positions)
    tgt = resolve(model, target, contrast, len(batch))
    check_source_target(tgt)
    b, p = batch.input_ids.shape
    named: dict[int, dict[str, Tensor]] = {}
    glob: dict[str, Tensor] = {}
    reader = AttentionReader(model, (b, p), pos_idx, range(a.n_layers), keep_value_input=True)
    with hooks.attached(reader.hooks()):
        logits = capture(model, batch, None, layers=range(a.n_layers), heads=upstream == "head",
                         store=lambda t: t.float(), on_layer=named.__setitem__, on_global=glob.__setitem__)
    reader.check()
    bidx = torch.arange(b, device=logits.device)[:, None]
    logits = logits[bidx, pos_idx.to(logits.device)].float()
    ids, con = readout(model, tgt, logits)
    x = glob["final_in"][bidx, pos_idx.to(logits.device)]
    u, c, r = readout_rows(model, tgt, ids, con, x, chunk_size)
    if heads is None:
        score = {}
        for l in range(a.n_layers):
            per_head = source_contributions(model, l, reader.reads[l], r).sum(3)  # (b, s, h, t)
            score.update({(l, h): float(per_head[:, :, h].abs().mean()) for h in range(a.n_heads)})
        chosen = sorted(score, key=score.get, reverse=True)[:top]
    else:
        chosen = parse_heads(model, heads)
    writers = upstream_writes(model, named, glob, max(l for l, _ in chosen), upstream)
    vals, ren, srcs, tots = [], [], [], []
    for L, H in chosen:
        v, rn, src = _paths_of_head(model, L, H, reader.reads[L], named[L], writers, r)
        vals.append(v), ren.append(rn), srcs.append(src), tots.append(src.sum(-1))
    labels = tuple(tuple(tuple(_target_label(model, tgt, ids, con, i, s, t) for t in range(r.shape[2]))
                         for s in range(r.shape[1])) for i in range(b))
    return ValuePaths(
        model_name=model.name, heads=tuple(chosen), writers=tuple(w[0] for w in writers) + ("value_bias",),
        writer_kinds=tuple(w[1] for w in writers) + ("bias",), writer_layers=tuple(w[2] for w in writers) + (None,),
        writer_heads=tuple(w[3] for w in writers) + (None,), values=torch.stack(vals), renormed=torch.stack(ren),
        source_values=torch.stack(srcs), head_values=torch.stack(tots), positions=pos_idx,
        str_tokens=batch.str_tokens, target_labels=labels, causal=a.causal)


def _target_label(model, tgt, ids, con, i, s, t) -> str:
    if tgt.kind == "direction":
        return "direction"
    name = model.tokenizer.decode([int(ids[i, s, t])]) if model.tokenizer is not None else str(int(ids[i, s, t]))
    if con is not None:
        name += " - " + (model.tokenizer.decode([int(con[i, s, t])]) if model.tokenizer is not None else str(int(con[i, s, t])))
    return name


def _paths_of_head(model, L: int, H: int, reads, named: dict[str, Tensor], writers, r: Tensor):
    """``(paths (N+1, b, s, t, P), renormed (N+1, ...), per-source (b, s, t, P))`` for head ``H`` of layer ``L``."""
    a = model.arch
    ln1 = model.block_norms.get((L, "ln1"))
    x = named["resid_pre"]  # (b, P, d): what the attention norm reads at every source
    v_in = up(reads.v_in)  # float32 (a half-precision norm of the whole tensor could overflow)
    if ln1 is None or not (ln1(x) - v_in).norm() <= check_tol(model.dtype, 1e-4) * v_in.norm():
        raise UnsupportedModelError(f"{model.name}: layer {L}'s values are not computed from its attention norm of the "
                                    "block input (ln1(resid_pre)), so they do not split over upstream writes")
    r = write_norm_adjoint(model, L, reads, r)
    w_o, _ = model.head_weights(L)
    w_v, b_v = value_map(model, L)
    kv = int(kv_index(a)[H])
    phi = torch.einsum("em,bstm->bste", w_o[H], r)  # (b, s, t, d_head): the readout seen by the head's value
    psi = torch.einsum("de,bste->bstd", w_v[:, kv], phi)  # ... seen by the value's input, ln1(x)
    scale = ln1.scale(x)  # (b, P, 1): frozen
    rho = adjoint(ln1, psi[:, :, :, None, :], scale[:, None, None])  # (b, s, t, P, d): ... seen by x_k
    A = reads.pattern[:, :, H]  # (b, s, P)
    # writers at or after layer L do not reach its values: their write is zero here
    ws = torch.stack([w[4] if w[2] is None or w[2] < L else torch.zeros_like(w[4]) for w in writers])  # (N, b, P, d)
    paths = A[None, :, :, None] * torch.einsum("nbkd,bstkd->nbstk", ws, rho)
    bias = A[:, :, None] * torch.einsum("e,bste->bst", ln1.bias_part(x[0, 0]) @ w_v[:, kv] + b_v[kv], phi)[..., None]
    source = A[:, :, None] * torch.einsum("bke,bste->bstk", reads.v[:, :, kv], phi)
    renormed = torch.empty_like(paths)
    clean = ln1(x)
    for n0 in range(0, len(ws), 16):  # the value norm recomputed without each writer, 16 writers at a time
        delta = clean[None] - ln1(x[None] - ws[n0:n0 + 16])  # (n, b, P, d)
        renormed[n0:n0 + 16] = A[None, :, :, None] * torch.einsum("nbkd,de,bste->nbstk", delta, w_v[:, kv], phi)
    nan = torch.full_like(bias, float("nan"))[None]
    return torch.cat([paths, bias[None]]).cpu(), torch.cat([renormed, nan]).cpu(), source.cpu()
