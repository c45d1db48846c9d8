"""Benchmark: per-source decomposition (unit="source") against a plain per-head decomposition (unit="head").

    python benchmarks/bench_sources.py                 # SmolLM2-135M, one 256-token prompt, last position
    python benchmarks/bench_sources.py --tokens 128 --repeats 5

Both decompose the last position of the same prompt (passages of Python's documentation, cut to
``tokens`` tokens) for one target token. Targets: time ≤ 1.5× and peak memory ≤ 1.2× of unit="head".

* time: both in this process, interleaved ``repeats`` times after a warm-up, best of each;
* peak memory: each in a fresh child process (the model loaded, one warm-up call on a short prompt;
  ``mem_repeats`` processes per unit, interleaved, the least of each kept),
  the resident memory sampled every millisecond during the measured call (``/proc/self/statm``,
  Linux): its peak, as the increase over the resident memory just before the call and as the whole.
  (``getrusage``'s lifetime peak cannot be used: loading the model peaks higher than either call.)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time

import torch


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class _Sampler(threading.Thread):
    """The largest resident memory seen while running, sampled every millisecond."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = _rss_mib(), threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, _rss_mib())
            time.sleep(0.001)


def _setup(model_name: str, tokens: int):
    import streamlens as sl
    from streamlens.testing import pydoc_texts

    model = sl.load(model_name)
    text = " ".join(pydoc_texts()[:40])
    ids = model.tokenizer(text, return_tensors="pt")["input_ids"][:, :tokens]
    if ids.shape[1] != tokens:
        raise SystemExit(f"the text has only {ids.shape[1]} tokens, fewer than {tokens}")
    return sl, model, ids


def _child(model_name: str, tokens: int, unit: str) -> None:
    sl, model, ids = _setup(model_name, tokens)
    sl.decompose(model, ids[:, :16], " the", unit=unit, progress=False)  # warm-up: caches, lazy imports
    before = _rss_mib()
    sampler = _Sampler()
    sampler.start()
    sl.decompose(model, ids, " the", unit=unit, progress=False)
    sampler.stop.set()
    sampler.join()
    after = max(sampler.peak, _rss_mib())
    print(json.dumps({"unit": unit, "before_mib": before, "peak_mib": after, "extra_mib": after - before}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mem-repeats", type=int, default=3)
    ap.add_argument("--child", choices=["head", "source"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.child:
        return _child(a.model, a.tokens, a.child)

    sl, model, ids = _setup(a.model, a.tokens)
    print(f"model: {model!r}; one prompt of {ids.shape[1]} tokens, last position, target ' the', "
          f"{torch.get_num_threads()} threads")

    def run(unit: str):
        t0 = time.perf_counter()
        d = sl.decompose(model, ids, " the", unit=unit, progress=False)
        return time.perf_counter() - t0, d

    run("head"), run("source")  # warm-up
    times: dict[str, list[float]] = {"head": [], "source": []}
    for _ in range(a.repeats):
        for unit in ("head", "source"):
            t, d = run(unit)
            times[unit].append(t)
            if unit == "source":
                src = d
            else:
                head = d
    best = {u: min(v) for u, v in times.items()}
    per_head = src.values[[i for i, k in enumerate(src.kinds) if k == "source"]].sum()
    want = head.values[[i for i, k in enumerate(head.kinds) if k == "head"]].sum()
    print(f"check: unit='source' {src.check():.1e}, unit='head' {head.check():.1e}; "
          f"|Σ sources − Σ heads| = {abs(float(per_head - want)):.1e}")
    print(f"time   unit='head' {best['head']:.3f} s, unit='source' {best['source']:.3f} s, "
          f"ratio {best['source'] / best['head']:.2f}x (target <= 1.5x)  [all: {times}]")

    runs: dict[str, list[dict]] = {"head": [], "source": []}
    for _ in range(a.mem_repeats):  # fresh processes, interleaved; resident memory is noisy, keep the least
        for unit in ("head", "source"):
            out = subprocess.run([sys.executable, __file__, "--model", a.model, "--tokens", str(a.tokens),
                                  "--threads", str(a.threads), "--child", unit], capture_output=True, text=True,
                                 check=True)
            runs[unit].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("memory runs (extra MiB): " + ", ".join(f"{u}: {[round(r['extra_mib']) for r in v]}" for u, v in runs.items()))
    h, s = (min(runs[u], key=lambda r: r["extra_mib"]) for u in ("head", "source"))
    print(f"memory unit='head' peak {h['peak_mib']:.0f} MiB (+{h['extra_mib']:.0f} over the loaded model), "
          f"unit='source' peak {s['peak_mib']:.0f} MiB (+{s['extra_mib']:.0f})")
    print(f"memory ratio: process peak {s['peak_mib'] / h['peak_mib']:.3f}x, extra over the loaded model "
          f"{s['extra_mib'] / max(h['extra_mib'], 1e-9):.2f}x (target <= 1.2x)")


if __name__ == "__main__":
    main()
