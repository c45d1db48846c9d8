"""Layer skipping: how much does the output degrade when a block, sub-layer, head or span is removed?

A block only adds an update to the stream (``x + f(x)``), so removing it (``x``) often hurts little,
except where it does. :class:`LayerSkipEvaluator` runs the clean model once over the data, keeps what
every removal needs, and then measures any unit removed (see :mod:`streamlens.intervene` for units and
modes) against the clean pass:

* ``kl``: ``KL(clean || ablated)`` of the next-token distributions (nats);
* ``delta_ce`` (metric ``"ce"``): the change of cross-entropy on the data's own next tokens (the last
  token of a document has none and is left out);
* ``top1``: agreement with the clean top-1 token; ``topk``: overlap of the top-k sets;
* ``angle``: angular distance ``arccos(cos)/pi`` between the clean and ablated final residuals.

Each is the mean over the selected non-padding positions, with a 95% percentile-bootstrap interval
over documents. The clean pass also gives each block's Block Influence ``1 - cos(resid_pre,
resid_post)`` (ShortGPT), and a block sweep reports its Spearman correlation with the damage.

Memory (streaming): the evaluator keeps the token ids and the clean pass of the latest batch only. A
sweep runs batch by batch: the clean pass of one batch, every unit removed on it, the per-document sums
added, the batch dropped before the next one's pass (:mod:`streamlens.skip.streaming`), so peak memory
depends on the batch, not on the number of documents. The construction's prefix check is the first
batch's clean pass, and a kept pass is reused while the weights are unchanged (on data of one batch,
repeated :meth:`~LayerSkipEvaluator.evaluate` calls run the clean model once). ``mode="mean"`` first makes one extra streaming pass for the mean writes.

Speed (prefix reuse): removing a unit at layer ``l`` cannot change blocks ``0..l-1``. The clean pass
caches every block's input ``resid_pre[l]`` and the keyword arguments the bridge passed to each block
(attention mask, rotary position embeddings, ...); a removal then runs only blocks ``l..L-1``, the
final norm and the unembedding, and skipped blocks are not run at all. Several removals share one
forward pass, stacked along the batch (:mod:`streamlens.skip.batched`; ``variants_per_pass`` /
``memory_budget``). Workers: see :mod:`streamlens.skip.distributed`. This is checked against the
model's own forward on the first batch; where it does not reproduce it (a logit soft-cap, an LM head
beyond the unembedding) the evaluator falls back to one full forward per unit (``strategy="naive"``)
and says why (``evaluator.strategy_reason``).

    >>> ev = streamlens.LayerSkipEvaluator(model, texts, max_tokens=32, progress=False)
    >>> ev.sweep("block").to_dataframe()          # one row per block: kl, kl_lo, kl_hi, delta_ce, ...
    >>> ev.sweep("span", width=2).plot()
    >>> streamlens.skip_sweep(model, "corpus.jsonl", unit="head", out="heads.jsonl", resume=True, max_tokens=16, progress=False)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from streamlens.errors import StreamlensError
from streamlens.intervene.units import Unit, check_mode, combine, parse_unit
from streamlens.model.loading import Model, as_model
from streamlens.skip import distributed
from streamlens.skip.batched import parse_bytes, stacked_tail, variants_per_pass
from streamlens.skip.docsums import DocSums, describe_positions, load_done, weights_checksum
from streamlens.skip.metrics import metric_names, resample_indices, row_metrics, stored_names
from streamlens.skip.tasks import Task
from streamlens.skip.streaming import CleanBatch, LatestClean, check_prefix, full, tail, tokenize
from streamlens.skip.sweeps import SkipSweep, run_rows, sweep_table, sweep_units, unit_columns
from streamlens.stream.inputs import check_batch_size, load_texts

__all__ = ["CleanBatch", "LayerSkipEvaluator", "prune_sweep", "skip_sweep"]

from streamlens.skip.verbs import prune_sweep, skip_sweep  # noqa: E402  (the verbs, beside their evaluator)


class LayerSkipEvaluator:
    """Measure removals of units against the clean model over ``data``, streamed batch by batch.

    Args:
        model: a :class:`~streamlens.Model` (or anything :func:`streamlens.load` takes).
        data: a list of texts, a ``.txt``/``.jsonl`` path (see :func:`streamlens.load_texts`), token ids
            (an integer tensor ``(docs, pos)`` or a list of lists).
        max_tokens: keep at most this many tokens per document.
        batch_size: documents per forward pass (right-padded).
        positions: restrict the metrics to some positions, in the vocabulary of every verb
            (:func:`streamlens.stream.inputs.select_positions`): ints, ``"last"``, a ``slice`` of
            absolute positions (``slice(half, None)``) or a boolean tensor ``(docs, pos)``; padding is
            always excluded.
        topk: ``k`` of the ``topk`` metric.
        n_boot, seed: bootstrap replicates (over documents) and their seed.
        mean_over: ``"position"`` (mean write per position, the default) or ``"all"`` for ``mode="mean"``.
        strategy: how removals are executed: ``"auto"`` (prefix reuse where it reproduces the model),
            ``"prefix"`` or ``"naive"`` (one full forward per unit). ``path=`` is its former name.
        variants_per_pass: removals stacked into one forward pass (prefix strategy); default: as many
            as ``memory_budget`` allows.
        memory_budget: bytes (or ``"2GB"``) the stacked variants of one pass may use; default: one
            variant per pass on a CPU (bit-for-bit the numbers of one removal alone), 1 GiB on a GPU
            (stacked numbers agree to float rounding; see :mod:`streamlens.skip.batched`).
        target, contrast, choices: answer tokens of the task metrics ``logit_diff`` and ``mc_accuracy``
            (a token for every document, or one per document; :mod:`streamlens.skip.tasks`).
        field: the text field of a JSONL file.
        prepend_bos: put the tokenizer's BOS token in front of each text (None, the default: when it
            has one; see :mod:`streamlens.stream.inputs`); recorded in the result.
    """

    def __init__(self, model, data, *, max_tokens: int | None = None, batch_size: int = 8, positions=None,
                 topk: int = 5, n_boot: int = 1000, seed: int = 0, mean_over: str = "position",
                 strategy: str = "auto", field: str = "text", progress: bool = True, path: str | None = None,
                 variants_per_pass: int | None = None, memory_budget=None, target=None, contrast=None,
                 choices=None, prepend_bos: bool | None = None):
        self.model: Model = as_model(model)
        strategy = _renamed(path, strategy)
        if strategy not in STRATEGIES:
            raise StreamlensError(f"strategy must be 'auto', 'prefix' or 'naive', got {strategy!r}")
        if mean_over not in ("position", "all"):
            raise StreamlensError(f"mean_over must be 'position' or 'all', got {mean_over!r}")
        check_batch_size(batch_size)
        if memory_budget is not None:
            parse_bytes(memory_budget)
        docs = _documents(data, field)
        if isinstance(positions, Tensor) and positions.dtype == torch.bool and positions.shape[0] != len(docs):
            raise StreamlensError(f"positions mask has {positions.shape[0]} rows for {len(docs)} documents")
        self.n_docs = len(docs)
        self.task = Task(self.model, self.n_docs, target, contrast, choices)
        self.topk, self.mean_over, self.progress = topk, mean_over, progress
        self.variants_per_pass, self.memory_budget = variants_per_pass, memory_budget
        self.boot = resample_indices(self.n_docs, n_boot, seed)
        self._means: dict | None = None
        self._bi: Tensor | None = None
        self.strategy, self.strategy_reason = (("naive", "strategy='naive' was asked for") if strategy == "naive"
                                               else ("prefix", ""))
        # Only token ids are kept: (lo, batch, selected positions) per batch.
        self._data, self._count, digest = tokenize(self.model, docs, batch_size, max_tokens, positions,
                                                         prepend_bos)
        if self._count[:, 0].sum() == 0:
            raise StreamlensError(f"no positions to measure: the {self.n_docs} documents have no selected non-padding positions")
        self._settings = {"data": digest, "n_docs": self.n_docs, "max_tokens": max_tokens,
                          "batch_size": batch_size, "positions": describe_positions(positions), "topk": topk,
                          "n_boot": n_boot, "seed": seed, "mean_over": mean_over, "prepend_bos": prepend_bos}
        self._last = LatestClean()  # the latest batch's clean pass
        if strategy != "naive":
            lo, batch, sel = self._data[0]
            reason = check_prefix(self.model, self._clean(lo, batch, sel, keep_blocks=True, keep_logits=True))
            if reason:
                if strategy == "prefix":
                    raise StreamlensError(f"prefix reuse does not reproduce this model: {reason}")
                self.strategy, self.strategy_reason = "naive", reason

    # ----------------------------------------------------------------------- the streaming pass
    def fingerprint(self, units: Sequence[Unit], mode: str, names: Sequence[str], strategy: str | None = None) -> dict:
        """Everything that changes a number of a sweep: model, data, settings, mode, metrics, units."""
        m = self.model
        return {"model": m.name, "weights": weights_checksum(m), "dtype": str(m.dtype).removeprefix("torch."),
                "device": m.device.type, **self._settings,
                "mean_over": self.mean_over if mode == "mean" else None, "strategy": strategy or self.strategy,
                "mode": mode, "metrics": list(names), "units": [u.label for u in units], **self.task.fingerprint(names)}

    def _stream(self, units: Sequence[Unit], mode: str, names: Sequence[str], *, strategy: str | None = None,
                want_bi: bool = False, store: DocSums | None = None, done=None, shard=None, desc: str = "batches"):
        """Per-document sums ``{label: {metric: (docs,)}}`` of every unit (and the Block Influence sums
        ``(L, docs)`` when ``want_bi``), one batch at a time; ``done`` holds finished (batch, unit) sums."""
        from tqdm.auto import tqdm

        self.model.require_eval()
        strategy = strategy or self.strategy
        if strategy == "prefix" and self.strategy != "prefix":
            raise StreamlensError(f"prefix reuse is not available for this model: {self.strategy_reason}")
        shard = shard or distributed.current()
        if mode == "mean":
            self.ensure_means()
            # the experts' mean shares: made here, by every rank at once and in one order (a set's order is not)
            for a in sorted({a for u in units for a in u.atoms if a.kind == "expert"}):
                self._means.get(a)
        L = self.model.arch.n_layers
        names = stored_names(names)
        sums = {u.label: {k: torch.zeros(self.n_docs, dtype=torch.float64) for k in names} for u in units}
        bi = torch.zeros(L, self.n_docs, dtype=torch.float64) if want_bi else None
        done_units = {} if done is None else done.units
        done_batches = {} if done is None else done.batches
        mine = [(i, d) for i, d in enumerate(self._data) if shard.mine(i)]
        bar = tqdm(mine, desc=desc, unit="batch", disable=not self.progress)
        for _, (lo, batch, sel) in bar:
            nb = len(batch)
            todo = []
            for u in units:
                got = done_units.get((lo, u.label))
                if got is None:
                    todo.append(u)
                    continue
                for k in names:
                    if k not in got or len(got[k]) != nb:
                        raise StreamlensError(f"{store.path if store else 'document sums'}: unit {u.label!r} on "
                                              f"documents from {lo} lacks metric {k!r} for {nb} documents")
                    sums[u.label][k][lo:lo + nb] = got[k]
            need_bi = want_bi and lo not in done_batches
            if want_bi and not need_bi:
                bi[:, lo:lo + nb] = done_batches[lo][1]
            if not todo and not need_bi:
                continue
            with torch.no_grad():
                c = self._clean(lo, batch, sel, keep_blocks=strategy == "prefix" and bool(todo),
                                keep_logits=self.task.needs_logits(names))
                if need_bi:
                    for j in range(L):
                        bi[j].index_add_(0, c.doc.cpu(), c.bi[j])
                if store is not None and lo not in done_batches:
                    store.write_batch(lo, self._count[lo:lo + nb].T, torch.zeros(L, nb, dtype=torch.float64).index_add_(
                        1, c.doc.cpu() - lo, c.bi))
                for u, vals in self._measure(c, todo, mode, names, strategy):
                    part = {}
                    for k, v in vals.items():
                        d = (c.doc.cpu() - lo)[c.has_target.cpu()] if k == "delta_ce" else c.doc.cpu() - lo
                        part[k] = torch.zeros(nb, dtype=torch.float64).index_add_(0, d, v.cpu().double())
                        sums[u.label][k][lo:lo + nb] = part[k]
                    if store is not None:
                        store.write_unit(lo, u.label, part)
            del c
        if shard.collective:  # every document is measured on exactly one rank: the sum over ranks is exact
            flat = torch.cat([sums[u.label][k] for u in units for k in names] + ([bi.flatten()] if bi is not None else []))
            flat = distributed.all_sum(flat, shard, self.model.device)
            parts = iter(flat.split(self.n_docs))
            for u in units:
                for k in names:
                    sums[u.label][k] = next(parts)
            if bi is not None:
                bi = torch.stack([next(parts) for _ in range(L)])
        return sums, bi

    def _clean(self, lo: int, batch, sel, *, keep_blocks: bool, keep_logits: bool) -> CleanBatch:
        """The clean pass of the batch starting at document ``lo`` (the latest is kept: :class:`LatestClean`)."""
        return self._last.get(self.model, lo, batch, sel, self.topk, keep_blocks=keep_blocks, keep_logits=keep_logits)

    def ensure_means(self) -> dict:
        """The mean writes over the whole data set for ``mode="mean"``: one extra streaming pass, done once."""
        if self._means is None:  # under a process group the ranks share the pass (same bits as one process)
            self._means = distributed.mean_writes(self.model, [b for _, b, _ in self._data], self.mean_over)
        return self._means

    means = property(lambda self: self._means, doc="The mean writes (None until a mean-mode removal needed them).")
    data_batches = property(lambda self: list(self._data), doc="``(first document, Batch, selected positions)`` per batch.")
    counts = property(lambda self: self._count, doc="``(docs, 2)``: selected positions, and those with a next token.")

    def _measure(self, c: CleanBatch, units: Sequence[Unit], mode: str, names, strategy: str):
        """``(unit, {metric: per-row values})`` for each unit, removed on the clean batch ``c``."""
        if strategy != "prefix":
            for u in units:
                yield u, row_metrics(c, *full(self.model, c, u, mode, self._means), names, self.task)
            return
        b, p = c.batch.input_ids.shape
        g = variants_per_pass(self.model, b, p, len(c.doc), self.memory_budget, self.variants_per_pass)
        # an expert's removal hooks its experts module, whose rows are routed tokens: one variant per pass
        if g == 1 or any(a.kind == "expert" for u in units for a in u.atoms):
            for u in units:
                yield u, row_metrics(c, *tail(self.model, c, u, mode, self._means), names, self.task)
            return
        for i in range(0, len(units), g):
            group = list(units[i:i + g])
            for u, (lg, fin) in zip(group, stacked_tail(self.model, c, group, mode, self._means)):
                yield u, row_metrics(c, lg, fin, names, self.task)

    def metric_names(self, metrics) -> list[str]:
        """The columns of ``metrics``, checked (a task metric needs its answer tokens)."""
        names = metric_names(metrics)
        self.task.check(names, metrics)
        return names

    def _units(self, unit) -> Unit:
        unit = unit if isinstance(unit, Unit) else combine([parse_unit(self.model, u) for u in
                                                            (unit if isinstance(unit, list) else [unit])])
        return unit

    # ----------------------------------------------------------------------- measuring
    def doc_sums(self, unit, mode: str = "skip", metrics: Sequence[str] = ("kl", "ce", "top1"),
                 strategy: str | None = None, *, path: str | None = None) -> dict[str, Tensor]:
        """Per-document sums ``(docs,)`` of each metric for ``unit`` removed (see :meth:`evaluate`)."""
        unit = self._units(unit)
        check_mode(mode, unit)
        names = self.metric_names(metrics)
        return self._stream([unit], mode, names, strategy=_renamed(path, strategy))[0][unit.label]

    def evaluate(self, unit, mode: str = "skip", metrics: Sequence[str] = ("kl", "ce", "top1"),
                 strategy: str | None = None, *, path: str | None = None) -> dict[str, float]:
        """Metrics (mean over selected positions) and ``*_lo``/``*_hi`` bootstrap bounds for one unit or a set.

        ``unit``: a label (``"block.3"``, ``"head.1.2"``, ``"span.2:5"``), a tuple, or a list of them removed
        together; ``[]`` removes nothing (every metric then equals its clean value: ``kl = 0``, ``top1 = 1``).
        """
        return self.evaluate_many([self._units(unit)], mode, metrics, _renamed(path, strategy))[0]

    def evaluate_many(self, units: Sequence, mode: str = "skip", metrics: Sequence[str] = ("kl", "ce", "top1"),
                      strategy: str | None = None) -> list[dict[str, float]]:
        """:meth:`evaluate` for several units (each removed on its own) in one streaming pass over the data."""
        units = [self._units(u) for u in units]
        for u in units:
            check_mode(mode, u)
        names = self.metric_names(metrics)
        sums, _ = self._stream(units, mode, names, strategy=strategy)
        return [self.row(sums[u.label]) for u in units]

    def row(self, sums: dict[str, Tensor]) -> dict[str, Any]:
        """Estimates and bootstrap bounds from per-document sums (see :func:`streamlens.skip.sweeps.metric_row`)."""
        from streamlens.skip.sweeps import metric_row

        return metric_row(sums, self._count, self.boot)

    def block_influence(self) -> list[float]:
        """Each block's mean ``1 - cos(resid_pre, resid_post)`` over the selected positions (clean pass)."""
        if self._bi is None:
            self._bi = self._stream([], "skip", ["kl"], want_bi=True, desc="clean pass")[1]
        total = self._count[:, 0].sum()
        return [float(self._bi[j].sum() / total) for j in range(self.model.arch.n_layers)]

    path = property(lambda self: self.strategy, doc="The former name of :attr:`strategy`.")
    path_reason = property(lambda self: self.strategy_reason, doc="The former name of :attr:`strategy_reason`.")

    # ----------------------------------------------------------------------- sweeps
    def sweep(self, unit="block", *, mode: str = "skip", metrics: Sequence[str] = ("kl", "ce", "top1"),
              width: int | Sequence[int] | None = None, out: str | Path | None = None, resume: bool = False,
              callback: Callable[[dict], None] | None = None, screen: int | None = None) -> SkipSweep:
        """Every single unit of a kind (``"block"``, ``"attn"``, ``"mlp"``, ``"head"``), every span of
        ``width`` (an int or several) blocks, or one explicit set (a list of units removed together).

        ``out``: a ``.jsonl`` or ``.csv`` file the finished rows are written to; beside it,
        ``<out>.docsums-<rank>of<n>.jsonl`` keeps every finished (batch, unit) pair, so ``resume=True``
        continues an interrupted sweep from where it stopped (a resume with other settings is refused).
        ``callback(row)`` is called after each new row. Under ``torchrun`` the ranks share the batches
        and every rank returns the same table (rank 0 writes ``out``).

        ``screen=k``: estimate every unit's ``delta_ce`` to first order (:mod:`streamlens.skip.attribution`),
        compute exact numbers only for the ``k`` units with the largest estimated effect; every row carries
        ``delta_ce_estimate`` and ``exact``, and ``result.screening`` the rank correlation of estimate and
        exact value over the ``k`` units.
        """
        names = self.metric_names(metrics)
        units, kind = sweep_units(self.model, unit, width)
        for u in units:
            check_mode(mode, u)
        shard = distributed.current()
        fp = self.fingerprint(units, mode, names)
        header = {"fingerprint": fp, "kind": kind, "mode": mode, "metrics": names, "model_name": self.model.name,
                  "strategy": self.strategy, "strategy_reason": self.strategy_reason,
                  "units": [unit_columns(u) for u in units]}

        def compute(todo: list[Unit], path: Path | None):
            store, done = None, None
            if path is not None:
                done = load_done(path, header, resume)
                distributed.barrier(shard)  # every rank has looked for earlier files before any writes its own
                store = DocSums(Path(f"{path}.docsums-{shard.tag}.jsonl"), header)
            sums, bi = self._stream(todo, mode, names, want_bi=kind == "block", store=store, done=done,
                                    shard=shard, desc=f"skip {kind}")
            if bi is not None:
                self._bi = bi
            return sums

        exact = units
        if screen is not None:
            from streamlens.skip.attribution import estimate_all

            if isinstance(screen, bool) or not isinstance(screen, int) or not 1 <= screen <= len(units):
                raise StreamlensError(f"screen={screen!r} must be between 1 and the {len(units)} units of the sweep")
            estimates = estimate_all(self, units, mode)
            exact = sorted(units, key=lambda u: -abs(estimates[u.label]))[:screen]
            exact = [u for u in units if u in exact]
        rows = run_rows(self, exact, mode, names, compute, out=out, resume=resume, callback=callback,
                        write=distributed.is_writer(shard))
        screening = {}
        if screen is not None:
            from streamlens.skip.attribution import screened_rows
            from streamlens.skip.sweeps import row_columns

            rows, rho = screened_rows({r["unit"]: r for r in rows}, units, estimates, mode, row_columns(names),
                                      int(self._count[:, 0].sum()))
            screening = {"estimated": "delta_ce", "exact_units": screen, "rank_correlation": rho}
        bi = self.block_influence() if kind == "block" else None
        return sweep_table(kind, mode, names, rows, bi, self.model.name, self.n_docs, self.strategy,
                           self.strategy_reason, screening)

    def sweep_shard(self, unit="block", *, shard, out, mode: str = "skip", metrics: Sequence[str] = ("kl", "ce", "top1"),
                    width=None, resume: bool = True) -> Path:
        """Job ``i`` of ``n`` of a sweep (``shard=(i, n)`` or ``"i/n"``): its per-document sums go to ``out``;
        :func:`streamlens.skip.shards.merge_shards` joins the ``n`` files (see :func:`streamlens.skip.shards.run_shard`)."""
        from streamlens.skip.shards import run_shard

        return run_shard(self, unit, shard=shard, out=out, mode=mode, metrics=metrics, width=width, resume=resume)

    def prune(self, count: int, *, unit: str = "block", mode: str = "skip", by: str = "kl",
              metrics: Sequence[str] = ("kl", "ce", "top1"), out: str | Path | None = None,
              resume: bool = False) -> SkipSweep:
        """Greedy pruning curve: ``count`` times, remove the unit whose removal (with those already removed)
        hurts least by ``by``; one row per step (step 0 removes nothing). Each step is one streaming pass
        measuring every candidate (under ``torchrun`` its batches are shared by the ranks).

        ``out``: a ``.csv``/``.jsonl`` file the curve is written to as each step finishes; ``resume=True``
        continues after the last finished step (:mod:`streamlens.skip.prunelog`; other settings are refused).
        """
        from streamlens.skip.sweeps import prune_curve

        return prune_curve(self, count, unit, mode, by, self.metric_names(metrics), out, resume)


# --------------------------------------------------------------------------- helpers
STRATEGIES = ("auto", "prefix", "naive")


def _renamed(path: str | None, strategy: str | None) -> str | None:
    """``strategy``, or the deprecated ``path=`` that used to name it."""
    if path is None:
        return strategy
    warnings.warn("path= is now strategy= (how removals are executed)", DeprecationWarning, stacklevel=3)
    return path


def _documents(data, field: str):
    if isinstance(data, Tensor):
        if data.dim() != 2 or data.shape[0] == 0:
            raise StreamlensError(f"token data must be a non-empty (docs, pos) tensor, got shape {tuple(data.shape)}")
        return [row.tolist() for row in data]
    if isinstance(data, list) and data and all(isinstance(d, (list, tuple)) for d in data):
        return [list(d) for d in data]
    return load_texts(data, field=field)
