"""Which architectures streamlens handles: a tiny random model of each, checked with the public API.

For every decoder-only *text* architecture that the installed TransformerLens bridges (its
``SUPPORTED_ARCHITECTURES`` registry) and that the installed transformers can build from a config,
:func:`check_architecture` builds a tiny random-weight model through the config constructor (a few
layers, ``d_model`` 32, the 512-token test vocabulary; the size is asserted), saves it with the tiny
tokenizer and checks, using only streamlens' public verbs:

* ``sl.load(folder)`` (the architecture probe);
* ``sl.trace(...).closure_error()``: the stream is the sum of its writes;
* the traced logits against a fresh HuggingFace copy of the model loaded from the same folder;
* ``sl.decompose(...).check()``: the logit decomposition adds up to the model's own logits;
* block skip in the layer-skip evaluator against plain PyTorch forward hooks on the HuggingFace
  model's decoder layers (``out = in``), compared through the KL divergence and top-1 agreement;
* mixture-of-experts models: the per-expert decomposition, and one expert removed against a plain
  pre-hook that zeroes its routing weights in the HuggingFace model.

The tiny models come from :func:`streamlens.testing.build_bridged`.

Each architecture ends as a :class:`CoverageRow`: ``pass``, ``refused`` (a streamlens error with its
reason), ``crash`` (any other exception: a bug), ``mismatch`` (it ran but a number is off) or
``build`` (the tiny model could not be built here: not streamlens' fault). ``scripts/arch_coverage.py``
runs them all and writes ``docs/architectures.md``; ``tests/test_architectures.py`` runs them in the suite.

    >>> from streamlens.coverage import architectures, check_architecture
    >>> row = check_architecture("LlamaForCausalLM", "coverage")
    >>> row.result, row.layout
    ('pass', 'pre')
"""

from __future__ import annotations

import contextlib
import signal
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from streamlens.testing import BRIDGED_MAX_PARAMS as MAX_PARAMS
from streamlens.testing import bridged_architectures as architectures
from streamlens.testing import build_bridged as build

# Tolerances of each check (float32, tiny random models). Measured values are far below them.
CLOSURE_TOL = 1e-5  # relative, per position
LOGITS_TOL = 1e-4  # relative, per position: traced logits vs a fresh HF copy
DECOMPOSE_TOL = 1e-5  # dec.check()
SKIP_KL_TOL = 1e-5  # |KL_streamlens - KL_hooks| <= tol * (1 + KL)


@dataclass
class CoverageRow:
    """One architecture's outcome. ``result`` is pass / refused / crash / mismatch / build."""

    architecture: str
    result: str
    reason: str = ""
    layout: str = ""
    writers: str = ""
    norm: str = ""
    readout: str = ""
    skip_path: str = ""
    params: int = 0
    seconds: float = 0.0
    numbers: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------- the checks
