"""The mean-writes pass of ``mode="mean"`` sharded over torchrun ranks against one process (SmolLM2-135M).

    python benchmarks/bench_mean_pass.py [--docs 8] [--max-tokens 64] [--batch-size 2] [--nproc 2]

Runs the pass in one process, then under ``torchrun --nproc-per-node N`` (gloo), and prints each wall
time, the batches each rank computed, and whether every rank's mean writes equal the single process's
bit for bit (they must: per-batch sums are gathered and added in batch order).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _evaluator(args):
    import streamlens as sl
    from streamlens.report.demo import demo_corpus

    return sl.LayerSkipEvaluator(sl.load(args.model), demo_corpus(args.docs), max_tokens=args.max_tokens,
                                 batch_size=args.batch_size, progress=False, strategy="prefix")


def worker(args) -> None:
    import torch.distributed as dist

    from streamlens.intervene import means

    dist.init_process_group("gloo")
    ev = _evaluator(args)
    calls = []
    real = means.batch_write_sums
    means.batch_write_sums = lambda model, batch: (calls.append(1), real(model, batch))[1]
    dist.barrier()
    t0 = time.perf_counter()
    got = ev.ensure_means()
    wall = time.perf_counter() - t0
    torch.save({"means": {str(k): v for k, v in got.items()}, "wall": wall, "batches": len(calls)},
               Path(args.worker) / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    ev = _evaluator(args)
    t0 = time.perf_counter()
    single = ev.ensure_means()
    t1 = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), "--master-port", "0",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", __file__, "--worker", tmp,
               "--model", args.model, "--docs", str(args.docs), "--max-tokens", str(args.max_tokens),
               "--batch-size", str(args.batch_size)]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        total = time.perf_counter() - t0
        if r.returncode:
            print(r.stderr[-3000:])
            return 1
        ranks = [torch.load(Path(tmp) / f"rank{i}.pt") for i in range(args.nproc)]
    same = all(set(r["means"]) == {str(k) for k in single} and
               all(torch.equal(r["means"][str(k)], v) for k, v in single.items()) for r in ranks)
    n = len(ev.data_batches)
    print(f"{args.docs} documents x {args.max_tokens} tokens, {n} batches of {args.batch_size}")
    print(f"1 process: mean pass {t1:.2f} s over {n} batches")
    for i, r in enumerate(ranks):
        print(f"rank {i} of {args.nproc}: mean pass {r['wall']:.2f} s over {r['batches']} batches")
    print(f"torchrun total (start-up and model loads included): {total:.1f} s")
    print(f"every rank's mean writes equal the single process's bit for bit: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
