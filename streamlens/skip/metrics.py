"""Pure tensor functions comparing a clean forward pass with an ablated one.

Every function works position by position on flattened rows ``(n, ...)``; averaging over
positions and documents, and confidence intervals, are separate (:func:`ratio_bootstrap`).

* ``kl(p || q) = sum_v p_v (log p_v - log q_v)``, ``p`` the clean next-token distribution.
* ``delta_ce = -log q[target] - (-log p[target])``: how much worse the ablated model predicts the
  data's own next token (positive = worse).
* ``top1``: 1 where the ablated argmax equals the clean argmax.
* ``topk``: ``|topk(p) ∩ topk(q)| / k``.
* ``angle``: angular distance ``arccos(cos(a, b)) / pi`` in [0, 1] between two residual vectors.
* ``block_influence``: ``1 - cos(resid_pre, resid_post)`` (Men et al. 2024, "ShortGPT").
* ``logit_diff``: ``logit[correct] - logit[wrong]``; its retained fraction is ablated / clean.

:func:`row_metrics` computes the metrics a sweep asks for (names in :data:`METRICS`) for one batch's
selected rows against its clean pass.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor

from streamlens.errors import StreamlensError
from streamlens.stream.engine import check_finite

#: Metric names a user may ask for -> the column they fill ("ce" is delta_ce). Task metrics
#: (:mod:`streamlens.skip.tasks`): ``logit_diff`` (retained fraction of the clean logit difference) and
#: ``mc_accuracy`` (multiple-choice accuracy); a callable is a user-supplied metric.
METRICS = {"kl": "kl", "ce": "delta_ce", "delta_ce": "delta_ce", "top1": "top1", "topk": "topk", "angle": "angle",
           "logit_diff": "logit_diff", "mc_accuracy": "mc_accuracy"}
#: Whether a larger value of a metric means more damage.
HIGHER_IS_WORSE = {"kl": True, "delta_ce": True, "top1": False, "topk": False, "angle": True, "logit_diff": False,
                   "mc_accuracy": False}
#: A metric whose per-document sums are divided by another sum instead of a position count.
RATIO_OF = {"logit_diff": "logit_diff_clean"}


def kl(clean_logp: Float[Tensor, "n vocab"], ablated_logp: Float[Tensor, "n vocab"]) -> Float[Tensor, " n"]:
    """``KL(clean || ablated)`` per row, from log-probabilities (natural log, nats)."""
    return (clean_logp.exp() * (clean_logp - ablated_logp)).sum(-1).clamp_min(0.0)


def delta_ce(
    clean_logp: Float[Tensor, "n vocab"], ablated_logp: Float[Tensor, "n vocab"], targets: Int[Tensor, " n"]
) -> Float[Tensor, " n"]:
    """Change of cross-entropy on ``targets``: ``-log q[t] + log p[t]`` per row (nats)."""
    t = targets[:, None]
    return clean_logp.gather(-1, t)[:, 0] - ablated_logp.gather(-1, t)[:, 0]


def top1(clean_logits: Float[Tensor, "n vocab"], ablated_logits: Float[Tensor, "n vocab"]) -> Float[Tensor, " n"]:
    """1.0 where the ablated top-1 token equals the clean one, else 0.0."""
    return (clean_logits.argmax(-1) == ablated_logits.argmax(-1)).float()


def topk_overlap(
    clean_logits: Float[Tensor, "n vocab"], ablated_logits: Float[Tensor, "n vocab"], k: int
) -> Float[Tensor, " n"]:
    """``|topk(clean) ∩ topk(ablated)| / k`` per row."""
    if not isinstance(k, int) or not 1 <= k <= clean_logits.shape[-1]:
        raise StreamlensError(f"topk k={k!r} must be an int between 1 and the vocabulary size {clean_logits.shape[-1]}")
    a = clean_logits.topk(k, -1).indices  # (n, k)
    b = ablated_logits.topk(k, -1).indices
    return (a[:, :, None] == b[:, None, :]).any(-1).float().mean(-1)


def cosine(a: Float[Tensor, "n d"], b: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
    """``cos(a, b)`` per row in float64; two zero vectors count as the same direction (1), one zero vector as 0."""
    a, b = a.double(), b.double()
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    cos = ((a * b).sum(-1) / (na * nb).clamp_min(1e-300)).clamp(-1.0, 1.0)
    return torch.where((na == 0) & (nb == 0), torch.ones_like(cos), cos)


def angle(a: Float[Tensor, "n d"], b: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
    """Angular distance ``arccos(cos(a, b)) / pi`` per row (0: same direction, 1: opposite)."""
    return (torch.arccos(cosine(a, b)) / math.pi).float()


def block_influence(resid_pre: Float[Tensor, "n d"], resid_post: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
    """ShortGPT's Block Influence ``1 - cos(resid_pre, resid_post)`` per row."""
    return (1.0 - cosine(resid_pre, resid_post)).float()


def logit_diff(logits: Float[Tensor, "n vocab"], correct: Int[Tensor, " n"], wrong: Int[Tensor, " n"]) -> Float[Tensor, " n"]:
    """``logits[correct] - logits[wrong]`` per row."""
    return logits.gather(-1, correct[:, None])[:, 0] - logits.gather(-1, wrong[:, None])[:, 0]


