"""Where each head's contribution to a logit was read from: an exact split by source position.

A head's write at query ``q`` is ``Σ_k A[q, k] · (v_k W_O[h])`` (see :mod:`streamlens.stream.attention`),
and the logit is linear in each write at the final norm's frozen scale, so a head's contribution splits
exactly over the source positions ``k`` it read: ``decompose(..., unit="source")`` gives one component
per (layer, head, source), ``head.l.h@k``, whose values sum to the head's ``unit="head"`` contribution.
The split through the values further, by upstream writer, is :mod:`streamlens.readout.paths`.

**Queries and keys do not split.** They enter through the softmax: ``A`` is not additive in the
writes that form the query or the key, so no exact per-writer share exists. Their causal role is
measured by :func:`streamlens.intervene.reads.remove_from_input`.

Example:
    >>> dec = sl.decompose(model, "The capital of France is", " Paris", unit="source")
    >>> dec.check() <= 1e-4
    True
    >>> df = dec.to_dataframe()            # one row per (prompt, layer, head, source) + source_token
    >>> sorted(set(df[df.kind == "source"].source_token))[:2]
    [' France', ' capital']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from streamlens.errors import StreamlensError
from streamlens.readout.components import BatchDecomposition, Component
from streamlens.readout.targets import readouts
from streamlens.stream.attention import AttentionReader, adjoint, kv_index, source_contributions, source_writes

NOTE_QK = ("exact at the frozen norm scales, with the pattern as the model computed it; queries and keys "
           "enter through the softmax and cannot be split additively: use remove_from_input for their causal role")


def readout_rows(model, tgt, ids, con, x: Tensor, chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(u, c, r)`` at each query: ``(b, s, k, d)``, ``(b, s, k)`` and ``r``, ``u`` read back through the final norm."""
    (_, u, c, shared), = list(readouts(model, tgt, ids, con, chunk_size))
    b, s = x.shape[:2]
    if shared:
        u, c = u.expand(b, s, -1, -1), c.expand(b, s, -1)
    scale = model.final_norm.scale(x)  # (b, s, 1): frozen at this input's value
    return u, c, adjoint(model.final_norm, u, scale[:, :, None])


def source_components(model, n_sources: int) -> list[Component]:
    a = model.arch
    return [Component(f"head.{l}.{h}@{k}", "source", l, h, source=k)
            for l in range(a.n_layers) for h in range(a.n_heads) for k in range(n_sources)]


def split_by_source(model, part: BatchDecomposition, reader: AttentionReader, tgt, chunk_size: int) -> None:
    """Replace every ``head.l.h`` of a ``unit="head"`` batch by its sources ``head.l.h@k`` (just before ``bias``).

    ``reader`` recorded the batch's attention reads at the same queries. The ablated column of a source is the
    target's value with that source's share of the head's write removed and the final norm recomputed.
    """
    a = model.arch
    reader.check()
    x = part.final_in
    b, s = x.shape[:2]
    p = next(iter(reader.reads.values())).v.shape[1]
    u, c, r = readout_rows(model, tgt, part.ids, part.contrast, x, chunk_size)
    labels = [q.label for q in part.components]
    keep = [i for i, q in enumerate(part.components) if q.kind != "head" and q.label != "bias"]
    src_vals, src_abl = [], []
    for l in range(a.n_layers):
        reads = reader.reads.pop(l)
        vals = source_contributions(model, l, reads, r).cpu()  # (b, s, h, P, k)
        src_vals.append(vals.permute(2, 3, 0, 1, 4))  # (h, P, b, s, k)
        abl = torch.empty_like(vals)
        for i in range(b):  # one prompt and query at a time: (h, P, d_model) per-source writes
            for j in range(s):
                w = _writes_at(model, l, reads, i, j)
                abl[i, j] = renormed_without(model.final_norm, x[i, j], w, u[i, j], c[i, j]).cpu()
        src_abl.append(abl.permute(2, 3, 0, 1, 4))
    flat = lambda ts: torch.stack(ts).flatten(0, 2)  # (L, h, P, b, s, k) -> (L·h·P, b, s, k)  # noqa: E731
    bias = labels.index("bias")
    part.components = [part.components[i] for i in keep] + source_components(model, p) + [part.components[bias]]
    part.writes = [part.writes[i] for i in keep]  # per-source writes are not kept (no refinement uses them)
    part.values = torch.cat([part.values[keep], flat(src_vals), part.values[bias:bias + 1]])
    part.ablated = torch.cat([part.ablated[keep], flat(src_abl), part.ablated[bias:bias + 1]])


