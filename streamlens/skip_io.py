"""Running the rows of a sweep: incremental writing to ``.jsonl``/``.csv``, resuming, and greedy pruning.

Each finished unit is appended to the ``out`` file at once (floats written with ``repr`` so they read
back bit for bit); ``resume=True`` reads the file, checks it was made with the same mode, and computes
only the units it lacks, so an interrupted sweep ends with the same table as an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from streamlens.ablate import Unit, combine
from streamlens.errors import StreamlensError

_INT_COLS = ("layer", "head", "start", "width", "n_positions", "step")


def unit_columns(u: Unit) -> dict:
    row = {"unit": u.label}
    for k in ("layer", "head", "start", "width"):
        row[k] = getattr(u, k)
    return row


def _check_out(out) -> Path:
    path = Path(out)
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise StreamlensError(f"out={str(out)!r} must end in .jsonl or .csv")
    return path


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    if path.suffix.lower() == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    with path.open(newline="") as f:
        rows = []
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                if k in ("unit", "mode"):
                    row[k] = v
                elif v == "":
                    row[k] = None
                else:
                    row[k] = int(v) if k in _INT_COLS else float(v)
            rows.append(row)
        return rows


def write_row(path: Path, row: dict, columns: list[str]) -> None:
    if path.suffix.lower() == ".jsonl":
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(columns)
        w.writerow(["" if row.get(c) is None else (repr(row[c]) if isinstance(row[c], float) else row[c])
                    for c in columns])


def run_rows(ev, units: list[Unit], mode: str, names: list[str], *, out=None, resume: bool = False,
             callback=None, desc: str = "skip") -> list[dict]:
    """One row per unit, in ``units`` order, reusing finished rows from ``out`` when resuming."""
    from tqdm.auto import tqdm

    done: dict[str, dict] = {}
    path = None if out is None else _check_out(out)
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
    columns = ["unit", "layer", "head", "start", "width", "mode"]
    columns += [c for k in names for c in (k, f"{k}_lo", f"{k}_hi")] + ["n_positions"]
    rows = []
    bar = tqdm(units, desc=desc, unit="unit", disable=not ev.progress)
    for u in bar:
        if u.label in done:
            rows.append({c: done[u.label].get(c) for c in columns})
            continue
        row = {**unit_columns(u), "mode": mode, **ev.evaluate(u, mode, names)}
        row = {c: row.get(c) for c in columns}
        if path is not None:
            write_row(path, row, columns)
        rows.append(row)
        if callback is not None:
            callback(row)
    return rows


def prune_rows(ev, pool: list[Unit], count: int, mode: str, names: list[str], by: str, higher_is_worse: bool):
    from tqdm.auto import tqdm

    removed: list[Unit] = []
    rows = [{"step": 0, "unit": "none", "removed": "", **ev.evaluate([], mode, names)}]
    total = sum(len(pool) - i for i in range(count))
    bar = tqdm(total=total, desc="prune", unit="eval", disable=not ev.progress)
    for step in range(1, count + 1):
        best, best_row = None, None
        for u in pool:
            if u in removed:
                continue
            r = ev.evaluate(combine(removed + [u]), mode, names)
            bar.update()
            score = r[by] if higher_is_worse else -r[by]
            if best_row is None or (not math.isnan(score) and score < best):
                best, best_row, best_u = score, r, u
        removed.append(best_u)
        rows.append({"step": step, "unit": best_u.label, "removed": "+".join(x.label for x in removed),
                     "layer": best_u.layer, "head": best_u.head, **best_row})
    bar.close()
    return rows
