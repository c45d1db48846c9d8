"""Is each layer a "small refinement" of the residual stream? Relative update size per layer, measured.

    python examples/small_refinements.py --model smollm2-135m --threshold 0.5

For every layer, over a corpus: ‖attn_out‖/‖attn_read‖, ‖mlp_out‖/‖mlp_read‖ and the whole block's
‖resid_post − resid_pre‖/‖resid_pre‖, plus cos(resid_pre, resid_post). The claim "each layer makes a
small refinement" is read as: the block's relative update stays below --threshold. The script prints
which layers satisfy it and which do not (typically the first and last layers), and writes the table.
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
    ap.add_argument("--data", help=".txt or .jsonl; default: 8 built-in passages")
    ap.add_argument("--threshold", type=float, default=0.5, help="a 'small' relative update is below this")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default="refinements.csv")
    args = ap.parse_args(argv)

    model = sl.load(args.model)
    texts = sl.load_texts(args.data) if args.data else demo_corpus(8)
    df = sl.trace_stats(model, texts, max_tokens=args.max_tokens, progress=False).to_dataframe()
    df["small"] = df["block_rel_update"] < args.threshold
    cols = ["layer", "attn_rel_update", "mlp_rel_update", "block_rel_update", "cos_pre_post", "small"]
    print(tables.text_table(df[cols], max_rows=100))
    big = df.loc[~df["small"], "layer"].tolist()
    print(f"{int(df['small'].sum())}/{len(df)} layers update the stream by less than {args.threshold:g} of its norm "
          f"(median {df['block_rel_update'].median():.3g}); larger updates at layers {big or 'none'}")
    print(f"wrote {tables.write_csv(df, Path(args.out))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
