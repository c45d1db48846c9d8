"""Rows of a sweep on disk: written to ``.jsonl``/``.csv`` and read back for resuming (I/O only).

Floats are written with ``repr`` so they read back bit for bit. Reading is strict: a duplicate row, a
cut-off line or header, or a value that is not a number is a one-line error naming the file and the line
(the per-document sums beside the file keep the work: removing a damaged rows file loses nothing).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from streamlens.errors import StreamlensError

_INT_COLS = ("layer", "head", "start", "width", "n_positions", "step")
_TEXT_COLS = ("unit", "mode", "removed")
_REQUIRED = ("unit", "mode", "n_positions")


def check_out(out) -> Path:
    path = Path(out)
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise StreamlensError(f"out={str(out)!r} must end in .jsonl or .csv")
    return path


def _value(path: Path, n: int, k: str, v):
    """A cell read back: text columns as they are, ``None`` for empty, numbers checked."""
    if k in _TEXT_COLS:
        return v
    if v is None or v == "":
        return None
    if isinstance(v, bool):
        raise StreamlensError(f"{path.name} line {n}: {k} is not a number ({v!r})")
    if isinstance(v, (int, float)):
        return v
    try:
        return int(v) if k in _INT_COLS else float(v)
    except (TypeError, ValueError):
        raise StreamlensError(f"{path.name} line {n}: {k} is not a number ({v!r})") from None


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    if text and not text.endswith("\n"):
        what = "the header" if path.suffix.lower() == ".csv" and len(lines) == 1 else f"line {len(lines)}"
        raise StreamlensError(f"{path.name} {what} is cut off (no line end): a write was interrupted; remove that "
                              "line, or the file (the document sums beside it keep the work)"
                              if what != "the header" else f"{path.name} line 1: the header is cut off")
    rows: list[tuple[int, dict]] = []
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise StreamlensError(f"{path.name} line {n} is not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise StreamlensError(f"{path.name} line {n} is not a JSON object")
            rows.append((n, {k: _value(path, n, k, v) for k, v in obj.items()}))
    else:
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        missing = [c for c in _REQUIRED if header is None or c not in header]
        if missing:
            raise StreamlensError(f"{path.name} line 1: the header is cut off or not a sweep's (missing {missing})")
        for n, cells in enumerate(reader, 2):
            if not cells:
                continue
            if len(cells) != len(header):
                raise StreamlensError(f"{path.name} line {n} has {len(cells)} fields, the header {len(header)}: "
                                      "the line is cut off or damaged")
            rows.append((n, {k: _value(path, n, k, v) for k, v in zip(header, cells)}))
    seen = set()
    for n, r in rows:
        missing = [c for c in _REQUIRED if c not in r]
        if missing:
            raise StreamlensError(f"{path.name} line {n} lacks {missing}: not a sweep's row")
        key = r.get("step", r["unit"])
        if key in seen:
            raise StreamlensError(f"{path.name} line {n}: duplicate row for unit {r['unit']!r}")
        seen.add(key)
        if not isinstance(r["unit"], str):
            raise StreamlensError(f"{path.name} line {n}: unit is not a label ({r['unit']!r})")
    return [r for _, r in rows]


def write_row(path: Path, row: dict, columns: list[str]) -> None:
    """Append ``row`` as one whole line (one ``os.write``), the CSV header first when the file is new."""
    if path.suffix.lower() == ".jsonl":
        data = json.dumps(row) + "\n"
    else:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        if not path.exists() or path.stat().st_size == 0:
            w.writerow(columns)
        w.writerow(["" if row.get(c) is None else (repr(row[c]) if isinstance(row[c], float) else row[c])
                    for c in columns])
        data = buf.getvalue()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)
