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


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=256, help="truncate each document to this many tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def _load(args):
    import torch

    import streamlens as sl

    torch.manual_seed(args.seed)
    return sl.load(args.model, device=args.device, dtype=args.dtype)


def _cmd_trace(args: argparse.Namespace) -> int:
    import streamlens as sl

    model = _load(args)
    prompts = args.prompt or ["The residual stream is the sum of every layer's write."]
    tr = sl.trace(model, prompts)
    df = tr.to_dataframe()
    print(model)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"closure error: {tr.closure_error():.2e}")
    if args.out:
        print(f"wrote {tr.save(args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamlens", description="Residual-stream interpretability for transformer LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("trace", help="per-layer summary of the residual stream on some prompts",
                       epilog='example: streamlens trace smollm2-135m --prompt "The capital of France is"',
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a save_pretrained folder, a hub name, or a short name (smollm2-135m)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    p.add_argument("--out", help="write the summary (.csv or .json)")
    _common(p)
    _HANDLERS["trace"] = _cmd_trace
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _HANDLERS[args.command](args)
    except StreamlensError as e:
        if args.debug:
            raise
        print(f"streamlens {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as e:
        if args.debug:
            raise
        print(f"streamlens {args.command}: error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
