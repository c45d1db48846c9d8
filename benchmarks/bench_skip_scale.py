"""Layer-removal sweeps at scale, each number a ratio against a baseline measured in the same run.

    python benchmarks/bench_skip_scale.py memory  --docs 8 32 128 --tokens 256   # peak RSS vs documents
    python benchmarks/bench_skip_scale.py hand    --docs 4 --tokens 128          # vs a hand-written HF loop
    python benchmarks/bench_skip_scale.py batched --docs 4 --tokens 64 --unit block   # stacked vs one per pass
    python benchmarks/bench_skip_scale.py torchrun --docs 8 --tokens 64          # 2 gloo processes vs 1
    python benchmarks/bench_skip_scale.py screen  --docs 2 --tokens 64 --top 27  # exact-all vs screened heads

All on SmolLM2-135M (CPU). ``memory`` runs each size in a fresh process (peak RSS from
``getrusage``) and the evaluator of main before streaming (tests/reference_skip.py) beside it.
Timings interleave the two sides ``--repeats`` times and keep the best of each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def documents(n: int) -> list[str]:
    """``n`` documents of the built-in corpus (passages re-cut at other offsets, each keeping 1500+ characters,
    when more are asked for)."""
    from streamlens.report.demo import pydoc_texts

    texts = [t for t in pydoc_texts() if len(t) > 2500]
    return [texts[k % len(texts)][((k // len(texts)) * 400) % (len(texts[k % len(texts)]) - 1500):] for k in range(n)]


def _load():
    import streamlens as sl

    return sl.load("smollm2-135m")


# --------------------------------------------------------------------------- memory
def _memory_child(n: int, tokens: int, old: bool) -> None:
    import streamlens as sl

    model = _load()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    texts = documents(n)
    if old:
        sys.path.insert(0, str(ROOT / "tests"))
        from reference_skip import OldEvaluator

        ev = OldEvaluator(model, texts, max_tokens=tokens, batch_size=8, progress=False, n_boot=200)
        ev.evaluate("block.29")
    else:
        ev = sl.LayerSkipEvaluator(model, texts, max_tokens=tokens, batch_size=8, progress=False, n_boot=200)
        ev.sweep(["block.29"])  # a removal on every batch: one clean pass + one replay each
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"docs": n, "old": old, "peak_mb": peak / 1024, "after_load_mb": base / 1024}))


def bench_memory(args) -> None:
    rows = []
    for old in (False, True):
        for n in args.docs:
            if old and n > args.old_max:
                continue
            out = subprocess.run([sys.executable, __file__, "_memory", str(n), str(args.tokens), str(int(old))],
                                 capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if out.returncode:
                print(out.stderr[-2000:])
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{'old (main)' if old else 'streaming '} {n:5d} docs x {args.tokens} tokens: peak RSS "
                  f"{r['peak_mb']:.0f} MB ({r['peak_mb'] - r['after_load_mb']:.0f} MB above the loaded model)", flush=True)
    new = [r for r in rows if not r["old"]]
    if len(new) > 1:
        print(f"streaming: largest / smallest peak = {new[-1]['peak_mb'] / new[0]['peak_mb']:.3f} "
              f"({new[0]['docs']} -> {new[-1]['docs']} documents; flat means <= 1.10)")


# --------------------------------------------------------------------------- vs a hand-written loop
def hand_sweep(model, texts, tokens: int) -> dict:
    """What a user writes: one full HF forward per block with a forward hook that returns the block's input,
    full-vocabulary KL / delta CE / top-1 against the clean forward."""
    hf = model.hf
    layers = hf.model.layers
    out = {}
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor(model.tokenizer(t)["input_ids"][:tokens])[None]
            clean = hf(ids).logits[0].float().log_softmax(-1)
            for l, layer in enumerate(layers):
                h = layer.register_forward_hook(lambda m, a, k, o: (a[0] if a else k["hidden_states"], *o[1:])
                                                if isinstance(o, tuple) else (a[0] if a else k["hidden_states"]),
                                                with_kwargs=True)
                try:
                    abl = hf(ids).logits[0].float().log_softmax(-1)
                finally:
                    h.remove()
                kl = (clean.exp() * (clean - abl)).sum(-1).mean()
                tgt = ids[0, 1:, None]
                dce = (clean[:-1].gather(-1, tgt) - abl[:-1].gather(-1, tgt)).mean()
                top1 = (clean.argmax(-1) == abl.argmax(-1)).float().mean()
                out.setdefault(l, []).append((float(kl), float(dce), float(top1)))
    return out


def bench_hand(args) -> None:
    import streamlens as sl

    model, texts = _load(), documents(args.docs)
    best = {"hand": float("inf"), "streamlens": float("inf")}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        hand_sweep(model, texts, args.tokens)
        best["hand"] = min(best["hand"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        ev = sl.LayerSkipEvaluator(model, texts, max_tokens=args.tokens, batch_size=args.docs, progress=False, n_boot=200)
        ev.sweep("block", metrics=("kl", "ce", "top1"))
        best["streamlens"] = min(best["streamlens"], time.perf_counter() - t0)
    print(f"block sweep, {args.docs} docs x {args.tokens} tokens: hand-written HF loop {best['hand']:.1f} s, "
          f"streamlens {best['streamlens']:.1f} s, ratio {best['streamlens'] / best['hand']:.2f} (target <= 0.6)")


# --------------------------------------------------------------------------- stacked vs one per pass
def bench_batched(args) -> None:
    import streamlens as sl

    model, texts = _load(), documents(args.docs)
    best, tables = {}, {}
    for _ in range(args.repeats):
        for name, kw in (("one per pass", {"variants_per_pass": 1}), ("stacked", {"memory_budget": args.budget})):
            ev = sl.LayerSkipEvaluator(model, texts, max_tokens=args.tokens, batch_size=args.docs, progress=False,
                                       n_boot=200, **kw)
            t0 = time.perf_counter()
            tables[name] = ev.sweep(args.unit, metrics=("kl", "ce", "top1")).to_dataframe()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    diff = max(float((tables["stacked"][c] - tables["one per pass"][c]).abs().max()) for c in ("kl", "delta_ce", "top1"))
    print(f"{args.unit} sweep, {args.docs} docs x {args.tokens} tokens, CPU: one per pass {best['one per pass']:.1f} s, "
          f"stacked ({args.budget}) {best['stacked']:.1f} s, ratio {best['stacked'] / best['one per pass']:.2f}; "
          f"max |metric difference| {diff:.1e}")


# --------------------------------------------------------------------------- torchrun
def bench_torchrun(args) -> None:
    import pandas as pd

    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "texts.txt"
        data.write_text("\n".join(t.replace("\n", " ") for t in documents(args.docs)) + "\n")
        common = ["sweep", "smollm2-135m", "--data", str(data), "--unit", "block", "--max-tokens", str(args.tokens),
                  "--batch-size", "2"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        times = {}
        for name, prefix in (("1 process", [sys.executable, "-m", "streamlens"]),
                             ("2 processes", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                              "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
                                              "-m", "streamlens"])):
            t0 = time.perf_counter()
            r = subprocess.run([*prefix, *common, "--out", str(Path(d) / f"{name[0]}.csv")], env=env,
                               capture_output=True, text=True)
            times[name] = time.perf_counter() - t0
            if r.returncode:
                print(r.stderr[-2000:])
                return
        a, b = pd.read_csv(Path(d) / "1.csv"), pd.read_csv(Path(d) / "2.csv")
        same = a.equals(b)
    print(f"block sweep, {args.docs} docs x {args.tokens} tokens (wall time incl. start-up and model load): "
          f"1 process {times['1 process']:.1f} s, torchrun 2 gloo processes {times['2 processes']:.1f} s, "
          f"ratio {times['2 processes'] / times['1 process']:.2f}; tables identical: {same}")


# --------------------------------------------------------------------------- screening
def bench_screen(args) -> None:
    import streamlens as sl
    from streamlens.skip.metrics import spearman

    model, texts = _load(), documents(args.docs)
    ev = sl.LayerSkipEvaluator(model, texts, max_tokens=args.tokens, batch_size=args.docs, progress=False, n_boot=200)
    t0 = time.perf_counter()
    screened = ev.sweep("head", metrics=("kl", "ce", "top1"), screen=args.top)
    t_screen = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = ev.sweep("head", metrics=("kl", "ce", "top1")).to_dataframe().set_index("unit")
    t_full = time.perf_counter() - t0
    s = screened.to_dataframe().set_index("unit")
    top = s.index[s["exact"]]
    exact_top = set(full["delta_ce"].abs().sort_values(ascending=False).index[: args.top])
    print(f"head sweep ({len(full)} heads), {args.docs} docs x {args.tokens} tokens: exact for all {t_full:.1f} s, "
          f"screened (estimates for all, exact for the top {args.top}) {t_screen:.1f} s, ratio {t_screen / t_full:.2f}")
    print(f"  rank correlation estimate/exact delta_ce over the {args.top} heads computed both ways: "
          f"{screened.screening['rank_correlation']:.3f}; over all heads: "
          f"{spearman(s['delta_ce_estimate'], full['delta_ce']):.3f}; the screened top {args.top} holds "
          f"{len(exact_top & set(top))} of the exact top {args.top} by |delta_ce|")


def main(argv=None) -> None:
    warnings.filterwarnings("ignore")
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_memory":
        return _memory_child(int(sys.argv[2]), int(sys.argv[3]), bool(int(sys.argv[4])))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("memory", "hand", "batched", "torchrun", "screen"))
    p.add_argument("--docs", type=int, nargs="+", default=None)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--old-max", type=int, default=16, help="largest document count run with main's evaluator")
    p.add_argument("--budget", default="1GB")
    p.add_argument("--unit", default="block")
    p.add_argument("--top", type=int, default=27)
    args = p.parse_args(argv)
    defaults = {"memory": ([8, 32, 128], 256), "hand": ([4], 128), "batched": ([4], 64), "torchrun": ([8], 64),
                "screen": ([2], 64)}[args.what]
    args.docs = args.docs or defaults[0]
    args.tokens = args.tokens or defaults[1]
    if args.what != "memory":
        args.docs = args.docs[0]
    print(f"load: {os.getloadavg()[0]:.1f} (1 min), {os.cpu_count()} CPUs", flush=True)
    {"memory": bench_memory, "hand": bench_hand, "batched": bench_batched, "torchrun": bench_torchrun,
     "screen": bench_screen}[args.what](args)
    print(f"load: {os.getloadavg()[0]:.1f} (1 min)")


if __name__ == "__main__":
    main()
