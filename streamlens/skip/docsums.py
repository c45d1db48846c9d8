"""Per-document sums on disk: what a sweep has finished, batch by batch and unit by unit (I/O only).

A streaming sweep measures every unit on one batch of documents before the next batch, so the unit
of work is (batch of documents, unit). Each finished pair is appended as one JSON line holding the
per-document sums of every metric; each batch's position counts and Block Influence sums get a line
too. A resumed sweep reads these lines and runs only the pairs that are missing, so its final table is
the one an uninterrupted run gives (the sums are written with ``repr`` and read back bit for bit). The
same files are what independent shard jobs write and :func:`streamlens.skip.merge.merge_shards` reads.

The first line is a header with the sweep's *fingerprint*: the model's identity, the data, and every
setting that changes a number (mode, metrics, positions, max_tokens, topk, batch size, ...). A run
whose fingerprint differs is refused with an error naming what differs, never silently mixed.

Lines are written whole with one ``os.write`` each; a last line without its newline (a write cut off
by a kill) is dropped with a warning and overwritten. Anything else malformed is an error naming the
file and the line.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from streamlens.errors import StreamlensError

FORMAT = "streamlens-docsums/1"


def describe_difference(theirs: dict, ours: dict, where: tuple[str, str] = ("in the file", "now")) -> str:
    """``"mode: 'skip' in the file, 'mean' now; ..."`` for every key whose value differs."""
    keys = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    return "; ".join(f"{k}: {_short(theirs.get(k))} {where[0]}, {_short(ours.get(k))} {where[1]}" for k in keys)


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


class DocSums:
    """One ``.jsonl`` file of per-document sums, opened for appending (created with ``header`` if absent)."""

    def __init__(self, path: Path, header: dict):
        self.path = Path(path)
        self.header = header
        if not self.path.exists() or self.path.stat().st_size == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"format": FORMAT, **header}) + "\n")
        else:
            got = read_file(self.path, truncate=True)
            check_fingerprint(self.path, got.header, header)

    def _append(self, obj: dict) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, (json.dumps(obj) + "\n").encode())
        finally:
            os.close(fd)

    def write_batch(self, lo: int, counts: Tensor, bi: Tensor) -> None:
        """``counts`` ``(2, b)`` (selected positions, positions with a next token), ``bi`` ``(L, b)``."""
        self._append({"lo": lo, "counts": counts.tolist(), "bi": bi.tolist()})

    def write_unit(self, lo: int, label: str, sums: dict[str, Tensor]) -> None:
        self._append({"lo": lo, "unit": label, "sums": {k: v.tolist() for k, v in sums.items()}})


class Contents:
    """What a file holds: its header, batch lines ``{lo: (counts, bi)}`` and unit lines ``{(lo, unit): sums}``."""

    def __init__(self, header: dict):
        self.header = header
        self.batches: dict[int, tuple[Tensor, Tensor]] = {}
        self.units: dict[tuple[int, str], dict[str, Tensor]] = {}


def check_fingerprint(path: Path, theirs: dict, ours: dict, other: Path | None = None) -> None:
    """Refuse ``path`` (header ``theirs``) unless it comes from the same sweep as this run (or as ``other``'s file)."""
    a, b = theirs.get("fingerprint", {}), ours.get("fingerprint", {})
    if a != b and other is not None:
        raise StreamlensError(f"cannot merge {path.name} with {other.name}: they come from different sweeps "
                              f"({describe_difference(a, b, (f'in {path.name}', f'in {other.name}'))})")
    if a != b:
        raise StreamlensError(f"cannot resume from {str(path)!r}: it was written by a different sweep "
                              f"({describe_difference(a, b)}); use another --out file or remove it")


def _floats(path: Path, n: int, v, what: str, width: int | None = None) -> Tensor:
    rows = v if isinstance(v, list) else None
    flat = rows if rows is not None and all(not isinstance(x, list) for x in rows) else None
    if flat is None or (width is not None and len(flat) != width) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in flat):
        raise StreamlensError(f"{path.name} line {n}: {what} is not a list of {width or ''} numbers")
    return torch.tensor(flat, dtype=torch.float64)


