"""Sweeps over units and greedy pruning curves, run on a :class:`~streamlens.LayerSkipEvaluator`; the :class:`SkipSweep` result.

A sweep removes each unit of a kind in turn (every block, sub-layer, head, or span of ``width``
blocks) and writes one row per unit with every metric and its bootstrap interval; a block sweep adds
each block's Block Influence and its Spearman correlation with the damage. Rows can be appended to a
file as they finish and a sweep resumed from it (:mod:`streamlens.skip.rowstore`). Greedy pruning is
its own verb: step by step, remove the unit whose removal (with those already removed) hurts least.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from streamlens.errors import StreamlensError
from streamlens.intervene.units import KINDS, Unit, all_units, combine, parse_unit
from streamlens.present.results import Result, fmt
from streamlens.skip.metrics import RATIO_OF, ratio_bootstrap, spearman
from streamlens.skip.rowstore import check_out, read_rows, write_row


@dataclass(frozen=True, eq=False)
class SkipSweep(Result):
    """The result of a sweep: one row per removed unit (or per pruning step).

    ``table`` columns: ``unit``, ``layer`` / ``head`` / ``start``, ``width`` where they apply, one
    column per metric and its interval bounds (``kl``, ``kl_lo``, ``kl_hi``, ...), ``n_positions``;
    block sweeps add ``block_influence``, pruning curves ``step`` and ``removed``.
    """

    kind: str
    mode: str
    metrics: tuple[str, ...]
    table: pd.DataFrame = field(repr=False)
    model_name: str = ""
    n_docs: int = 0
    strategy: str = "prefix"
    strategy_reason: str = ""
    spearman: dict[str, float] = field(default_factory=dict)
    screening: dict[str, Any] = field(default_factory=dict)  # estimate vs exact, for sweep(screen=k)

    def __post_init__(self):
        missing = [c for c in ("unit", *self.metrics) if c not in self.table.columns]
        if missing:
            raise StreamlensError(f"sweep table lacks columns {missing}")

    def to_dataframe(self) -> pd.DataFrame:
        return self.table.copy()

    def plot(self, metric: str | None = None):
        from streamlens.present import figures

        return figures.sweep_figure(self, metric or self.metrics[0])

    def metadata(self) -> dict[str, Any]:
        return {"model": self.model_name, "kind": self.kind, "mode": self.mode, "metrics": list(self.metrics),
                "n_docs": self.n_docs, "strategy": self.strategy, "spearman": self.spearman, "screening": self.screening}

    def describe(self) -> str:
        rho = "".join(f" ρ(BI, {k}) = {fmt(v)};" for k, v in self.spearman.items())
        if self.screening:
            rho += (f" screened: exact for the top {self.screening['exact_units']} by estimated delta_ce, "
                    f"rank correlation estimate/exact {fmt(self.screening['rank_correlation'])};")
        return f"{self.kind}, mode {self.mode}, {self.n_docs} documents, {self.strategy} strategy.{rho}"

    def __repr__(self) -> str:
        return (f"SkipSweep({self.kind}, mode={self.mode!r}, {len(self.table)} rows, metrics={list(self.metrics)}, "
                f"model={self.model_name!r}, strategy={self.strategy!r})")


def sweep_units(model, unit, width) -> tuple[list[Unit], str]:
    """The units of a sweep (every unit of a kind, every span of ``width``, or one explicit set) and its kind."""
    if isinstance(unit, str) and unit in KINDS:
        if unit == "span":
            if width is None:
                raise StreamlensError("unit='span' needs width=k (or a list of widths)")
            widths = [width] if isinstance(width, int) else list(width)
            return [u for w in widths for u in all_units(model, "span", w)], unit
        return all_units(model, unit), unit
    specs = unit if isinstance(unit, list) else [unit]
    return [combine([parse_unit(model, u) for u in specs])], "set"


def unit_columns(u: Unit) -> dict:
    """The columns that say which unit a row removed."""
    return {"unit": u.label, **{k: getattr(u, k) for k in ("layer", "head", "start", "width")}}


def metric_row(sums: dict, count, boot) -> dict:
    """Each metric's estimate and bootstrap bounds from per-document ``sums`` and ``count`` ``(docs, 2)``
    (selected positions, positions with a next token), resampling documents with ``boot``."""
    row: dict[str, Any] = {}
    for k, s in sums.items():
        if k in RATIO_OF.values():
            continue
        cnt = sums[RATIO_OF[k]] if k in RATIO_OF else count[:, 1 if k == "delta_ce" else 0]
        row[k], row[f"{k}_lo"], row[f"{k}_hi"] = ratio_bootstrap(s, cnt, boot)
    row["n_positions"] = int(count[:, 0].sum())
    return row


def row_columns(names: list[str]) -> list[str]:
    columns = ["unit", "layer", "head", "start", "width", "mode"]
    return columns + [c for k in names for c in (k, f"{k}_lo", f"{k}_hi")] + ["n_positions"]


def sweep_table(kind: str, mode: str, names, rows: list[dict], bi, model_name: str, n_docs: int, strategy: str,
                reason: str, screening: dict | None = None) -> SkipSweep:
    """The :class:`SkipSweep` of ``rows``; a block sweep adds Block Influence ``bi`` and its Spearman correlations."""
    table = pd.DataFrame(rows)
    rho = {}
    if kind == "block":
        table.insert(list(table.columns).index("n_positions"), "block_influence", bi)
        rho = {k: spearman(table["block_influence"], table[k]) for k in names}
    keep = {c for k in names for c in (k, f"{k}_lo", f"{k}_hi")}  # a metric with no position stays, as NaN
    table = table[[c for c in table.columns if c in keep or table[c].notna().any()]]
    return SkipSweep(kind, mode, tuple(names), table, model_name, n_docs, strategy, reason, rho, screening or {})


def run_rows(ev, units: list[Unit], mode: str, names: list[str], compute, *, out=None, resume: bool = False,
             callback=None, write: bool = True) -> list[dict]:
    """One row per unit, in ``units`` order. Finished rows are reused from ``out`` when resuming;
    ``compute(todo, path)`` streams the data once for the others and returns their per-document sums."""
    done: dict[str, dict] = {}
    path = None if out is None else check_out(out)
    if path is not None and path.exists() and path.stat().st_size > 0:
        if not resume:
            raise StreamlensError(f"out file {str(path)!r} already exists: pass resume=True to continue it, or remove it")
        for r in read_rows(path):
            if r.get("mode") != mode:
                raise StreamlensError(f"{str(path)!r} holds rows for mode {r.get('mode')!r}, not {mode!r}; use another file")
            missing = [k for k in names if k not in r]
            if missing:
                raise StreamlensError(f"{str(path)!r} lacks metrics {missing}: it was written by another sweep")
            done[r["unit"]] = r
    columns = row_columns(names)
    sums = compute([u for u in units if u.label not in done], path)
    rows = []
    for u in units:
        if u.label in done:
            rows.append({c: done[u.label].get(c) for c in columns})
            continue
        row = {**unit_columns(u), "mode": mode, **ev.row(sums[u.label])}
        row = {c: row.get(c) for c in columns}
        if path is not None and write:
            write_row(path, row, columns)
        rows.append(row)
        if callback is not None:
            callback(row)
    return rows


def prune_curve(ev, count: int, unit: str, mode: str, by: str, names: list[str], out=None,
                resume: bool = False) -> SkipSweep:
    """:meth:`LayerSkipEvaluator.prune`: the arguments checked, the log opened, the greedy curve run."""
    from streamlens.skip import distributed
    from streamlens.skip.metrics import HIGHER_IS_WORSE, METRICS

    by = METRICS.get(by, by)
    if by not in names:
        raise StreamlensError(f"by={by!r} must be one of the metrics computed: {names}")
    if unit not in ("block", "attn", "mlp", "head"):
        raise StreamlensError(f"pruning removes single units: unit must be block/attn/mlp/head, got {unit!r}")
    pool = all_units(ev.model, unit)
    if not isinstance(count, int) or not 1 <= count <= len(pool):
        raise StreamlensError(f"count={count!r} must be between 1 and the {len(pool)} {unit} units of the model")
    log = None
    if out is not None:
        from streamlens.skip.prunelog import PruneLog

        shard = distributed.current()
        log = PruneLog(out, {"fingerprint": {**ev.fingerprint(pool, mode, names), "kind": "prune", "by": by}},
                       resume, write=distributed.is_writer(shard))
        distributed.barrier(shard)  # every rank has read the log before rank 0 writes to it
    rows = greedy_prune(ev, pool, count, mode, names, by, HIGHER_IS_WORSE.get(by, True), log)
    return SkipSweep("prune", mode, tuple(names), pd.DataFrame(rows), ev.model.name, ev.n_docs, ev.strategy,
                     ev.strategy_reason)


def greedy_prune(ev, pool: list[Unit], count: int, mode: str, names: list[str], by: str, higher_is_worse: bool,
                 log=None):
    """The greedy curve's rows (step 0 removes nothing). ``log`` (a :class:`streamlens.skip.prunelog.PruneLog`)
    holds the steps an earlier run finished, which are reused, and records each new step as it finishes."""
    from tqdm.auto import tqdm

    rows = [] if log is None else list(log.rows[: count + 1])
    if log is not None:
        log.start()
    by_label = {u.label: u for u in pool}
    unknown = [r["unit"] for r in rows[1:] if r["unit"] not in by_label]
    if unknown:
        raise StreamlensError(f"the pruning log removes {unknown}, which are not units of this curve")
    removed: list[Unit] = [by_label[r["unit"]] for r in rows[1:]]

    def finished(row):
        rows.append(row)
        if log is not None:
            log.append(row)

    if not rows:
        finished({"step": 0, "unit": "none", "removed": "", **ev.evaluate([], mode, names)})
    bar = tqdm(total=count, initial=len(rows) - 1, desc="prune", unit="step", disable=not ev.progress)
    for step in range(len(rows), count + 1):
        best, best_row = None, None
        cands = [u for u in pool if u not in removed]
        results = ev.evaluate_many([combine(removed + [u]) for u in cands], mode, names)
        bar.update()
        for u, r in zip(cands, results):
            score = r[by] if higher_is_worse else -r[by]
            if best_row is None or (not math.isnan(score) and score < best):
                best, best_row, best_u = score, r, u
        removed.append(best_u)
        finished({"step": step, "unit": best_u.label, "removed": "+".join(x.label for x in removed),
                  "layer": best_u.layer, "head": best_u.head, **best_row})
    bar.close()
    return rows
