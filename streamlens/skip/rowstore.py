"""Rows of a sweep on disk: appended one at a time to ``.jsonl``/``.csv`` and read back for resuming (I/O only).

Floats are written with ``repr`` so they read back bit for bit.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from streamlens.errors import StreamlensError

_INT_COLS = ("layer", "head", "start", "width", "n_positions", "step")


def check_out(out) -> Path:
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


