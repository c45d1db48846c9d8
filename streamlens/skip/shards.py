"""Independent shard jobs (a SLURM array) and the merge that joins them into one table.

Job ``i`` of ``n`` measures batches ``i, i + n, i + 2n, ...`` of the data (the batches a single process
makes) and writes their per-document sums to its own file (:mod:`streamlens.skip.docsums`), whose
header also carries what the table needs without the model: the units, the position counts of every
document and the bootstrap settings. :func:`merge_shards` checks that the ``n`` files come from the
same sweep (same fingerprint) and cover every batch, and computes the rows exactly as one process
would: the same per-document sums, the same bootstrap draws, the same table.

    streamlens sweep smollm2-135m --data texts.txt --shard 0/2 --out part0.jsonl   # job 0
    streamlens sweep smollm2-135m --data texts.txt --shard 1/2 --out part1.jsonl   # job 1
    streamlens merge part0.jsonl part1.jsonl --out sweep.csv
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from streamlens.errors import StreamlensError
from streamlens.intervene.units import check_mode
from streamlens.skip import distributed
from streamlens.skip.docsums import DocSums, check_fingerprint, read_file
from streamlens.skip.metrics import resample_indices, stored_names
from streamlens.skip.rowstore import check_out, write_row
from streamlens.skip.sweeps import SkipSweep, metric_row, row_columns, sweep_table, sweep_units, unit_columns


def run_shard(ev, unit="block", *, shard, out, mode: str = "skip", metrics: Sequence[str] = ("kl", "ce", "top1"),
              width=None, resume: bool = True) -> Path:
    """Job ``i`` of ``n`` (``shard=(i, n)`` or ``"i/n"``) of ``ev``'s sweep: measure its batches and write their
    per-document sums to ``out`` (``.jsonl``). Re-running the job continues its file."""
    names = ev.metric_names(metrics)
    units, kind = sweep_units(ev.model, unit, width)
    for u in units:
        check_mode(mode, u)
    sh = distributed.current(shard)
    path = Path(out)
    if path.suffix.lower() != ".jsonl":
        raise StreamlensError(f"out={str(out)!r}: a shard writes document sums, to a .jsonl file")
    if path.exists() and path.stat().st_size > 0 and not resume:
        raise StreamlensError(f"out file {str(path)!r} already exists: pass resume=True to continue it, or remove it")
    fp = ev.fingerprint(units, mode, names)
    header = {"fingerprint": fp, "kind": kind, "mode": mode, "metrics": names, "model_name": ev.model.name,
              "strategy": ev.strategy, "strategy_reason": ev.strategy_reason,
              "units": [unit_columns(u) for u in units], "shard": [sh.index, sh.count],
              "batch_starts": [lo for lo, _, _ in ev._data], "count": ev._count.T.tolist()}
    store = DocSums(path, header)
    ev._stream(units, mode, names, want_bi=kind == "block", store=store, done=read_file(path), shard=sh,
               desc=f"shard {sh.index}/{sh.count}")
    return path


def merge_shards(paths: Sequence, out=None) -> SkipSweep:
    """The table of a sweep run as ``n`` shard jobs, from their ``n`` document-sums files (any order).

    ``out``: also write the rows (``.csv``/``.jsonl``). Files from different sweeps, a missing or repeated
    shard, or a job that has not finished are errors naming the file.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise StreamlensError("merge needs the shard files: got none")
    parts = [read_file(p) for p in paths]
    head = parts[0].header
    for p, c in zip(paths, parts):
        if "shard" not in c.header:
            raise StreamlensError(f"{p.name} is not a shard file (it has no shard in its header): sweeps with "
                                  "--out resume themselves, only --shard i/n files are merged")
        check_fingerprint(p, c.header, head, paths[0])
    n = head["shard"][1]
    by_index: dict[int, Path] = {}
    for p, c in zip(paths, parts):
        i, count = c.header["shard"]
        if count != n:
            raise StreamlensError(f"{p.name} is shard {i}/{count}, but {paths[0].name} is one of {n}")
        if i in by_index:
            raise StreamlensError(f"{p.name} and {by_index[i].name} are both shard {i}/{n}")
        by_index[i] = p
    missing = sorted(set(range(n)) - set(by_index))
    if missing:
        raise StreamlensError(f"shards {missing} of {n} are missing: pass all {n} files")
    fp = head["fingerprint"]
    names, n_docs = head["metrics"], fp["n_docs"]
    stored = stored_names(names)
    labels = [u["unit"] for u in head["units"]]
    count = torch.tensor(head["count"], dtype=torch.float64).T  # (docs, 2)
    sums = {lab: {k: torch.zeros(n_docs, dtype=torch.float64) for k in stored} for lab in labels}
    n_layers = None
    bi = None
    for b, lo in enumerate(head["batch_starts"]):
        i = b % n
        c = parts[[c.header["shard"][0] for c in parts].index(i)]
        hi = head["batch_starts"][b + 1] if b + 1 < len(head["batch_starts"]) else n_docs
        for lab in labels:
            got = c.units.get((lo, lab))
            if got is None:
                raise StreamlensError(f"{by_index[i].name} lacks unit {lab!r} on documents {lo}..{hi - 1}: "
                                      "that job has not finished (run it again to continue it)")
            for k in stored:
                sums[lab][k][lo:hi] = got[k]
        if head["kind"] == "block":
            if lo not in c.batches:
                raise StreamlensError(f"{by_index[i].name} lacks the clean pass of documents {lo}..{hi - 1}")
            batch_bi = c.batches[lo][1]
            if bi is None:
                n_layers = batch_bi.shape[0]
                bi = torch.zeros(n_layers, n_docs, dtype=torch.float64)
            bi[:, lo:hi] = batch_bi
    boot = resample_indices(n_docs, fp["n_boot"], fp["seed"])
    columns = row_columns(names)
    rows = []
    path = None if out is None else check_out(out)
    if path is not None and path.exists() and path.stat().st_size > 0:
        raise StreamlensError(f"out file {str(path)!r} already exists: remove it or choose another")
    for u in head["units"]:
        row = {**u, "mode": head["mode"], **metric_row(sums[u["unit"]], count, boot)}
        row = {c: row.get(c) for c in columns}
        rows.append(row)
        if path is not None:
            write_row(path, row, columns)
    influence = None
    if bi is not None:
        total = count[:, 0].sum()
        influence = [float(bi[j].sum() / total) for j in range(n_layers)]
    return sweep_table(head["kind"], head["mode"], names, rows, influence, head["model_name"], n_docs,
                       head["strategy"], head["strategy_reason"])
