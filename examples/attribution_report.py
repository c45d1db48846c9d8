"""Per-layer attribution report for a set of prompts: which layers and heads write each prediction.

    python examples/attribution_report.py --model smollm2-135m --out attribution/
    python examples/attribution_report.py --model ./my-model --prompt "The capital of France is" --target " Paris"

For every prompt the next-token logit (the model's own top-1 token, or --target) is split exactly
into one contribution per writer (embedding, each attention head, each MLP, the bias); the report
shows the mean contribution per layer over the prompts with a 95% interval, and the top heads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import streamlens as sl
from streamlens.present import figures, tables
from streamlens.present.html import HtmlReport

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "One, two, three,", "The cat sat on the"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt", action="append", help="repeat for several (default: four built-in prompts)")
    ap.add_argument("--target", default="top:1", help="a single token, or top:1 for the model's own prediction")
    ap.add_argument("--out", default="attribution", help="output folder")
    args = ap.parse_args(argv)

    model = sl.load(args.model)
    prompts = args.prompt or PROMPTS
    dec = sl.decompose(model, prompts, args.target, unit="head", progress=False)
    df = dec.to_dataframe()
    # per layer: attention (its heads and output bias summed) and MLP, per prompt, then mean ± interval
    df["block_part"] = df["kind"].replace({"head": "attn", "attn_bias": "attn"})
    per_prompt = df.groupby(["prompt", "block_part", "layer"], dropna=False)["value"].sum().reset_index()
    per_layer = tables.mean_interval(per_prompt, ["block_part", "layer"])
    heads = tables.mean_interval(df[df["kind"] == "head"], ["component", "layer", "head"])
    top_heads = heads.reindex(heads["mean"].abs().sort_values(ascending=False).index).head(10)

    out = Path(args.out)
    rep = HtmlReport(f"Attribution report: {model.name}", subtitle=f"{len(prompts)} prompts, target {args.target}")
    rep.facts("Model", model.arch.to_dict())
    rep.section("Exactness")
    rep.check("sum of contributions = the model's logit", dec.check(), 1e-4)
    bars = per_layer[per_layer["layer"].notna()].assign(half=lambda d: d["hi"] - d["mean"])
    rep.figure("Mean contribution per layer (±95% interval over prompts)",
               figures.layer_bars(bars, x="layer", y="mean", error="half", color="block_part", y_title="logit contribution"))
    rep.table("Heads with the largest mean contribution", top_heads)
    rep.table("Per prompt", df.drop_duplicates("prompt")[["prompt", "target", "model_value"]].assign(
        text=[repr(p) for p in prompts]))
    tables.write_csv(per_layer, out / "per_layer.csv")
    tables.write_csv(df.drop(columns="block_part"), out / "components.csv")
    path = rep.write(out / "attribution.html")
    print(tables.text_table(per_layer))
    print(f"check {dec.check():.1e}; report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
