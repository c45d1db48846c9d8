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

import torch
from torch import Tensor

from streamlens import hooks
from streamlens.decompose import _decompose_batch, _readouts
from streamlens.errors import StreamlensError
from streamlens.stream.attention import AttentionReader, adjoint, source_contributions, source_writes


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
        for i in range(b):  # one prompt at a time: (s, h, P, d_model) per-source writes
            w = source_writes(model, l, _row(reads, i))[0]
            renorm = model.final_norm(x[i][:, None, None] - w)  # the final norm recomputed without each source
            abl[i] = (torch.einsum("shpd,skd->shpk", renorm, u[i]) + c[i][:, None, None]).cpu()
        src_abl.append(abl.permute(2, 3, 0, 1, 4))
    comps = [(*out["comps"][i], None, None)[:6] for i in keep]
    comps += [(f"head.{l}.{h}@{k}", "source", l, h, None, k)
              for l in range(a.n_layers) for h in range(a.n_heads) for k in range(p)]
    flat = lambda ts: torch.stack(ts).flatten(0, 2)  # (L, h, P, b, s, k) -> (L·h·P, b, s, k)  # noqa: E731
    out.update(comps=comps, vals=torch.cat([out["vals"][keep], flat(src_vals), out["vals"][-1:]]),
               abl=torch.cat([out["abl"][keep], flat(src_abl), out["abl"][-1:]]), source_gap=worst, n_sources=p)
    return out


def _row(reads, i: int):
    from dataclasses import replace

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
