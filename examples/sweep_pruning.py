"""Layer-removal sweep over a text file, and a greedy pruning curve.

    python examples/sweep_pruning.py --model smollm2-135m --data texts.txt --prune 6 --out pruning/

First every block is removed alone (KL to the full model, Δ cross-entropy, top-1 agreement, each with
a 95% bootstrap interval over documents); then blocks are removed greedily, each step the one whose
removal hurts least, giving the pruning curve: damage against the number of blocks removed.
Without --data, a few passages of Python's documentation are used.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import streamlens as sl
from streamlens.present import figures, tables
from streamlens.present.html import HtmlReport
from streamlens.report.demo import demo_corpus


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", help=".txt (one document per line) or .jsonl; default: 8 built-in passages")
    ap.add_argument("--unit", default="block", choices=("block", "attn", "mlp"))
    ap.add_argument("--prune", type=int, default=4, help="how many units to remove greedily")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default="pruning")
    args = ap.parse_args(argv)

    model = sl.load(args.model)
    texts = sl.load_texts(args.data) if args.data else demo_corpus(8)
    ev = sl.LayerSkipEvaluator(model, texts, max_tokens=args.max_tokens, progress=False)
    single = ev.sweep(args.unit).to_dataframe()
    curve = ev.prune(min(args.prune, len(single)), unit=args.unit).to_dataframe()

    out = Path(args.out)
    tables.write_csv(single, out / "single.csv")
    tables.write_csv(curve, out / "pruning_curve.csv")
    rep = HtmlReport(f"Layer removal: {model.name}", subtitle=f"{len(texts)} documents × ≤{args.max_tokens} tokens")
    rep.figure(f"Each {args.unit} removed alone", figures.interval_chart(single, x="layer", y="kl", lo="kl_lo", hi="kl_hi",
                                                                    y_title="KL(full ‖ removed), nats"))
    rep.figure("Greedy pruning curve", figures.interval_chart(curve, x="step", y="kl", lo="kl_lo", hi="kl_hi",
                                                         y_title="KL(full ‖ pruned), nats"))
    rep.table("Pruning steps", curve)
    path = rep.write(out / "pruning.html")
    print(tables.text_table(curve[["step", "removed", "kl", "delta_ce", "top1"]]))
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