def _decoder_layers(hf) -> torch.nn.ModuleList:
    """The HF model's list of decoder layers: the longest ModuleList whose length is the number of layers."""
    n = hf.config.num_hidden_layers
    lists = [(name, m) for name, m in hf.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if not lists:
        raise RuntimeError(f"no ModuleList of {n} layers in {type(hf).__name__}")
    return min(lists, key=lambda nm: nm[0].count("."))[1]


def _hand_removal(folder: Path, architecture: str, ids: torch.Tensor, attach) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and ablated logits of a fresh HF model; ``attach(hf)`` registers the plain PyTorch hook and returns its handle."""
    import transformers

    hf = getattr(transformers, architecture).from_pretrained(folder).eval()
    with torch.no_grad():
        clean = hf(ids, use_cache=False).logits
        h = attach(hf)
        try:
            ablated = hf(ids, use_cache=False).logits
        finally:
            h.remove()
    return clean.float(), ablated.float()


def _hand_skip(folder: Path, architecture: str, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block ``layer`` replaced by its input with a forward hook on the HF decoder layer."""

    def hook(module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        return (x, *out[1:]) if isinstance(out, tuple) else x

    return _hand_removal(folder, architecture, ids,
                         lambda hf: _decoder_layers(hf)[layer].register_forward_hook(hook, with_kwargs=True))


def _hand_drop_expert(folder: Path, architecture: str, ids: torch.Tensor, layer: int, expert: int, cls: type,
                      stacked: bool = False):
    """Expert ``expert`` of block ``layer`` removed by zeroing its routing weights in a pre-hook on the HF experts module
    (``stacked``, Llama 4: by zeroing its block of the experts' stacked output in a forward hook)."""

    def pre(module, args, kwargs):
        hidden, idx, w = args[:3]
        return (hidden, idx, w * (idx != expert), *args[3:]), kwargs

    def post(module, args, out):
        out = out.clone()
        out.view(module.num_experts, -1, out.shape[-1])[expert] = 0
        return out

    def attach(hf):
        ex = next(m for m in _decoder_layers(hf)[layer].modules() if type(m) is cls)
        return ex.register_forward_hook(post) if stacked else ex.register_forward_pre_hook(pre, with_kwargs=True)

    return _hand_removal(folder, architecture, ids, attach)


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp, lq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def _describe(model) -> dict[str, str]:
    a = model.arch
    per_block = getattr(a, "writers", None) or (("attn", "mlp"),)
    writers = " / ".join(dict.fromkeys("+".join(w for w in ws if w != "-") for ws in per_block))
    readout = getattr(a, "readout", None)
    if getattr(a, "readout_problem", ""):
        readout = "other (refused)"
    if readout is None:
        readout = "unembed" if a.logits_are_unembed else "not unembed(ln_final(x))"
    rule = a.rule
    layout = a.layout + (f" ({rule.adjustments})" if getattr(rule, "adjustments", "") else "")
    if getattr(a, "stream_scales", ()):
        layout += f" (stream scaled by {', '.join(f'{s:g}' for s in a.stream_scales)})"
    norm = str(a.norm) + (f", final {a.final_norm}" if a.final_norm and a.final_norm != a.norm else "")
    return dict(layout=layout, writers=writers, norm=norm, readout=str(readout))


def _checks(architecture: str, folder: Path, row: CoverageRow) -> None:
    import transformers

    import streamlens as sl

    row.reason = "load: "
    model = sl.load(str(folder))
    row.__dict__.update(_describe(model))
    row.reason = "trace: "
    prompts = ["The cat sat on the mat because it was", "def f(x): return x"]
    tr = sl.trace(model, prompts)
    row.numbers["closure"] = tr.closure_error()

    hf = getattr(transformers, architecture).from_pretrained(folder).eval()
    with torch.no_grad():
        want = hf(input_ids=tr.input_ids, attention_mask=tr.mask.long(), use_cache=False).logits.float()
    got = tr["logits"].float()
    m = tr.mask
    rel = (got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-12)
    row.numbers["logits"] = float(rel[m].max())

    row.reason = "decompose: "
    dec = sl.decompose(model, prompts, "top:3", progress=False)
    row.numbers["decompose"] = dec.check()
    if any(k == "head_out" for k, _ in tr.acts) or _has_heads(model):
        row.reason = "decompose heads: "
        row.numbers["decompose"] = max(row.numbers["decompose"],
                                       sl.decompose(model, prompts, "top:3", unit="head", progress=False).check())

    row.reason = "skip: "
    ids = torch.randint(1, model.arch.d_vocab, (3, 12), generator=torch.Generator().manual_seed(1))
    ev = sl.LayerSkipEvaluator(model, ids, batch_size=3, n_boot=10, progress=False)
    row.skip_path = ev.path
    worst = 0.0
    for layer in sorted({0, model.arch.n_layers - 1}):
        clean, abl = _hand_skip(folder, architecture, ids, layer)
        kl = _kl(clean, abl)
        top1 = float((clean.argmax(-1) == abl.argmax(-1)).float().mean())
        r = ev.evaluate(f"block.{layer}", "skip", metrics=("kl", "top1"))
        worst = max(worst, abs(r["kl"] - kl) / (1 + kl))
        row.numbers[f"skip_top1_gap.{layer}"] = abs(r["top1"] - top1)
        row.numbers[f"skip_kl.{layer}"] = kl
    row.numbers["skip"] = worst
    _check_experts(architecture, folder, model, prompts, ids, ev, row)

    bad = []
    if not row.numbers["closure"] <= CLOSURE_TOL:
        bad.append(f"closure {row.numbers['closure']:.1e}")
    if not row.numbers["logits"] <= LOGITS_TOL:
        bad.append(f"traced logits {row.numbers['logits']:.1e} from HF's")
    if not row.numbers["decompose"] <= DECOMPOSE_TOL:
        bad.append(f"decomposition {row.numbers['decompose']:.1e}")
    if not worst <= SKIP_KL_TOL:
        bad.append(f"block-skip KL {worst:.1e} from hand-built hooks")
    if not row.numbers.get("expert_skip", 0.0) <= SKIP_KL_TOL:
        bad.append(f"expert removal KL {row.numbers['expert_skip']:.1e} from hand-built hooks")
    if any(v > 1e-6 for k, v in row.numbers.items() if k.startswith("skip_top1_gap")):
        bad.append("block-skip top-1 differs from hand-built hooks")
    row.result, row.reason = ("mismatch", "; ".join(bad)) if bad else ("pass", "")
    row.readout = str(getattr(model.arch, "readout", row.readout))


def _check_experts(architecture: str, folder: Path, model, prompts, ids, ev, row: CoverageRow) -> None:
    """MoE models: the per-expert decomposition adds up, and removing an expert equals zeroing it by hand."""
    from streamlens.errors import UnsupportedModelError
    from streamlens.model.experts import call_style, experts_module, moe_layers, n_experts

    import streamlens as sl

    layers = moe_layers(model)
    if not layers:
        return
    row.writers += f" (MoE: {n_experts(model, layers[-1])} experts)"
    row.reason = "experts: "
    layer, expert = layers[-1], 1
    ex = experts_module(model, layer)
    clean, abl = _hand_drop_expert(folder, architecture, ids, layer, expert, type(ex), call_style(ex) == "stacked")
    kl = _kl(clean, abl)
    r = ev.evaluate(f"expert.{layer}.{expert}", "skip", metrics=("kl",))
    row.numbers["expert_skip"] = abs(r["kl"] - kl) / (1 + kl)
    try:
        dec = sl.decompose(model, prompts, "top:3", unit="expert", progress=False)
        row.numbers["decompose"] = max(row.numbers["decompose"], dec.check())
    except UnsupportedModelError:  # a normalised MoE write (sandwich): no exact per-expert split
        row.writers += " (no per-expert split: the MoE write is normalised)"


def _has_heads(model) -> bool:
    bridge = model.bridge
    return any(getattr(getattr(b, "attn", None), "o", None) is not None for b in bridge.blocks)


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise _Timeout(f"took longer than {seconds:g} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def check_architecture(architecture: str, root: str | Path, *, time_limit: float | None = 60.0) -> CoverageRow:
    """Build a tiny ``architecture`` model under ``root`` and run every check; never raises (the row says what happened)."""
    from streamlens.errors import StreamlensError

    row = CoverageRow(architecture, "crash")
    t0 = time.perf_counter()
    folder = Path(root) / architecture
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with _time_limit(time_limit):
                try:
                    folder, row.params = build(architecture, folder)
                except Exception as e:  # the tiny model cannot be built here: not streamlens' fault
                    row.result, row.reason = "build", _one_line(e)
                    return row
                _checks(architecture, folder, row)
        except StreamlensError as e:  # includes UnsupportedModelError: a refusal with a reason
            row.result, row.reason = "refused", row.reason + _one_line(e)
        except _Timeout as e:
            row.result, row.reason = "crash", f"timeout: {e}"
        except Exception as e:
            tb = traceback.extract_tb(e.__traceback__)
            where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb) if "streamlens" in f.filename), "")
            row.result, row.reason = "crash", row.reason + _one_line(e) + (f" (at {where})" if where else "")
        finally:
            row.seconds = round(time.perf_counter() - t0, 2)
            row.reason = row.reason.replace(str(folder), architecture)  # no temporary paths in the table
    return row


