"""Where each head's contribution to a logit was read from: exact splits by source position and by value path.

**By source.** A head's write at query ``q`` is ``Σ_k A[q, k] · (v_k W_O[h])`` (see
:mod:`streamlens.stream.attention`), and the logit is linear in each write at the final norm's frozen
scale, so a head's contribution splits exactly over the source positions ``k`` it read:
``decompose(..., unit="source")`` gives one component per (layer, head, source), whose values sum to
the head's ``unit="head"`` contribution.

**By value path.** The value at source ``k`` is ``norm(x_k) W_V + b_V`` and ``x_k`` is itself the sum
of every upstream write at ``k``. With that norm's scale frozen at its value on this input (the
convention the decomposition uses for the final norm), the value, and so the head's contribution,
splits exactly over (upstream writer at ``k``) → (head) → target: :func:`value_paths`. The column
``direct_effect_renormed`` gives each path with the value norm *recomputed* without the writer, to
show what freezing the scale costs.

**Queries and keys do not split.** They enter through the softmax: ``A`` is not additive in the
writes that form the query or the key, so no exact per-writer share exists. The causal counterpart
is :func:`remove_from_input`: remove one writer from a head's query, key or value input only and
measure the head's pattern and the target logit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from streamlens import hooks
from streamlens.decompose import _decompose_batch, _readouts
from streamlens.errors import StreamlensError, UnsupportedModelError
from streamlens.stream.attention import (AttentionReader, adjoint, kv_index, source_contributions, source_writes,
                                         value_map)

NOTE_QK = ("exact at the value norm's frozen scale, with the pattern as the model computed it; queries and keys "
           "enter through the softmax and cannot be split additively: use remove_from_input for their causal role")


# ---------------------------------------------------------------------------- decompose(unit="source")
def readout_rows(model, tgt, ids, con, x: Tensor, chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(u, c, r)`` at each query, ``(b, s, k, d)``, ``(b, s, k)`` and ``r = adjoint of the final norm · u``."""
    (_, u, c, shared), = list(_readouts(model, tgt, ids, con, chunk_size))
    b, s = x.shape[:2]
    if shared:
        u, c = u.expand(b, s, -1, -1), c.expand(b, s, -1)
    scale = model.final_norm.scale(x)  # (b, s, 1): frozen at this input's value
    return u, c, adjoint(model.final_norm, u, scale[:, :, None])


def source_batch(model, batch, pos_idx, tgt, chunk_size: int) -> dict:
    """One batch of ``decompose(unit="source")``: the ``unit="head"`` batch with every head split by source."""
    a = model.arch
    b, p = batch.input_ids.shape
    reader = AttentionReader(model, (b, p), pos_idx, range(a.n_layers))
    with hooks.attached(reader.hooks()):
        out = _decompose_batch(model, batch, pos_idx, tgt, "head", (), chunk_size)
    reader.check()
    x = out["x"]
    u, c, r = readout_rows(model, tgt, out["ids"], out["con"], x, chunk_size)
    labels = [q[0] for q in out["comps"]]
    keep = [i for i, q in enumerate(out["comps"]) if q[1] != "head"]
    src_vals, src_abl, worst = [], [], 0.0
    for l in range(a.n_layers):
        reads = reader.reads.pop(l)
        vals = source_contributions(model, l, reads, r).cpu()  # (b, s, h, P, k)
        heads = out["vals"][[labels.index(f"head.{l}.{h}") for h in range(a.n_heads)]]  # (h, b, s, k)
        gap = (vals.sum(3).permute(2, 0, 1, 3) - heads).abs().max()
        worst = max(worst, float(gap / out["model"].abs().max().clamp_min(1e-12)))
        src_vals.append(vals.permute(2, 3, 0, 1, 4))  # (h, P, b, s, k)
        abl = torch.empty_like(vals)
        for i in range(b):  # one prompt and head at a time: (s, P, d_model) per-source writes
            row = _row(reads, i)
            for h in range(a.n_heads):
                w = source_writes(model, l, row, heads=[h])[0, :, 0]
                renorm = model.final_norm(x[i][:, None] - w)  # the final norm recomputed without each source
                abl[i, :, h] = (torch.einsum("spd,skd->spk", renorm, u[i]) + c[i][:, None]).cpu()
        src_abl.append(abl.permute(2, 3, 0, 1, 4))
    comps = [(*out["comps"][i], None, None)[:6] for i in keep]
    comps += [(f"head.{l}.{h}@{k}", "source", l, h, None, k)
              for l in range(a.n_layers) for h in range(a.n_heads) for k in range(p)]
    flat = lambda ts: torch.stack(ts).flatten(0, 2)  # (L, h, P, b, s, k) -> (L·h·P, b, s, k)  # noqa: E731
    out.update(comps=comps, vals=torch.cat([out["vals"][keep], flat(src_vals), out["vals"][-1:]]),
               abl=torch.cat([out["abl"][keep], flat(src_abl), out["abl"][-1:]]), source_gap=worst, n_sources=p)
    return out


