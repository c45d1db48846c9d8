"""Run the architecture coverage check on every architecture and write ``docs/architectures.md``.

    python scripts/arch_coverage.py                      # all, one forked process each, table written
    python scripts/arch_coverage.py LlamaForCausalLM     # some, table not written
    python scripts/arch_coverage.py --json rows.json     # also the raw rows

Each architecture runs in a forked child (imports are shared, a crash or a hang stays in the child)
with a time limit; see ``streamlens/coverage.py`` for what is checked.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import torch

from streamlens import coverage

ROOT = Path(__file__).resolve().parent.parent


def _child(arch: str, root: str, limit: float, conn) -> None:
    import transformers

    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    conn.send(coverage.check_architecture(arch, root, time_limit=limit).to_dict())
    conn.close()


def run(arch: str, root: str, limit: float) -> coverage.CoverageRow:
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(arch, root, limit, send))
    t0 = time.perf_counter()
    p.start()
    send.close()
    got = recv.poll(limit + 30)
    row = coverage.CoverageRow(**recv.recv()) if got else None
    p.join(5)
    if p.is_alive():
        p.kill()
        p.join()
    if row is None:
        row = coverage.CoverageRow(arch, "crash", f"the check process died (exit code {p.exitcode}) or hung",
                                   seconds=round(time.perf_counter() - t0, 2))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archs", nargs="*", help="architecture class names (default: all)")
    ap.add_argument("--limit", type=float, default=90.0, help="seconds per architecture")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--out", default=str(ROOT / "docs" / "architectures.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import streamlens  # noqa: F401  (import once in the parent; children fork from it)
    import transformer_lens.model_bridge  # noqa: F401

    archs = args.archs or coverage.architectures()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for arch in archs:
            row = run(arch, root, args.limit)
            rows.append(row)
            print(f"{arch:34s} {row.result:9s} {row.seconds:6.1f}s {row.layout:10s} {row.reason[:150]}", flush=True)
    n_pass = sum(r.result == "pass" for r in rows)
    print(f"{n_pass}/{len(rows)} pass")
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in rows], indent=1))
    if not args.archs:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(coverage.markdown_table(rows))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
