"""Full block-skip sweep: prefix reuse vs the naive path (one full forward per removed unit + the clean one).

    python benchmarks/bench_skip.py            # GPT-2-small-shaped random model, then SmolLM2-135M
    python benchmarks/bench_skip.py --docs 8 --tokens 128 --skip-smollm2   # the issue's size (slow on 2 shared cores)

Both paths are timed in the same run, evaluator construction (the clean pass) included, and their
tables are compared (max |difference| of every metric).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import torch

import streamlens as sl
from streamlens.report.demo import pydoc_texts
from streamlens.testing import build_tiny


def bench(name: str, model, texts, max_tokens: int, batch_size: int) -> float:
    times, tables = {}, {}
    # Warm up (first-forward costs), then time the prefix path first so that any remaining
    # first-run penalty counts against it, not against the baseline.
    sl.LayerSkipEvaluator(model, texts[:1], max_tokens=max_tokens, strategy="naive", progress=False, n_boot=10).evaluate("block.0")
    for strategy in ("auto", "naive"):
        t0 = time.perf_counter()
        ev = sl.LayerSkipEvaluator(model, texts, max_tokens=max_tokens, batch_size=batch_size, strategy=strategy,
                                   progress=False, n_boot=200)
        tables[strategy] = ev.sweep("block", metrics=("kl", "ce", "top1", "angle")).to_dataframe()
        times[strategy] = time.perf_counter() - t0
        if strategy == "auto":
            print(f"  strategy used: {ev.strategy} {ev.strategy_reason}")
    diff = max(float((tables["naive"][c] - tables["auto"][c]).abs().max()) for c in ("kl", "delta_ce", "top1", "angle"))
    ratio = times["auto"] / times["naive"]
    print(f"{name}: {model.arch.n_layers} blocks, {len(texts)} docs x <= {max_tokens} tokens | naive {times['naive']:.2f} s, "
          f"prefix {times['auto']:.2f} s, ratio {ratio:.2f} (target <= 0.6) | max |metric diff| {diff:.1e}")
    return ratio


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--smollm2-docs", type=int, default=3)
    p.add_argument("--smollm2-tokens", type=int, default=48)
    p.add_argument("--skip-smollm2", action="store_true")
    p.add_argument("--skip-gpt2", action="store_true")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    texts = pydoc_texts()
    if not args.skip_gpt2:
        _gpt2(args, texts)
    if not args.skip_smollm2:
        bench("SmolLM2-135M", sl.load("smollm2-135m"), texts[: args.smollm2_docs], args.smollm2_tokens,
              args.smollm2_docs)


def _gpt2(args, texts) -> None:
    with tempfile.TemporaryDirectory() as d:
        folder = build_tiny("gpt2", d, n_layers=12, d_model=768, n_heads=12, d_mlp=3072, n_ctx=args.tokens,
                            max_params=100_000_000)
        gpt2 = sl.load(folder)
        bench("GPT-2-small-shaped (random, vocab 512)", gpt2, texts[: args.docs], args.tokens, args.docs)


if __name__ == "__main__":
    main()
