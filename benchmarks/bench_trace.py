"""Benchmark: the cost of a full residual-stream trace, against baselines measured in the same run.

On a GPT-2-small-shaped model (12 layers, d_model 768, 12 heads, vocabulary 50257, random weights,
float32, CPU):

1. time: plain HuggingFace forward (a fresh, unwrapped ``GPT2LMHeadModel``, SDPA attention), the
   same model's forward inside its ``TransformerBridge`` with no hooks (``Model.run``: the bridge
   computes attention eagerly, materialising float32 patterns) vs ``streamlens.trace``
   (all layers, all positions, reads and writes) vs TransformerLens' ``run_with_cache`` on the same
   bridge, restricted to the same hook points. Batch ``--batch`` × ``--seq`` tokens.
2. memory: peak resident memory added by one call, each variant in its own subprocess: the plain
   forward vs a last-token-only trace over ``--mem-batch`` sequences of ``--seq`` tokens.

    python benchmarks/bench_trace.py            # defaults: 4 x 256 timing, 64 x 256 memory
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(folder: Path, n_layers: int) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from streamlens.testing import tiny_tokenizer

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layers, n_positions=1024)).eval()
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def time_variants(folder: Path, batch: int, seq: int, repeats: int) -> dict[str, float]:
    import torch
    from transformers import GPT2LMHeadModel

    import streamlens as sl

    torch.manual_seed(1)
    ids = torch.randint(0, 50257, (batch, seq))
    plain = GPT2LMHeadModel.from_pretrained(folder).eval()
    model = sl.load(str(folder))
    n = model.arch.n_layers
    names = {f"blocks.{l}.{p}" for l in range(n) for p in
             ("hook_in", "ln1.hook_out", "attn.hook_out", "ln2.hook_in", "ln2.hook_out", "mlp.hook_out", "hook_out")}
    names |= {"embed.hook_out", "pos_embed.hook_out", "ln_final.hook_in", "ln_final.hook_out"}
    out = {}
    # Interleave the variants so that drifts in machine load hit all of them alike.
    mask = torch.ones_like(ids, dtype=torch.bool)
    fns = {
        "hf_forward": lambda: plain(ids),
        "bridge_forward": lambda: model.run(ids, mask),
        "streamlens_trace": lambda: sl.trace(model, ids),
        "tl_run_with_cache": lambda: model.bridge.run_with_cache(ids, names_filter=lambda name: name in names),
    }
    with torch.no_grad():
        samples = {k: [] for k in fns}
        for f in fns.values():
            f()
        for _ in range(repeats):
            for k, f in fns.items():
                t = time.perf_counter()
                f()
                samples[k].append(time.perf_counter() - t)
    for k, v in samples.items():
        out[k] = statistics.median(v)
    return out


MEM_CHILD = r"""
import json, resource, sys, torch
from pathlib import Path
folder, variant, batch, seq = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(1)
ids = torch.randint(0, 50257, (batch, seq))
if variant == "hf_forward":
    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    run = lambda: model(ids)
elif variant == "bridge_forward":
    import streamlens as sl
    model = sl.load(str(folder))
    run = lambda: model.run(ids, torch.ones_like(ids, dtype=torch.bool))
else:
    import streamlens as sl
    model = sl.load(str(folder))
    run = lambda: sl.trace(model, ids, positions="last")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    run()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"added_mib": (peak - base) / 1024}))
"""


def mem_variant(folder: Path, variant: str, batch: int, seq: int) -> float:
    res = subprocess.run([sys.executable, "-c", MEM_CHILD, str(folder), variant, str(batch), str(seq)],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["added_mib"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mem-batch", type=int, default=64)
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2-small-shaped"
        build(folder, args.layers)
        t = time_variants(folder, args.batch, args.seq, args.repeats)
        print(f"time, batch {args.batch} x {args.seq} tokens, {args.layers} layers, median of {args.repeats}:")
        for k, v in t.items():
            print(f"  {k:20s} {v:8.3f} s   ratio to hf_forward {v / t['hf_forward']:.3f}")
        print(f"  trace / bridge_forward: {t['streamlens_trace'] / t['bridge_forward']:.3f}")
        print(f"  trace / run_with_cache: {t['streamlens_trace'] / t['tl_run_with_cache']:.3f}")
        if not args.skip_memory:
            m_hf = mem_variant(folder, "hf_forward", args.mem_batch, args.seq)
            m_br = mem_variant(folder, "bridge_forward", args.mem_batch, args.seq)
            m_tr = mem_variant(folder, "trace_last", args.mem_batch, args.seq)
            print(f"peak memory added, {args.mem_batch} x {args.seq} tokens:")
            print(f"  hf_forward           {m_hf:8.0f} MiB")
            print(f"  bridge_forward       {m_br:8.0f} MiB   ratio to hf_forward {m_br / m_hf:.3f}")
            print(f"  trace (last token)   {m_tr:8.0f} MiB   ratio to hf_forward {m_tr / m_hf:.3f}, to bridge_forward {m_tr / m_br:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
