"""Where information flows to one prediction: a graph of (layer, position) states from one forward pass.

Nodes are the residual states ``(layer, position)`` (``layer`` 0 … n_layers: the input of block ``l``,
the last one the final residual). Edges are the sub-layer writes that move or make information:

* ``attn`` (layer ``l``, head ``h``): ``(l, source) → (l + 1, destination)``, the head's write at the
  destination split by the source it read (:mod:`streamlens.stream.attention`);
* ``mlp`` (layer ``l``): ``(l, p) → (l + 1, p)``; ``embed``: the token's embedding entering ``(0, p)``.

Each edge is weighted by its **exact** contribution to the target (a logit or logit difference at the
final norm's frozen scale), in two levels:

1. into the predicted position ``q``: every head's per-source contribution, every MLP and the
   embedding at ``q`` (with the output biases they sum to the target's value);
2. through a value read: for each level-1 attention edge kept (``|weight| ≥ threshold`` of the
   level-1 total), its value at the source ``k`` is split over the writes upstream of it at ``k``
   (value norms frozen), and an upstream head's write at ``k`` again over *its* sources ``k'``: edges
   ``(l', k') → (l' + 1, k)``. Per source, level-2 edges (with the biases) sum to the kept level-1
   edges reading there. Queries and keys are not split (they enter through the softmax).

``ifr=True`` adds, for comparison, the Information-Flow-Routes importance of Ferrando & Voita
(2024): each edge's proximity share ``max(0, ‖y‖₁ − ‖y − z‖₁)`` (normalised over the parts of ``y``) of
the write ``z`` in the sum ``y`` it enters (the residual plus every part of the sub-layer's write). It is
a share of a vector, not a contribution to the target, and it is not signed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pandas as pd
import torch
from torch import Tensor

from streamlens.errors import StreamlensError
from streamlens.model import hooks
from streamlens.model.loading import as_model
from streamlens.present.results import Result, fmt
from streamlens.readout.sources import NOTE_QK, check_source_target, readout_rows
from streamlens.readout.targets import readout, resolve
from streamlens.readout.unembed import require_linear_readout, require_two_writers
from streamlens.stream.attention import (AttentionReader, adjoint, kv_index, source_contributions, source_writes,
                                         value_map, write_norm_adjoint)
from streamlens.stream.engine import capture
from streamlens.stream.inputs import encode, select_positions


@dataclass(frozen=True, eq=False)
class FlowGraph(Result):
    """The pruned flow graph of one prompt: ``edges`` is a tidy table, one row per edge.

    Columns: ``level`` (1: into the predicted position, 2: through a value read), ``kind``
    (attn/mlp/embed), ``layer``, ``head``, ``source``, ``destination``, ``source_token``,
    ``destination_token``, ``weight`` (exact contribution to the target) and, with ``ifr=True``, ``ifr``.
    """

    model_name: str
    n_layers: int
    str_tokens: tuple[str, ...]
    position: int
    target: str
    value: float
    edges: pd.DataFrame = field(repr=False)
    gaps: dict[str, float] = field(repr=False, default_factory=dict)
    threshold: float = 0.0
    note: str = NOTE_QK

    def check(self) -> float:
        """Largest relative gap of the two exact sums (before pruning): level 1 vs the model's value, level 2
        vs the level-1 edges it splits."""
        return max(self.gaps.values(), default=0.0)

    def to_dataframe(self) -> pd.DataFrame:
        return self.edges.copy()

    def plot(self):
        from streamlens.present.attention import flow_figure

        return flow_figure(self)

    def metadata(self) -> dict:
        return {"model": self.model_name, "tokens": list(self.str_tokens), "position": self.position,
                "target": self.target, "value": self.value, "threshold": self.threshold, "gaps": self.gaps,
                "note": self.note}

    def describe(self) -> str:
        return (f"of {self.model_name}: target {self.target!r} at position {self.position} (value {fmt(self.value)}), "
                f"{len(self.edges)} edges, check {fmt(self.check())}. {self.note}")

    def html_table(self) -> pd.DataFrame:
        return self.edges.reindex(self.edges["weight"].abs().sort_values(ascending=False).index).head(25)

    def __repr__(self) -> str:
        return (f"FlowGraph({self.model_name!r}, target={self.target!r} at {self.position}, edges={len(self.edges)}, "
                f"check={self.check():.1e})")


def _at(reads, q: int):
    """A layer's reads with the pattern row (and Gemma 2 scale, z) of query ``q`` only (batch of one)."""
    pick = lambda t: None if t is None else t[:, q : q + 1]  # noqa: E731
    return replace(reads, pattern=pick(reads.pattern), z=pick(reads.z), post_scale=pick(reads.post_scale))


