"""The logit lens: read every intermediate residual as if it were the last one.

At each layer's ``resid_pre``, ``resid_mid`` (sequential blocks) and ``resid_post``, the residual
``x`` goes through the model's own final norm, *with x's own statistics* (not the final residual's),
and the unembedding: ``lens_logits = W_U · ln_final(x) + b_U`` (with the model's own logit scale and
final soft-cap where it has them). For each point streamlens reports the
top-k tokens with their probabilities, the target's rank and probability (when a target is given),
and ``KL(P_model ‖ P_lens) = Σ_v p_model(v) (log p_model(v) − log p_lens(v))`` against the model's
own final distribution. The vocabulary is processed ``chunk_size`` rows at a time with a running
log-sum-exp, so memory stays at ``points × positions × chunk_size``.

Example:
    >>> lens = streamlens.logit_lens(model, "The capital of France is", target=" Paris", positions="last", progress=False)
    >>> lens.to_dataframe()[["point", "layer", "top_token", "top_prob", "target_rank", "kl"]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from streamlens.errors import StreamlensError
from streamlens.model.loading import Model, as_model
from streamlens.present.results import Result
from streamlens.readout.targets import target_ids
from streamlens.readout.unembed import require_linear_readout, unembed_matrices, vocab_chunks
from streamlens.stream.engine import capture
from streamlens.stream.inputs import Inputs, Positions, as_sequences, batches, encode, recorded, select_positions


@dataclass(frozen=True, eq=False)
class LogitLens(Result):
    """Logit-lens readings: ``[point, prompt, sel]`` for every point ``points[p]`` (e.g. ``"resid_mid.3"``)."""

    model_name: str
    points: tuple[str, ...]
    point_layers: tuple[int, ...]
    positions: Int[Tensor, "prompt sel"] = field(repr=False)
    mask: Bool[Tensor, "prompt sel"] = field(repr=False)
    top_ids: Int[Tensor, "point prompt sel k"] = field(repr=False)
    top_probs: Float[Tensor, "point prompt sel k"] = field(repr=False)
    kl: Float[Tensor, "point prompt sel"] = field(repr=False)
    target_ids: Int[Tensor, " prompt"] | None = field(repr=False, default=None)
    target_probs: Float[Tensor, "point prompt sel"] | None = field(repr=False, default=None)
    target_ranks: Int[Tensor, "point prompt sel"] | None = field(repr=False, default=None)
    token_names: dict[int, str] = field(repr=False, default_factory=dict)
    str_tokens: tuple[tuple[str, ...], ...] = field(repr=False, default=())

    def __post_init__(self):
        if self.kl.shape != (len(self.points), *self.mask.shape):
            raise StreamlensError(f"kl has shape {tuple(self.kl.shape)}, expected {(len(self.points), *self.mask.shape)}")

    def _name(self, i: int) -> str:
        return self.token_names.get(int(i), str(int(i)))

    def to_dataframe(self) -> pd.DataFrame:
        """Tidy: one row per point, prompt and real position.

        Columns: ``point``, ``kind`` (resid_pre/resid_mid/resid_post), ``layer``, ``prompt``, ``sel``,
        ``position``, ``token`` (the input token there), ``top_token``, ``top_prob``, ``top_tokens``,
        ``top_probs`` (lists, best first), ``kl``, and ``target``, ``target_prob``, ``target_rank``
        (0 = the lens's top token) when a target was given.
        """
        rows = []
        P, n, s = self.kl.shape
        for p in range(P):
            for i in range(n):
                for j in range(s):
                    if not self.mask[i, j]:
                        continue
                    pos = int(self.positions[i, j])
                    ids, probs = self.top_ids[p, i, j].tolist(), self.top_probs[p, i, j].tolist()
                    row = {"point": self.points[p], "kind": self.points[p].split(".")[0], "layer": self.point_layers[p],
                           "prompt": i, "sel": j, "position": pos,
                           "token": self.str_tokens[i][pos] if self.str_tokens else None,
                           "top_token": self._name(ids[0]), "top_prob": probs[0],
                           "top_tokens": [self._name(t) for t in ids], "top_probs": probs, "kl": float(self.kl[p, i, j])}
                    if self.target_ids is not None:
                        row.update(target=self._name(self.target_ids[i]), target_prob=float(self.target_probs[p, i, j]),
                                   target_rank=int(self.target_ranks[p, i, j]))
                    rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, prompt: int = 0):
        """Heatmap point × position of KL (or target probability), annotated with the top token."""
        from streamlens.present import figures

        return figures.lens_figure(self, prompt=prompt)

    def metadata(self) -> dict[str, Any]:
        return {"model": self.model_name, "points": list(self.points)}

    def describe(self) -> str:
        return f"of {self.model_name}: {len(self.points)} points, {int(self.mask.sum())} positions"

    def html_table(self) -> pd.DataFrame:
        return self.to_dataframe().drop(columns=["top_tokens", "top_probs"])

    def __repr__(self) -> str:
        return f"LogitLens({self.model_name!r}, points={len(self.points)}, prompts={self.mask.shape[0]}, positions={int(self.mask.sum())})"


def _lens_batch(model: Model, batch, pos_idx, target_ids, k: int, chunk_size: int):
    a, norm = model.arch, model.final_norm
    pts: list[tuple[str, int, Tensor]] = []

    def on_layer(layer, named):
        for name in ("resid_pre", "resid_mid", "resid_post"):
            if name in named:
                pts.append((f"{name}.{layer}", layer, named[name]))

    logits = capture(model, batch, pos_idx, layers=range(a.n_layers), store=lambda t: t.float(), on_layer=on_layer)
    xs = norm(torch.stack([q[2] for q in pts]))  # (P, b, s, d): each point with its own statistics
    logp_model = torch.log_softmax(logits.float(), -1)  # (b, s, V)
    W, bU = unembed_matrices(model)
    P, b, s, _ = xs.shape
    lse = torch.full((P, b, s), float("-inf"), device=xs.device)
    cross = torch.zeros(P, b, s, device=xs.device)  # Σ_v p_model(v) · lens_logit(v)
    top_v = torch.full((P, b, s, k), float("-inf"), device=xs.device)
    top_i = torch.zeros((P, b, s, k), dtype=torch.long, device=xs.device)
    if target_ids is not None:
        t = target_ids.to(W.device)[:, None].expand(b, s)
        t_logit = a.soft_cap(torch.einsum("pbsd,bsd->pbs", xs, W[t]) + bU[t])
        above = torch.zeros(P, b, s, dtype=torch.long, device=xs.device)
    for sl in vocab_chunks(a.d_vocab, chunk_size):
        lg = a.soft_cap(xs @ W[sl].T + bU[sl])  # (P, b, s, chunk): the model's own readout, soft-cap included
        lse = torch.logaddexp(lse, torch.logsumexp(lg, -1))
        cross += (lg * logp_model[..., sl].exp()).sum(-1)
        both_v = torch.cat([top_v, lg], -1)
        both_i = torch.cat([top_i, torch.arange(sl.start, sl.stop, device=xs.device).expand_as(lg)], -1)
        top_v, j = both_v.topk(min(k, both_v.shape[-1]), dim=-1)
        top_i = both_i.gather(-1, j)
        if target_ids is not None:  # strictly larger logits, the target's own column excluded
            other = torch.arange(sl.start, sl.stop, device=xs.device) != t[..., None]  # (b, s, chunk)
            above += ((lg > t_logit[..., None]) & other).sum(-1)
    neg_entropy = (logp_model.exp() * logp_model).sum(-1)  # Σ p log p
    kl = (neg_entropy - cross + lse).clamp_min(0.0)
    out = dict(points=[q[:2] for q in pts], top_ids=top_i.cpu(), top_probs=(top_v - lse[..., None]).exp().cpu(), kl=kl.cpu())
    if target_ids is not None:
        out.update(target_probs=(t_logit - lse).exp().cpu(), target_ranks=above.cpu())
    return out


@recorded
def logit_lens(
    model: Model | Any,
    inputs: Inputs,
    *,
    target: Any = None,
    positions: Positions = None,
    k: int = 5,
    batch_size: int = 8,
    chunk_size: int = 4096,
    progress: bool = True,
    prepend_bos: bool | None = None,
) -> LogitLens:
    """Push every layer's ``resid_pre``, ``resid_mid`` and ``resid_post`` through the final norm and unembedding.

    Args:
        model: a :class:`~streamlens.Model` (or anything :func:`streamlens.load` takes).
        inputs: a prompt, a list of prompts (processed ``batch_size`` at a time) or token ids.
        target: optional token (one-token string or id), or one per prompt: report its rank and probability.
        positions: ``None`` (every real token), ``"last"``, ints (negative from each prompt's last token),
            a ``slice`` or a boolean mask (:func:`streamlens.stream.inputs.select_positions`).
        k: how many top tokens to keep per point.
        chunk_size: vocabulary rows per step.
        progress: show a progress bar over batches.
        prepend_bos: put the tokenizer's BOS token in front of each text (None, the default: when it
            has one; see :mod:`streamlens.stream.inputs`); recorded in the result.
    """
    from tqdm.auto import tqdm

    model = as_model(model)
    require_linear_readout(model, "logit_lens")
    if not isinstance(k, int) or not 1 <= k <= model.arch.d_vocab:
        raise StreamlensError(f"k must be an int between 1 and {model.arch.d_vocab}, got {k!r}")
    items = as_sequences(inputs)
    chunks = list(batches(items, batch_size))
    tids = target_ids(model, target, len(items))
    outs, pos, masks, strs = [], [], [], []
    for start, chunk in tqdm(chunks, desc="logit_lens", unit="batch", disable=not progress):
        batch = encode(model, chunk, prepend_bos=prepend_bos)
        idx, mask = select_positions(batch, positions)
        outs.append(_lens_batch(model, batch, idx, None if tids is None else tids[start:start + len(batch)], k, chunk_size))
        pos.append(idx), masks.append(mask), strs.extend(batch.str_tokens)
    width = max(p.shape[1] for p in pos)  # batches differ in length when every position is kept

    def pad(t: Tensor, dim: int, value=0) -> Tensor:
        shape = list(t.shape)
        shape[dim] = width - t.shape[dim]
        return torch.cat([t, torch.full(shape, value, dtype=t.dtype)], dim)

    cat = lambda key, dim: torch.cat([pad(o[key], dim) for o in outs], dim - 1)  # noqa: E731
    top_ids = cat("top_ids", 2)
    used = sorted(set(top_ids.unique().tolist() + ([] if tids is None else tids.tolist())))
    names = {} if model.tokenizer is None else {i: model.tokenizer.decode([i]) for i in used}
    return LogitLens(
        model_name=model.name, points=tuple(q[0] for q in outs[0]["points"]),
        point_layers=tuple(q[1] for q in outs[0]["points"]),
        positions=torch.cat([pad(p, 1) for p in pos]), mask=torch.cat([pad(m, 1, False) for m in masks]),
        top_ids=top_ids, top_probs=cat("top_probs", 2), kl=cat("kl", 2), target_ids=tids,
        target_probs=None if tids is None else cat("target_probs", 2),
        target_ranks=None if tids is None else cat("target_ranks", 2),
        token_names=names, str_tokens=tuple(strs),
    )