# ---------------------------------------------------------------------------- the table
def markdown_table(rows: list[CoverageRow], *, header: str = "") -> str:
    """The generated ``docs/architectures.md``: a summary line and one row per architecture."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.result] = counts.get(r.result, 0) + 1
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    lines = [
        "# Architectures",
        "",
        "<!-- generated by scripts/arch_coverage.py: do not edit by hand -->",
        "",
        header or "A tiny random-weight model of every decoder-only text architecture that the installed "
                  "TransformerLens bridges and the installed transformers can build, checked with streamlens' "
                  "public API (load, closure, traced logits against HuggingFace's forward, exact decomposition, "
                  "block skip against plain forward hooks). See `streamlens/coverage.py`.",
        "",
        f"**{counts.get('pass', 0)} of {len(rows)} pass** ({summary}).",
        "",
        "| architecture | result | layout | writers | norm | readout | closure | decompose | skip | reason |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    fmt = lambda r, k: f"{r.numbers[k]:.0e}" if k in r.numbers else ""  # noqa: E731
    for r in rows:
        reason = r.reason.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r.architecture} | {r.result} | {r.layout} | {r.writers} | {r.norm} | {r.readout} | "
                     f"{fmt(r, 'closure')} | {fmt(r, 'decompose')} | {fmt(r, 'skip')} | {reason} |")
    return "\n".join(lines) + "\n"