def _row(reads, i: int):
    """One prompt's reads (a batch of one)."""
    pick = lambda t: None if t is None else t[i : i + 1]  # noqa: E731
    return replace(reads, pattern=pick(reads.pattern), v=pick(reads.v), z=pick(reads.z), v_in=pick(reads.v_in),
                   post_scale=pick(reads.post_scale))


def pad_sources(model, outs: list[dict]) -> None:
    """Give every batch the same source components (0 .. longest batch − 1); shorter batches get zeros there."""
    a = model.arch
    n = max(o["n_sources"] for o in outs)
    for o in outs:
        p = o["n_sources"]
        if p == n:
            continue
        first = next(i for i, q in enumerate(o["comps"]) if q[1] == "source")
        for key, fill in (("vals", 0.0), ("abl", float("nan"))):
            t = o[key]
            src = t[first:-1].reshape(a.n_layers, a.n_heads, p, *t.shape[1:])
            pad = src.new_full((a.n_layers, a.n_heads, n - p, *t.shape[1:]), fill)
            o[key] = torch.cat([t[:first], torch.cat([src, pad], 2).flatten(0, 2), t[-1:]])
        o["comps"] = o["comps"][:first] + [(f"head.{l}.{h}@{k}", "source", l, h, None, k)
                                           for l in range(a.n_layers) for h in range(a.n_heads) for k in range(n)]
        o["n_sources"] = n


def check_source_target(tgt) -> None:
    if tgt.kind == "vocab":
        raise StreamlensError("unit='source' with target='vocab' would need d_vocab values per head and source position; "
                              "choose tokens, 'top:K' or a direction")


def source_valid(positions: Tensor, lengths: Sequence[int], n_sources: int, causal: bool) -> Tensor:
    """``(prompt, sel, source)``: which sources a query can read (inside the prompt; not after the query if causal)."""
    k = torch.arange(n_sources)
    ok = k[None, None] < torch.as_tensor(list(lengths))[:, None, None]
    return ok & (k[None, None] <= positions[..., None]) if causal else ok.expand(*positions.shape, n_sources)


# ---------------------------------------------------------------------------- value paths
@dataclass(frozen=True, eq=False)
class ValuePaths:
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

    def save(self, path: str | Path) -> Path:
        """The tidy table as ``.csv`` or ``.json`` (records), by extension."""
        return save_table(self.to_dataframe(), path)

    def __repr__(self) -> str:
        return (f"ValuePaths({self.model_name!r}, heads={['head.%d.%d' % h for h in self.heads]}, "
                f"writers={len(self.writers)}, prompts={self.values.shape[2]}, check={self.check():.1e})")

    def _repr_html_(self) -> str:
        return (f"<b>ValuePaths</b> of <code>{self.model_name}</code>: check {self.check():.1e}<br>{self.note}"
                + self.top(20).to_html(index=False, float_format=lambda v: f"{v:.4g}"))


