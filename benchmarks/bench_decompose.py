"""Benchmark: what an exact logit decomposition adds to the forward passes, and full-vocabulary memory.

    python benchmarks/bench_decompose.py        # 6 layers, d_model 384, GPT-2's 50257-token vocabulary (~1-2 min on 2 cores)
    python benchmarks/bench_decompose.py --layers 12 --d-model 768 --heads 12   # GPT-2-small shape (~5 min on 2 busy cores)

1. ``n`` prompts of ``tokens`` random tokens, one target token per prompt, batches of ``batch``:
   plain ``model.run`` over the batches vs ``streamlens.decompose`` (unit="layer", last position) over
   the same batches, timed in the same process, interleaved ``repeats`` times (best of each).
2. Full-vocabulary decomposition of one position (target="vocab", chunked): peak resident memory
   (``resource.getrusage``) above the peak reached before it, next to the size of the result itself.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time

import torch


def _peak_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--chunk", type=int, default=4096, help="vocabulary rows per step for target='vocab'")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    import transformers as T

    import streamlens as sl
    from streamlens.stream.inputs import encode
    from streamlens.testing import tiny_tokenizer

    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=a.vocab, n_positions=max(64, a.tokens), n_embd=a.d_model, n_layer=a.layers,
                       n_head=a.heads, n_inner=4 * a.d_model)
    tmp = tempfile.mkdtemp()  # the bridge re-reads the tokenizer (and config) from the tokenizer's folder
    tiny_tokenizer().save_pretrained(tmp)
    cfg.save_pretrained(tmp)
    model = sl.load(T.GPT2LMHeadModel(cfg).eval(), T.AutoTokenizer.from_pretrained(tmp))
    n_params = sum(p.numel() for p in model.hf.parameters())
    ids = torch.randint(0, a.vocab, (a.prompts, a.tokens))
    targets = torch.randint(0, a.vocab, (a.prompts,)).tolist()
    print(f"model: GPT-2 shape, {a.layers} layers, d_model {a.d_model}, vocab {a.vocab}, {n_params / 1e6:.1f}M params; "
          f"{a.prompts} prompts x {a.tokens} tokens, batch {a.batch}, {torch.get_num_threads()} threads")

    def plain() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, a.prompts, a.batch):
                b = encode(model, ids[i : i + a.batch])
                model.run(b.input_ids, b.mask)
        return time.perf_counter() - t0

    def dec() -> tuple[float, object]:
        t0 = time.perf_counter()
        d = sl.decompose(model, ids, targets, batch_size=a.batch, progress=False)
        return time.perf_counter() - t0, d

    plain()  # warm-up (allocator, first-call overheads)
    t_plain, t_dec, d = [], [], None
    for _ in range(a.repeats):
        t_plain.append(plain())
        t, d = dec()
        t_dec.append(t)
    bp, bd = min(t_plain), min(t_dec)
    print(f"\n{'':34s}{'seconds':>10s}{'ratio':>8s}")
    print(f"{'plain model.run':34s}{bp:10.2f}{1.0:8.3f}")
    print(f"{'decompose (layer, 1 target)':34s}{bd:10.2f}{bd / bp:8.3f}")
    print(f"overhead: {100 * (bd / bp - 1):+.1f}% (target: <= +10%); check() = {d.check():.1e}; "
          f"all timings plain {['%.2f' % t for t in t_plain]}, decompose {['%.2f' % t for t in t_dec]}")

    before = _peak_mib()
    t0 = time.perf_counter()
    full = sl.decompose(model, ids[:1], "vocab", chunk_size=a.chunk, progress=False)
    t_full = time.perf_counter() - t0
    after = _peak_mib()
    result_mib = (full.values.numel() + full.ablated_renormed.numel()) * 4 / 2**20
    weights_mib = n_params * 4 / 2**20
    print(f"\nfull vocabulary, one position: {len(full.labels)} components x {a.vocab} tokens in {t_full:.2f} s, "
          f"check() = {full.check():.1e}")
    print(f"peak RSS {before:.0f} MiB before -> {after:.0f} MiB after (+{after - before:.0f} MiB); "
          f"result tensors {result_mib:.0f} MiB; model weights {weights_mib:.0f} MiB; chunk {a.chunk} rows")


if __name__ == "__main__":
    main()
