"""The ``streamlens`` command: a thin argparse layer over the library.

Every subcommand calls a library function that is also callable from Python. Exit codes: 0 success,
2 usage error (argparse's), 1 a runtime error printed as one line (``--debug`` for the traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from streamlens.errors import StreamlensError

Handler = Callable[[argparse.Namespace], int]
_HANDLERS: dict[str, Handler] = {}


def _common(p: argparse.ArgumentParser, *, max_tokens: int = 256) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="truncate each document to this many tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction, default=None,
                   help="put the tokenizer's BOS token in front of each text (default: when the tokenizer has one, "
                        "TransformerLens' convention; --no-prepend-bos tokenizes as plain HuggingFace does)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def _seed(args) -> None:
    import torch

    torch.manual_seed(args.seed)


def _load(args):
    import transformers

    from streamlens.model.loading import load

    _seed(args)
    transformers.utils.logging.disable_progress_bar()  # the weight-loading bar is noise around our own output
    return load(args.model, device=args.device, dtype=args.dtype)


def _cmd_trace(args: argparse.Namespace) -> int:
    from streamlens.present.tables import text_table
    from streamlens.stream.trace import trace

    model = _load(args)
    prompts = args.prompt or ["The residual stream is the sum of every layer's write."]
    tr = trace(model, prompts, prepend_bos=args.prepend_bos)
    df = tr.to_dataframe()
    print(model)
    print(text_table(df, max_rows=max(40, len(df))))
    print(f"closure error: {tr.closure_error():.2e}; start token prepended: {tr.prepend_bos}")
    if args.out:
        print(f"wrote {tr.save(args.out)}")
    return 0


def _texts(args) -> list[str]:
    from pathlib import Path

    from streamlens.stream.inputs import load_texts

    if not args.data.strip():
        raise StreamlensError("--data is empty: give a .txt (one document per line) or .jsonl file")
    texts = load_texts(Path(args.data))  # --data always names a file, whatever its name ends in
    if not texts:
        raise StreamlensError(f"data file {args.data!r} has no texts")
    return list(texts)


def _emit(df, fmt: str, out: str | None, payload=None) -> None:
    """Print ``df`` as a table, CSV or JSON (``payload`` replaces the rows for JSON) and write ``out``."""
    from streamlens.present import tables

    if fmt == "json":
        import json

        print(json.dumps(tables.jsonable(payload if payload is not None else df), indent=2))
    elif fmt == "csv":
        print(df.to_csv(index=False), end="")
    else:
        print(tables.text_table(df))
    if out:
        path = tables.write_json(payload if payload is not None else df, out) if out.endswith(".json") else tables.write_csv(df, out)
        print(f"wrote {path}", file=sys.stderr)


def _cmd_attribute(args: argparse.Namespace) -> int:
    from streamlens.readout.decompose import decompose
    from streamlens.report import attribution
    from streamlens.stream.inputs import encode

    for flag in ("target", "contrast"):
        if getattr(args, flag) is not None and not getattr(args, flag):
            raise StreamlensError(f"--{flag} is empty: give one token, e.g. ' Paris'")
    model = _load(args)
    dec = decompose(model, [args.prompt], args.target, contrast=args.contrast, unit=args.unit,
                    positions=args.position, progress=False, prepend_bos=args.prepend_bos)
    tokens = encode(model, args.prompt, prepend_bos=args.prepend_bos).str_tokens[0]
    payload = {**attribution.attribution_payload(dec, model=model.name, tokens=tokens), "prepend_bos": dec.prepend_bos}
    import pandas as pd

    table = pd.DataFrame(payload["components"] + [{"name": "bias", "kind": "bias", "value": payload["bias"]}])
    _emit(table, args.format, args.out, payload)
    if args.format == "table":
        print(f"logit {payload['logit']:.4f} = components {table['value'].sum() - payload['bias']:.4f} "
              f"+ bias {payload['bias']:.4f} (check {payload['check']:.1e})")
    if args.html:
        path = attribution.attribution_report(payload, args.html, arch={"model": model.name, **model.arch.to_dict()})
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _cmd_lens(args: argparse.Namespace) -> int:
    from streamlens.present.tables import lens_table
    from streamlens.readout.lens import logit_lens

    model = _load(args)
    positions = None if args.all_positions else [args.position]
    lens = logit_lens(model, args.prompt, target=args.target, positions=positions, k=args.top_k, batch_size=args.batch_size,
                      progress=False, prepend_bos=args.prepend_bos)
    _emit(lens_table(lens, points=args.points), args.format, args.out)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from streamlens.present.tables import text_table
    from streamlens.skip.distributed import init_from_env
    from streamlens.skip.evaluator import LayerSkipEvaluator

    texts = _texts(args)  # a bad data file fails before the model loads
    rank = init_from_env(args)  # under torchrun: join the process group (sets args.device per rank on GPUs)
    model = _load(args)
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    ev = LayerSkipEvaluator(model, texts, batch_size=args.batch_size, max_tokens=args.max_tokens, progress=rank == 0,
                            variants_per_pass=args.variants_per_pass, memory_budget=args.memory_budget,
                            prepend_bos=args.prepend_bos)
    kw = dict(mode=args.mode, metrics=metrics, width=args.width)
    if args.prune is not None:  # a greedy pruning curve instead of a sweep
        if args.shard or args.screen is not None or args.unit not in ("block", "attn", "mlp", "head"):
            raise StreamlensError("--prune removes single units (--unit block/attn/mlp/head) and takes no --shard "
                                  "or --screen (under torchrun the ranks share each step's documents)")
        res = ev.prune(args.prune, unit=args.unit, mode=args.mode, by=args.by, metrics=metrics, out=args.out,
                       resume=args.resume)
    elif args.shard:
        if not args.out:
            raise StreamlensError("--shard needs --out: the file this job writes its document sums to")
        path = ev.sweep_shard(args.unit, shard=args.shard, out=args.out, **kw)
        print(f"wrote {path} (shard {args.shard}); join the shards with: streamlens merge FILES --out TABLE",
              file=sys.stderr)
        return 0
    else:
        res = ev.sweep(args.unit, out=args.out, resume=args.resume, screen=args.screen, **kw)
    if rank == 0:
        print(text_table(res.to_dataframe()))
        if args.out:
            print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from streamlens.present.tables import text_table
    from streamlens.skip.shards import merge_shards

    res = merge_shards(args.files, out=args.out)
    print(text_table(res.to_dataframe()))
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from streamlens.report.build import build_report

    texts = _texts(args)
    model = _load(args)
    res = build_report(model, texts, args.out, prompts=args.prompt, unit=args.unit, batch_size=args.batch_size,
                       max_tokens=args.max_tokens, prepend_bos=args.prepend_bos, force=args.force)
    _print_summary(res)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from streamlens.report.demo import run_demo

    _seed(args)
    res = run_demo(args.model, args.out, n_docs=args.n_docs, max_tokens=args.max_tokens, n_prompts=args.n_prompts,
                   unit=args.unit, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                   prepend_bos=args.prepend_bos, force=args.force)
    _print_summary(res)
    return 0


def _print_summary(res) -> None:
    from streamlens.present.tables import text_table

    print(text_table(res.summary))
    for title, why in res.missing.items():
        print(f"not computed: {title} ({why})")
    print(f"{len(res.files)} files written in {res.out_dir.resolve()} ({res.wall_s:.1f} s)")
    print(f"report: {res.report}")


def _cmd_dynamics(args: argparse.Namespace) -> int:
    from streamlens.depth.claims import dynamics

    texts = _texts(args)
    model = _load(args)
    res = dynamics(model, texts, batch_size=args.batch_size, max_tokens=args.max_tokens, compare_init=args.compare_init,
                   drop_residual=args.drop_residual, init_seed=args.seed, prepend_bos=args.prepend_bos, progress=False)
    payload = {**res.metadata(), **({} if res.prepend_bos is None else {"prepend_bos": res.prepend_bos}),
               res.rows_key: res.to_dataframe()}
    if args.out and not args.out.endswith((".json", ".csv")):
        raise StreamlensError(f"--out {args.out!r}: use a .json (table, claims and settings) or .csv (table) file")
    _emit(res.to_dataframe(), args.format, None, payload)
    if args.format == "table":
        from streamlens.present.tables import text_table

        claims = res.claims()
        print("\nclaims:")
        print(text_table(claims.drop(columns=["measured"])))
    if args.out:
        print(f"wrote {res.save(args.out)}", file=sys.stderr)
    return 0


def _layers(text: str) -> list[int]:
    """``--drop-residual 1,2``: comma-separated layer indices."""
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices such as 1,2; got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("give at least one layer, e.g. 1 or 1,2")
    return out


_MODEL_HELP = "a save_pretrained folder, a hub name, or a short name (smollm2-135m)"


def _sub(sub, name: str, help: str, example: str, handler: Handler, *, model: bool = True) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    if model:
        p.add_argument("model", help=_MODEL_HELP)
    _HANDLERS[name] = handler
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamlens", description="Residual-stream interpretability for transformer LMs.",
                                     epilog="example:\n  streamlens demo", formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = _sub(sub, "trace", "per-layer summary of the residual stream on some prompts",
             'streamlens trace smollm2-135m --prompt "The capital of France is"', _cmd_trace)
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    p.add_argument("--out", help="write the summary (.csv or .json)")
    _common(p)

    p = _sub(sub, "attribute", "exact split of one prediction's logit into per-layer/head/neuron contributions",
             'streamlens attribute smollm2-135m --prompt "The capital of France is" --target " Paris" --format json',
             _cmd_attribute)
    p.add_argument("--prompt", required=True, help="the prompt")
    p.add_argument("--target", required=True, help="the target token (a single token, e.g. ' Paris')")
    p.add_argument("--contrast", help="a second token: attribute the logit difference target - contrast")
    p.add_argument("--unit", choices=("layer", "head", "neuron"), default="layer")
    p.add_argument("--position", type=int, default=-1, help="position to attribute (default -1, the last token)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--out", help="also write the components (.csv) or the JSON (.json)")
    p.add_argument("--html", help="write an HTML report with the attribution bars")
    _common(p)

    p = _sub(sub, "lens", "logit lens: the top tokens read out of the stream after every layer",
             'streamlens lens smollm2-135m --prompt "The capital of France is"', _cmd_lens)
    p.add_argument("--prompt", required=True)
    p.add_argument("--target", help="a token: also report its rank and probability after every layer")
    p.add_argument("--position", type=int, default=-1, help="position to read (default -1, the last token)")
    p.add_argument("--all-positions", action="store_true", help="read every position")
    p.add_argument("--points", choices=("resid_post", "resid_mid", "resid_pre", "all"), default="resid_post")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--out", help="write the table (.csv or .json)")
    _common(p)

    p = _sub(sub, "sweep", "remove blocks/sub-layers/heads one at a time and measure the damage",
             "streamlens sweep smollm2-135m --data texts.txt --unit block --out sweep.jsonl --resume", _cmd_sweep)
    p.add_argument("--data", required=True, help="texts: .txt (one per line) or .jsonl (a 'text' field)")
    p.add_argument("--unit", choices=("block", "attn", "mlp", "head", "expert", "span"), default="block")
    p.add_argument("--width", type=int, default=None, help="span width: consecutive blocks removed together")
    p.add_argument("--mode", choices=("skip", "mean", "drop-residual"), default="skip")
    p.add_argument("--metrics", default="kl,ce,top1", help="comma-separated (default kl,ce,top1)")
    p.add_argument("--out", help="write results as they come (.jsonl or .csv)")
    p.add_argument("--resume", action="store_true", help="continue from what --out and its document sums hold")
    p.add_argument("--shard", help="i/n: run job i of n independent jobs (writes document sums to --out, a .jsonl; "
                   "join them with 'streamlens merge'); under torchrun the ranks share the work without it")
    p.add_argument("--prune", type=int, default=None, metavar="N", help="a greedy pruning curve of N steps instead "
                   "of a sweep (each step removes the unit that hurts least by --by); with --out each step is written "
                   "as it finishes and --resume continues after the last")
    p.add_argument("--by", default="kl", help="the metric --prune minimises (default kl)")
    p.add_argument("--screen", type=int, default=None, help="estimate every unit (attribution patching) and compute "
                   "exact numbers only for the K with the largest estimated effect")
    p.add_argument("--variants-per-pass", type=int, default=None, help="removals stacked into one forward pass")
    p.add_argument("--memory-budget", default=None, help="bytes the stacked removals may use, e.g. 2GB "
                   "(default: 1 per pass on a CPU, 1GB on a GPU)")
    _common(p)

    p = _sub(sub, "merge", "join the document sums of shard jobs (sweep --shard i/n) into the sweep's table",
             "streamlens merge part0.jsonl part1.jsonl --out sweep.csv", _cmd_merge, model=False)
    p.add_argument("files", nargs="+", help="the shard files, one per job")
    p.add_argument("--out", help="also write the table (.csv or .jsonl)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")

    p = _sub(sub, "report", "per-layer attribution report over a data set (HTML + CSV)",
             "streamlens report smollm2-135m --data texts.txt --out report.html", _cmd_report)
    p.add_argument("--data", required=True, help="texts: .txt (one per line) or .jsonl (a 'text' field)")
    p.add_argument("--out", default="streamlens-report",
                   help="output folder of its own (default streamlens-report/), or an .html path whose folder holds the rest")
    p.add_argument("--force", action="store_true", help="overwrite files that an earlier run left in the folder")
    p.add_argument("--prompt", action="append", help="prompts to decompose (default: openings of the texts)")
    p.add_argument("--unit", choices=("block", "attn", "mlp"), default="block", help="what the skip sweep removes")
    _common(p, max_tokens=64)

    p = _sub(sub, "demo", "the whole pipeline on SmolLM2 and a built-in English corpus, as an HTML report",
             "streamlens demo --out streamlens-demo", _cmd_demo, model=False)
    p.add_argument("--model", default="smollm2-135m", help=_MODEL_HELP)
    p.add_argument("--out", default="streamlens-demo", help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite files that an earlier run left in the folder")
    p.add_argument("--n-docs", type=int, default=8, help="passages of the built-in corpus")
    p.add_argument("--n-prompts", type=int, default=4, help="prompts whose predictions are decomposed")
    p.add_argument("--unit", choices=("block", "attn", "mlp"), default="block", help="what the skip sweep removes")
    _common(p, max_tokens=64)

    p = _sub(sub, "dynamics", "how the residual stream changes through depth over a data set",
             "streamlens dynamics smollm2-135m --data texts.txt --out dynamics.csv", _cmd_dynamics)
    p.add_argument("--data", required=True, help="texts: .txt (one per line) or .jsonl (a 'text' field)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--out", help="write the table (.csv) or the table with its claims and settings (.json)")
    p.add_argument("--compare-init", action="store_true", help="add a fresh seeded initialisation of the architecture")
    p.add_argument("--drop-residual", type=_layers, default=None, metavar="LAYERS",
                   help="also measure the model without skip connections at these layers (e.g. 1,2)")
    _common(p)
    return parser


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())  # one line, whatever the message held
    return text[:500] + (" ..." if len(text) > 500 else "")


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure ends in one line on stderr and exit code 1 (``--debug``: the traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _HANDLERS[args.command](args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"streamlens {args.command}: interrupted", file=sys.stderr)
        return 130
    except StreamlensError as e:  # the user's input, named in the message
        if args.debug:
            raise
        print(f"streamlens {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - anything else still ends in one line, with the way to see more
        if args.debug:
            raise
        print(f"streamlens {args.command}: error: {type(e).__name__}: {_one_line(e)} (run with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
