"""A pruning curve on disk: each greedy step appended as it finishes, and a rerun resumed after the
last finished step (I/O only).

``prune_sweep(..., out="curve.csv")`` (or ``.jsonl``) keeps two files: ``curve.csv``, the curve so far
(rewritten whole after every step, so it is never half a table), and ``curve.csv.steps.jsonl``, the
log a resume reads: a header line with the curve's *fingerprint* (model, weights, data, mode, metrics,
``by``, positions, max_tokens, batch size, the candidate units, ...; the same identity as a sweep's
document sums, :mod:`streamlens.skip.docsums`) and one line per finished step, its row written with
``repr`` floats so it reads back bit for bit. A resume whose fingerprint differs is refused naming
every difference. The number of steps is not part of the fingerprint: a rerun with a larger count
extends the curve, one with a smaller count returns its first steps.

A step is the unit of work: an interruption during a step loses that step's streaming pass only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from streamlens.errors import StreamlensError
from streamlens.skip.docsums import check_fingerprint, log_lines
from streamlens.skip.rowstore import check_out, write_row

FORMAT = "streamlens-prune/1"


class PruneLog:
    """The finished steps of a pruning curve (``rows``) and where the next ones go.

    ``write=False`` (every rank of a process group but rank 0) reads the log and writes nothing.
    """

    def __init__(self, out, header: dict, resume: bool, *, write: bool = True):
        self.out = check_out(out)
        self.path = Path(f"{self.out}.steps.jsonl")
        self.header, self.write = header, write
        self.rows: list[dict] = []
        if self.path.exists() and self.path.stat().st_size > 0:
            if not resume:
                raise StreamlensError(f"{str(self.path)!r} holds the steps of an earlier pruning run: pass "
                                      "resume=True to continue it, or remove it")
            self.rows = _read(self.path, header, truncate=write)
        elif self.out.exists() and self.out.stat().st_size > 0:
            raise StreamlensError(f"out file {str(self.out)!r} already exists without its steps log "
                                  f"{self.path.name}: remove it or use another file")

    def start(self) -> None:
        """Create the log with its header (called once every rank has read what was there)."""
        if self.write and not (self.path.exists() and self.path.stat().st_size > 0):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"format": FORMAT, **self.header}) + "\n")

    def append(self, row: dict) -> None:
        """Log one finished step (one whole line, one ``os.write``), then rewrite the curve file."""
        self.rows.append(row)
        if not self.write:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, (json.dumps(row) + "\n").encode())
        finally:
            os.close(fd)
        self.write_table(self.rows)

    def write_table(self, rows: list[dict]) -> None:
        if not self.write:
            return
        tmp = self.out.with_name(self.out.name + ".tmp" + self.out.suffix)
        tmp.unlink(missing_ok=True)
        columns = list(dict.fromkeys(c for r in rows for c in r))
        for r in rows:
            write_row(tmp, r, columns)
        os.replace(tmp, self.out)


def _read(path: Path, header: dict, *, truncate: bool) -> list[dict]:
    rows: list[dict] = []
    for i, (n, obj) in enumerate(log_lines(path, FORMAT, "pruning log", truncate=truncate, stacklevel=5)):
        if i == 0:
            check_fingerprint(path, obj, header)
            continue
        if obj.get("step") != len(rows) or not isinstance(obj.get("unit"), str):
            raise StreamlensError(f"{path.name} line {n}: expected step {len(rows)}, got {obj.get('step')!r}")
        rows.append(obj)
    return rows