def _writes_at(model, l: int, reads, i: int, j: int) -> Tensor:
    """Per-source head writes of prompt ``i`` at its ``j``-th query, ``(h, P, d)``, built in place (one tensor)."""
    a = model.arch
    if a.rule.write_norm("attn") is not None:  # Gemma 2: W_O read through the extra norm at this query's scale
        return source_writes(model, l, _row(reads, i))[0, j]
    w_o, _ = model.head_weights(l)
    vh = reads.values_per_head(kv_index(a))[i]  # (P, h, e)
    w = torch.einsum("phe,hem->hpm", vh, w_o.to(vh.device))  # (h, P, d): v_k W_O[h]
    return w.mul_(reads.pattern[i, j][..., None])  # times A[h, q, k]


def renormed_without(norm, x: Tensor, w: Tensor, u: Tensor, c: Tensor) -> Tensor:
    """``u · norm(x − w) + c`` for many writes ``w`` ``(h, P, d)`` at once: ``(h, P, k)``.

    The norm is recomputed without each write in closed form, so that no temporary of ``w``'s size is made:
    with ``C`` the centring (identity for RMSNorm) and ``D = d_model``, ``norm(x − w) = g ⊙ C(x − w) /
    sqrt(|C(x − w)|² / D + eps) + b`` and ``|C(x − w)|² = |Cx|² − 2 Cx·Cw + |Cw|²``. ``x`` is ``(d,)``,
    ``u`` ``(k, d)``, ``c`` ``(k,)``. ``w`` is modified in place.
    """
    x, w = x.float(), w.float()
    if norm.centres:
        x = x - x.mean()
        w -= w.mean(-1, keepdim=True)
    gu = u.float() * (norm.gain.to(u.device).float() if norm.gain is not None else 1.0)  # (k, d)
    const = c + (0.0 if norm.bias is None else u.float() @ norm.bias.to(u.device).float())  # (k,)
    flat = w.reshape(-1, w.shape[-1])  # (h·P, d), a view
    n2 = torch.linalg.vector_norm(flat, dim=-1).square()
    scale = ((x.square().sum() - 2 * (flat @ x) + n2) / x.shape[-1] + norm.eps).sqrt()  # (h·P,)
    num = gu @ x - flat @ gu.T  # (h·P, k)
    return (num / scale[:, None] + const).reshape(*w.shape[:-1], -1)


def _row(reads, i: int):
    """One prompt's reads (a batch of one)."""
    pick = lambda t: None if t is None else t[i : i + 1]  # noqa: E731
    return replace(reads, pattern=pick(reads.pattern), v=pick(reads.v), z=pick(reads.z), v_in=pick(reads.v_in),
                   post_scale=pick(reads.post_scale))


def pad_sources(model, parts: list[BatchDecomposition]) -> None:
    """Give every batch the same source components (0 .. longest batch − 1); shorter batches get zeros there."""
    a = model.arch
    count = lambda part: sum(q.kind == "source" for q in part.components) // (a.n_layers * a.n_heads)  # noqa: E731
    n = max(count(part) for part in parts)
    for part in parts:
        p = count(part)
        if p == n:
            continue
        first = next(i for i, q in enumerate(part.components) if q.kind == "source")
        for key, fill in (("values", 0.0), ("ablated", float("nan"))):
            t = getattr(part, key)
            src = t[first:-1].reshape(a.n_layers, a.n_heads, p, *t.shape[1:])
            pad = src.new_full((a.n_layers, a.n_heads, n - p, *t.shape[1:]), fill)
            setattr(part, key, torch.cat([t[:first], torch.cat([src, pad], 2).flatten(0, 2), t[-1:]]))
        part.components = part.components[:first] + source_components(model, n) + part.components[-1:]


def check_source_target(tgt) -> None:
    if tgt.kind == "vocab":
        raise StreamlensError("unit='source' with target='vocab' would need d_vocab values per head and source position; "
                              "choose tokens, 'top:K' or a direction")


def source_valid(positions: Tensor, lengths: Sequence[int], n_sources: int, causal: bool) -> Tensor:
    """``(prompt, sel, source)``: which sources a query can read (inside the prompt; not after the query if causal)."""
    k = torch.arange(n_sources)
    ok = k[None, None] < torch.as_tensor(list(lengths))[:, None, None]
    return ok & (k[None, None] <= positions[..., None]) if causal else ok.expand(*positions.shape, n_sources)