def resample_indices(n_docs: int, n_boot: int, seed: int) -> Int[Tensor, "n_boot n_docs"]:
    """Document indices drawn with replacement, one row per bootstrap replicate (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_docs, (n_boot, n_docs), generator=g)


def ratio_bootstrap(
    sums: Float[Tensor, " docs"], counts: Float[Tensor, " docs"], idx: Int[Tensor, "n_boot docs"], level: float = 0.95
) -> tuple[float, float, float]:
    """``(estimate, lo, hi)`` of ``sum(sums) / sum(counts)`` with a percentile bootstrap over documents.

    Resampling whole documents keeps the positions of one document together (they are correlated).
    A replicate with no positions (a zero denominator) is dropped; with no positions at all the result is
    NaN. Denominators may be negative (the clean logit differences of ``logit_diff``).
    """
    sums, counts = sums.double(), counts.double()
    total = counts.sum()
    if total == 0:
        return float("nan"), float("nan"), float("nan")
    est = float(sums.sum() / total)
    s, c = sums[idx].sum(-1), counts[idx].sum(-1)  # (n_boot,)
    keep = c != 0
    if not bool(keep.any()):
        return est, float("nan"), float("nan")
    reps = s[keep] / c[keep]
    a = (1.0 - level) / 2
    q = torch.quantile(reps, torch.tensor([a, 1.0 - a], dtype=reps.dtype))
    return est, float(q[0]), float(q[1])


def spearman(x, y) -> float:
    """Spearman rank correlation of two equal-length sequences (NaN with fewer than 3 points or no spread)."""
    from scipy.stats import spearmanr

    x, y = [float(v) for v in x], [float(v) for v in y]
    if len(x) != len(y):
        raise StreamlensError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def metric_names(metrics) -> list[str]:
    """The columns for ``metrics`` (a name or a list of names; a callable counts by its ``__name__``),
    checked, without duplicates."""
    if isinstance(metrics, str) or callable(metrics):
        metrics = [metrics]
    names = []
    for k in metrics:
        if callable(k):
            name = getattr(k, "__name__", "")
            if not name.isidentifier() or name in METRICS or name in names:
                raise StreamlensError(f"a metric function needs a unique name (its __name__), not {name!r}")
            names.append(name)
            continue
        if k not in METRICS:
            raise StreamlensError(f"unknown metric {k!r}; choose from {sorted(set(METRICS) - {'delta_ce'})}")
        if METRICS[k] not in names:
            names.append(METRICS[k])
    if not names:
        raise StreamlensError("metrics is empty: choose at least one of kl, ce, top1, topk, angle")
    return names


def stored_names(names) -> list[str]:
    """``names`` and the extra per-document sums their ratios need (``logit_diff_clean`` for ``logit_diff``)."""
    return list(names) + [RATIO_OF[k] for k in names if k in RATIO_OF]


#: Rows per chunk of the full-vocabulary metrics: about this many bytes of float32 logits at a time, so
#: the temporaries stay in cache and are reused instead of allocated (and page-faulted) per unit.
CHUNK_BYTES = 8 << 20


def row_chunks(n: int, vocab: int) -> list[slice]:
    """Slices of ``n`` rows, each about :data:`CHUNK_BYTES` of ``vocab`` float32 values (at least one row)."""
    step = max(1, CHUNK_BYTES // (4 * max(vocab, 1)))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def row_metrics(clean, lg: Tensor, fin: Tensor, names, task=None) -> dict[str, Tensor]:
    """Each metric of ``names`` per selected row: ablated logits ``lg`` and final residual ``fin`` against ``clean``.

    ``clean`` carries the clean pass of the batch (``logp``, ``top1``, ``top``, ``final``, ``target``,
    ``has_target``, and :meth:`~streamlens.skip.streaming.CleanBatch.probs` /
    :meth:`~streamlens.skip.streaming.CleanBatch.target_logp` computed once per batch;
    :class:`streamlens.skip.streaming.CleanBatch`).

    ``kl`` and ``delta_ce`` are computed a few rows at a time (:func:`row_chunks`), with the operations
    of :func:`kl` and :func:`delta_ce` applied in place: every value is bit for bit what those functions
    give on the whole batch (each row's log-softmax and sum do not depend on the other rows).
    """
    out = {}
    want_kl, want_ce = "kl" in names, "delta_ce" in names
    if want_kl or want_ce:
        kls, ces = [], []
        p, tlogp = (clean.probs() if want_kl else None), (clean.target_logp() if want_ce else None)
        for rows in row_chunks(lg.shape[0], lg.shape[-1]):
            logq = torch.log_softmax(lg[rows], -1)
            if want_ce:  # -log q[t] + log p[t], at every row (target 0 where none), masked below
                ces.append(tlogp[rows] - logq.gather(-1, clean.target[rows, None])[:, 0])
            if want_kl:  # sum_v p_v (log p_v - log q_v), reusing log q's buffer
                kls.append(torch.sub(clean.logp[rows], logq, out=logq).mul_(p[rows]).sum(-1).clamp_min(0.0))
        if want_kl:
            out["kl"] = torch.cat(kls)
            if not bool(torch.isfinite(out["kl"]).all()):  # KL is finite exactly when every ablated logit is
                check_finite(lg, "the logits with the unit removed")
        if want_ce:
            out["delta_ce"] = torch.cat(ces)[clean.has_target]
    if not want_kl and not bool(torch.isfinite(lg.sum())):  # one reduction; a finite sum has finite terms
        check_finite(lg, "the logits with the unit removed")  # never top1 = 1.0 beside kl = nan
    if "top1" in names:
        out["top1"] = (lg.argmax(-1) == clean.top1).float()
    if "topk" in names:
        kk = clean.top.shape[1]
        other = lg.topk(kk, -1).indices
        out["topk"] = (clean.top[:, :, None] == other[:, None, :]).any(-1).float().mean(-1)
    if "angle" in names:
        out["angle"] = angle(clean.final, fin)
    if task is not None:
        out.update(task.values(clean, lg, names))
    return out