def _ifr(parts: Tensor, y: Tensor) -> Tensor:
    """Proximity importances of ``parts`` (n, d) in their sum ``y`` (d), normalised to sum to one (Ferrando & Voita)."""
    imp = (y.abs().sum() - (y[None] - parts).abs().sum(-1)).clamp_min(0)
    return imp / imp.sum().clamp_min(1e-12)


def information_flow(model, prompt, target, *, contrast=None, positions: int | str = -1, threshold: float = 0.02,
                     ifr: bool = False) -> FlowGraph:
    """Build the flow graph of one prompt's prediction of ``target`` at ``positions`` (see the module docs).

    Args:
        model: a :class:`~streamlens.Model`.
        prompt: one prompt (string or token ids).
        target: one token (or ``"top:1"``, or a direction); ``contrast`` for a logit difference.
        positions: the one predicted position, in the positions vocabulary of every verb (an int, negative
            counting back from the last token, or ``"last"``; default ``-1``).
        threshold: keep edges whose |weight| is at least this fraction of the level-1 total |weight|.
        ifr: add the Information-Flow-Routes importance of each edge (``ifr`` column).
    """
    model = as_model(model)
    require_linear_readout(model, "information_flow")
    require_two_writers(model, "information_flow")
    a = model.arch
    if not isinstance(prompt, str) and not (isinstance(prompt, Tensor) and prompt.dim() == 1) \
            and not (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
        raise StreamlensError("information_flow takes one prompt (a string or a list of token ids), not a batch")
    batch = encode(model, [prompt] if isinstance(prompt, (str, Tensor)) else [prompt])
    pos_idx, _ = select_positions(batch, positions)
    if pos_idx.shape[1] != 1:
        raise StreamlensError(f"information_flow follows one prediction: positions={positions!r} selects "
                              f"{pos_idx.shape[1]} positions; give one (e.g. -1)")
    tgt = resolve(model, target, contrast, 1)
    check_source_target(tgt)
    if tgt.kind == "top" and tgt.k != 1:
        raise StreamlensError(f"information_flow follows one target; got top:{tgt.k}")
    p, q = batch.input_ids.shape[1], int(pos_idx[0, 0])
    named, glob = {}, {}
    reader = AttentionReader(model, (1, p), pos_idx, range(a.n_layers), all_positions=True)
    with hooks.attached(reader.hooks()):
        logits = capture(model, batch, None, layers=range(a.n_layers), heads=True, store=lambda t: t.float(),
                         on_layer=named.__setitem__, on_global=glob.__setitem__)
    reader.check()
    lg = logits[:, q : q + 1].float()
    ids, con = readout(model, tgt, lg)
    x = glob["final_in"][:, q : q + 1]
    u, c, r = readout_rows(model, tgt, ids, con, x, 4096)  # (1, 1, 1, d): u, and r read through the final norm
    value = float(lg[0, 0, ids[0, 0, 0]] - (0 if con is None else lg[0, 0, con[0, 0, 0]])) if ids is not None \
        else float(glob["final_out"][0, q].float() @ tgt.direction.to(x.device))
    embed = named[0]["resid_pre"][0] if not (a.embed_is_sum and "embed" in glob) else \
        (glob["embed"][0] + (glob["pos_embed"][0] if a.has_pos_embed and "pos_embed" in glob else 0))
    rows, r0 = [], r[0, 0, 0]

    # level 1: everything written at the predicted position q
    lvl1 = torch.stack([source_contributions(model, l, _at(reader.reads[l], q), r)[0, 0, :, :, 0]
                        for l in range(a.n_layers)]).cpu()  # (L, h, P)
    direct = {l: float(named[l]["mlp_out"][0, q] @ r0) for l in range(a.n_layers)}
    biases = sum(float(named[l]["attn_bias_out"][0, q] @ r0) for l in range(a.n_layers))
    emb = float(embed[q] @ r0)
    total = float(lvl1.sum()) + sum(direct.values()) + biases + emb + float(c[0, 0, 0]) + \
        float(model.final_norm.bias_part(x)[0, 0] @ u[0, 0, 0])
    gaps = {"level1": abs(total - value) / max(abs(value), 1e-12)}
    cut = threshold * (float(lvl1.abs().sum()) + sum(abs(v) for v in direct.values()) + abs(emb))
    for l, h, k in (lvl1.abs() >= cut).nonzero().tolist():
        rows.append(dict(level=1, kind="attn", layer=l, head=h, source=k, destination=q, weight=float(lvl1[l, h, k])))
    rows += [dict(level=1, kind="mlp", layer=l, head=None, source=q, destination=q, weight=w)
             for l, w in direct.items() if abs(w) >= cut]
    if abs(emb) >= cut:
        rows.append(dict(level=1, kind="embed", layer=-1, head=None, source=q, destination=q, weight=emb))

    # level 2: the kept level-1 attention edges' values, split over the writes upstream at their source
    kept = [(e["layer"], e["head"], e["source"]) for e in rows if e["kind"] == "attn"]
    worst = 0.0
    for k in sorted({k for _, _, k in kept}):
        reading = [(l, h) for l, h, kk in kept if kk == k]
        rho = {}  # layer l -> the readout that x_k is read with through that layer's kept heads
        for l, h in reading:
            rho[l] = rho.get(l, 0) + _value_readout(model, l, h, reader.reads[l], named[l], q, k, r)
        want = float(sum(lvl1[l, h, k] for l, h in reading))
        got = 0.0
        for l2 in range(max(rho)):
            R = sum(v for l, v in rho.items() if l > l2)  # (d,)
            if not isinstance(R, Tensor):
                continue
            src = source_contributions(model, l2, _at(reader.reads[l2], k), R[None, None, None])[0, 0, :, :, 0].cpu()
            m = float(named[l2]["mlp_out"][0, k] @ R)
            got += float(src.sum()) + m + float(named[l2]["attn_bias_out"][0, k] @ R)
            rows += [dict(level=2, kind="attn", layer=l2, head=h2, source=k2, destination=k, weight=float(src[h2, k2]))
                     for h2, k2 in (src.abs() >= cut).nonzero().tolist()]
            if abs(m) >= cut:
                rows.append(dict(level=2, kind="mlp", layer=l2, head=None, source=k, destination=k, weight=m))
        R_all = sum(rho.values())
        e = float(embed[k] @ R_all)
        got += e + sum(_value_bias(model, l, h, reader.reads[l], q, k, r) for l, h in reading)
        if abs(e) >= cut:
            rows.append(dict(level=2, kind="embed", layer=-1, head=None, source=k, destination=k, weight=e))
        worst = max(worst, abs(got - want) / max(abs(value), 1e-12))
    gaps["level2"] = worst
    edges = pd.DataFrame(rows, columns=["level", "kind", "layer", "head", "source", "destination", "weight"])
    edges["head"] = pd.array(edges["head"], dtype="Int64")
    toks = batch.str_tokens[0]
    edges.insert(6, "source_token", [toks[s] for s in edges["source"]])
    edges.insert(7, "destination_token", [toks[d] for d in edges["destination"]])
    if ifr:
        edges["ifr"] = [_edge_ifr(model, reader.reads, named, e) for e in edges.itertuples()]
    name = "direction" if ids is None else model.tokenizer.decode([int(ids[0, 0, 0])])
    if con is not None:
        name += " - " + model.tokenizer.decode([int(con[0, 0, 0])])
    return FlowGraph(model.name, a.n_layers, toks, q, name, value, edges, gaps, threshold)


def _value_readout(model, l, h, reads, named_l, q, k, r) -> Tensor:
    """``A[q, k] · adjoint(ln1 at k, W_V (W_O[h] r'))``: the vector ``x_k`` is read with through head ``h``'s value."""
    a = model.arch
    r = write_norm_adjoint(model, l, _at(reads, q), r)[0, 0, 0]
    w_o, _ = model.head_weights(l)
    w_v, _ = value_map(model, l)
    kv = int(kv_index(a)[h])
    psi = w_v[:, kv] @ (w_o[h] @ r)  # (d,)
    ln1 = model.block_norms[(l, "ln1")]
    return reads.pattern[0, q, h, k] * adjoint(ln1, psi, ln1.scale(named_l["resid_pre"][0, k]))


def _value_bias(model, l, h, reads, q, k, r) -> float:
    """The value's bias share (the value norm's bias and ``b_V``) of head ``h``'s read at ``k``."""
    a = model.arch
    r = write_norm_adjoint(model, l, _at(reads, q), r)[0, 0, 0]
    w_o, _ = model.head_weights(l)
    w_v, b_v = value_map(model, l)
    kv = int(kv_index(a)[h])
    ln1 = model.block_norms[(l, "ln1")]
    bias = ln1.bias_part(r) @ w_v[:, kv] + b_v[kv]
    return float(reads.pattern[0, q, h, k] * (bias @ (w_o[h] @ r)))


def _edge_ifr(model, reads, named, e) -> float:
    """Information-Flow-Routes importance of one edge within the sum it enters at its destination."""
    if e.kind == "embed":
        return float("nan")
    l, d = e.layer, e.destination
    pre = named[l]["resid_pre"][0, d]
    if e.kind == "mlp":
        mid = named[l]["resid_mid"][0, d] if "resid_mid" in named[l] else pre
        return float(_ifr(torch.stack([mid, named[l]["mlp_out"][0, d]]), mid + named[l]["mlp_out"][0, d])[1])
    w = source_writes(model, l, _at(reads[l], d))[0, 0]  # (h, P, d)
    parts = torch.cat([pre[None], named[l]["attn_bias_out"][0, d][None], w.flatten(0, 1)])
    imp = _ifr(parts, pre + named[l]["attn_out"][0, d])
    return float(imp[2 + e.head * w.shape[1] + e.source])