def save_table(df: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix not in (".csv", ".json"):
        raise StreamlensError(f"save path {str(path)!r}: use a .csv or .json extension")
    if path.suffix == ".json":
        df.to_json(path, orient="records", indent=2)
    else:
        df.to_csv(path, index=False)
    return path


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


def parse_heads(model, heads) -> list[tuple[int, int]]:
    """``"head.1.2"``, ``(1, 2)`` or a list of them -> checked ``(layer, head)`` pairs."""
    from streamlens.ablate import parse_unit

    if isinstance(heads, (str, tuple)) and not (isinstance(heads, tuple) and heads and isinstance(heads[0], tuple)):
        heads = [heads]
    out = []
    for spec in heads:
        unit = parse_unit(model, ("head", *spec) if isinstance(spec, tuple) and not isinstance(spec[0], str) else spec)
        if unit.kind != "head":
            raise StreamlensError(f"{spec!r} is not an attention head: write 'head.LAYER.HEAD' or (LAYER, HEAD)")
        out.append((unit.layer, unit.head))
    return out


def value_paths(model, inputs, target, *, contrast=None, position=-1, heads=None, top: int = 3,
                upstream: str = "head", chunk_size: int = 4096) -> ValuePaths:
    """Split chosen heads' contributions to ``target`` over (upstream writer at source k) → head → target.

    Args:
        model, inputs, target, contrast, position: as for :func:`streamlens.decompose` (one padded batch).
        heads: the heads to expand (``"head.1.2"``, ``(1, 2)`` or a list); default the ``top`` heads by
            mean |contribution|.
        top: how many heads when ``heads`` is None.
        upstream: ``"head"`` (every upstream head, its layer's output bias, MLPs, embeddings) or ``"layer"``
            (``attn.l`` and ``mlp.l``).

    Returns:
        :class:`ValuePaths`; ``check()`` ≤ 1e-4 in float32. One forward pass; it keeps every layer's writes
        at every position (``layers × pos × heads × d_model`` floats for ``upstream="head"``).
    """
    from streamlens.capture import SUBLAYERS, _run_capture
    from streamlens.inputs import encode, select_positions
    from streamlens.model import as_model
    from streamlens.targets import readout, require_unembed_path, resolve

    model = as_model(model)
    require_unembed_path(model, "value_paths")
    a = model.arch
    if upstream not in ("head", "layer"):
        raise StreamlensError(f"upstream must be 'head' or 'layer', got {upstream!r}")
    batch = encode(model, inputs)
    pos_idx, _ = select_positions(batch, position)
    tgt = resolve(model, target, contrast, len(batch))
    check_source_target(tgt)
    b, p = batch.input_ids.shape
    named: dict[int, dict[str, Tensor]] = {}
    glob: dict[str, Tensor] = {}
    reader = AttentionReader(model, (b, p), pos_idx, range(a.n_layers), keep_value_input=True)
    with hooks.attached(reader.hooks()):
        logits = _run_capture(model, batch, pos_idx, layers=range(a.n_layers), sublayers=SUBLAYERS,
                              heads=upstream == "head", store=lambda t: t.float(), all_positions=True,
                              on_layer=named.__setitem__, on_global=glob.__setitem__)
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
    if ln1 is None or not (ln1(x) - reads.v_in).norm() <= 1e-4 * reads.v_in.norm():
        raise UnsupportedModelError(f"{model.name}: layer {L}'s values are not computed from its attention norm of the "
                                    "block input (ln1(resid_pre)), so they do not split over upstream writes")
    if a.layout == "sandwich":
        r = adjoint(model.block_norms[(L, "ln1_post")], r, reads.post_scale[:, :, None])
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