def log_lines(path: Path, fmt: str, what: str, *, truncate: bool, stacklevel: int) -> list[tuple[int, dict]]:
    """``(line number, object)`` of each line of an append-only JSONL log whose first line is a header of format
    ``fmt``. A last line cut off by a kill is dropped with a warning (and cut from the file when ``truncate``);
    a line that is not a JSON object, or a header of another format, is an error naming the file and line."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines[-1]:  # the last write was cut off: drop it (that step is redone)
        warnings.warn(f"{path.name}: line {len(lines)} was cut off by an interruption; dropping it", stacklevel=stacklevel)
        if truncate:
            with path.open("r+b") as f:
                f.truncate(len(data) - len(lines[-1]))
    out = []
    for n, raw in enumerate(lines[:-1], 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StreamlensError(f"{path.name} line {n} is not valid JSON ({e})") from e
        if not isinstance(obj, dict):
            raise StreamlensError(f"{path.name} line {n} is not a JSON object")
        if not out and obj.get("format") != fmt:
            raise StreamlensError(f"{path.name} line {n} is not a streamlens {what} header "
                                  f"(format {obj.get('format')!r}, expected {fmt!r})")
        out.append((n, obj))
    return out


def read_file(path: Path, *, truncate: bool = False) -> Contents:
    """Parse a document-sums file (see the module docstring for what is an error)."""
    path = Path(path)
    if not path.exists():
        raise StreamlensError(f"document-sums file {str(path)!r} does not exist")
    out = None
    for n, obj in log_lines(path, FORMAT, "document-sums", truncate=truncate, stacklevel=4):
        if out is None:
            out = Contents(obj)
            continue
        lo = obj.get("lo")
        if isinstance(lo, bool) or not isinstance(lo, int) or lo < 0:
            raise StreamlensError(f"{path.name} line {n}: 'lo' must be a document index, got {lo!r}")
        if "unit" in obj:
            key = (lo, obj["unit"])
            if key in out.units:
                raise StreamlensError(f"{path.name} line {n}: duplicate line for unit {obj['unit']!r} on documents from {lo}")
            sums = obj.get("sums")
            if not isinstance(sums, dict) or not sums:
                raise StreamlensError(f"{path.name} line {n}: 'sums' is missing or empty")
            out.units[key] = {k: _floats(path, n, v, f"sums[{k!r}]") for k, v in sums.items()}
            if any(math.isinf(x) for s in out.units[key].values() for x in s.tolist()):
                raise StreamlensError(f"{path.name} line {n}: infinite sum")
        elif "counts" in obj:
            if lo in out.batches:
                raise StreamlensError(f"{path.name} line {n}: duplicate batch line for documents from {lo}")
            counts = obj["counts"]
            if not isinstance(counts, list) or len(counts) != 2:
                raise StreamlensError(f"{path.name} line {n}: 'counts' must hold two lists")
            c = torch.stack([_floats(path, n, r, "counts") for r in counts])
            bi = obj.get("bi")
            if not isinstance(bi, list):
                raise StreamlensError(f"{path.name} line {n}: 'bi' must be a list of lists")
            b = torch.stack([_floats(path, n, r, "bi", c.shape[1]) for r in bi]) if bi else torch.zeros(0, c.shape[1])
            out.batches[lo] = (c, b)
        else:
            raise StreamlensError(f"{path.name} line {n}: neither a batch line nor a unit line")
    if out is None:
        raise StreamlensError(f"{str(path)!r} is empty: it holds no document-sums header")
    return out


# --------------------------------------------------------------------------- identities
def describe_positions(positions):
    """``positions`` as it goes into a fingerprint (a mask by its hash)."""
    import hashlib

    if isinstance(positions, Tensor):
        return "mask sha256:" + hashlib.sha256(positions.bool().cpu().numpy().tobytes()).hexdigest()[:16]
    return repr(positions) if positions is not None else None


def weights_checksum(model) -> str:
    """A cheap identity of the weights: the first 4096 values of every parameter, summed in float64."""
    import hashlib

    h = hashlib.sha256()
    for name, p in model.hf.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{float(p.detach().flatten()[:4096].double().sum().cpu())!r};".encode())
    return h.hexdigest()[:16]


def load_done(path: Path, header: dict, resume: bool) -> Contents:
    """The finished (batch, unit) sums of every ``<path>.docsums-*.jsonl`` (all ranks' files), checked
    against this run's ``header``."""
    files = sorted(path.parent.glob(path.name + ".docsums-*.jsonl"))
    if files and not resume:
        raise StreamlensError(f"{str(files[0])!r} holds document sums of an earlier run: pass resume=True to "
                              "continue it, or remove it")
    done = Contents(header)
    for f in files:
        got = read_file(f, truncate=True)
        check_fingerprint(f, got.header, header)
        for key, v in got.units.items():
            if key in done.units:
                raise StreamlensError(f"{f.name}: unit {key[1]!r} on documents from {key[0]} is also in another file")
            done.units[key] = v
        done.batches.update(got.batches)
    return done
