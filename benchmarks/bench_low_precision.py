"""Every verb in bfloat16 / float16 against the same weights in float32 (SmolLM2-135M by default).

    python benchmarks/bench_low_precision.py [--model smollm2-135m] [--dtypes bfloat16,float16]

Prints, per verb and dtype, the exactness number the verb reports (decomposition check, trace closure,
gradient split error) and the largest deviation from the float32 run relative to the largest float32
value, with the wall time of each run beside the float32 one (same process, same inputs).
"""

from __future__ import annotations

import argparse
import time

import torch

import streamlens as sl

PROMPTS = ["The capital of France is", "def f(x): return x + 1", "In 1492, Columbus sailed across the"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def run(model):
    out, t0 = {}, time.perf_counter()
    tr = sl.trace(model, PROMPTS)
    out["trace closure"] = (tr.closure_error(), tr["resid_post", model.arch.n_layers - 1])
    for unit in ("layer", "head"):
        d = sl.decompose(model, PROMPTS, " the", unit=unit, progress=False)
        out[f"decompose {unit} check"] = (d.check(), d.values)
    lens = sl.logit_lens(model, PROMPTS, target=" the", progress=False)
    out["logit_lens kl"] = (float("nan"), torch.tensor(lens.to_dataframe()["kl"].values))
    g = sl.gradient_split(model, PROMPTS)
    out["gradient split error"] = (g.split_error(), g.full)
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtypes", default="bfloat16,float16")
    args = ap.parse_args(argv)
    ref, t32 = run(sl.load(args.model, dtype="float32"))
    print(f"{'quantity':28s} {'dtype':9s} {'own check':>10s} {'float32 check':>13s} {'max |Δ| / max |f32|':>20s}")
    for dt in args.dtypes.split(","):
        got, t = run(sl.load(args.model, dtype=dt))
        for k, (check, val) in got.items():
            print(f"{k:28s} {dt:9s} {check:10.2e} {ref[k][0]:13.2e} {_rel(val, ref[k][1]):20.2e}")
        print(f"wall time: {dt} {t:.1f} s, float32 {t32:.1f} s (ratio {t / t32:.2f}; CPU half-precision kernels are slow)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
