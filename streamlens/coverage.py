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
  model's decoder layers (``out = in``), compared through the KL divergence and top-1 agreement.

Each architecture ends as a :class:`CoverageRow`: ``pass``, ``refused`` (a streamlens error with its
reason), ``crash`` (any other exception: a bug), ``mismatch`` (it ran but a number is off) or
``build`` (the tiny model could not be built here: not streamlens' fault). ``scripts/arch_coverage.py``
runs them all and writes ``docs/architectures.md``; ``tests/test_architectures.py`` runs them in the suite.

    >>> from streamlens.coverage import architectures, check_architecture
    >>> row = check_architecture("LlamaForCausalLM", "/tmp/cov")
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

# Tolerances of each check (float32, tiny random models). Measured values are far below them.
CLOSURE_TOL = 1e-5  # relative, per position
LOGITS_TOL = 1e-4  # relative, per position: traced logits vs a fresh HF copy
DECOMPOSE_TOL = 1e-5  # dec.check()
SKIP_KL_TOL = 1e-5  # |KL_streamlens - KL_hooks| <= tol * (1 + KL)
MAX_PARAMS = 400_000

# Encoder-only and other non-causal-LM classes share the "ForCausalLM" suffix rarely; these are excluded by name.
_NOT_TEXT_DECODERS: set[str] = set()
_EXTRA_DECODERS = ("GPT2LMHeadModel", "OpenAIGPTLMHeadModel")

# Sizes applied to every config that has the attribute (read on a default instance, attribute_map included).
_SIZES: dict[str, Any] = dict(
    vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, intermediate_size=64, max_position_embeddings=128,
    # mixture of experts
    moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4, num_local_experts=4,
    n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
    expert_intermediate_size=16, moe_num_experts=4, num_shared_experts=1, global_moe_intermediate_size=16,
    # multi-head latent attention (DeepSeek)
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    # state-space / convolution / linear-attention mixers
    mamba_d_state=8, mamba_n_heads=4, mamba_d_head=16, mamba_expand=2, mamba_n_groups=1, mamba_d_conv=4,
    state_size=8, ssm_state_size=8, n_groups=1, conv_kernel=4, time_step_rank=4, expand=2, mamba_chunk_size=16,
    linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
    linear_conv_kernel_dim=4, conv_L_cache=3,
    # misc widths that default to full size
    hidden_size_per_layer_input=8, vocab_size_per_layer_input=512, lru_width=32, attention_window_size=16,
    sliding_window=16, block_size=128, n_positions=128, n_ctx=128, ffn_hidden_size=64, n_inner=64, ffn_dim=64,
    word_embed_proj_dim=32, rotary_dim=4, mamba_d_ssm=64, mamba_num_heads=4, mamba_head_dim=16, n_mamba_heads=4,
    moe_shared_expert_intermediate_size=16, shared_intermediate_size=16, o_lora_rank=16, o_groups=2,
    index_n_heads=2, index_head_dim=8, index_topk=4, adapter_rank=4,
)
# Scalars that default to 1 (or to a cap far above a tiny model's logits) are set to values that change the
# numbers, so a check that ignores them fails instead of passing by accident.
_NONTRIVIAL: dict[str, Any] = dict(
    residual_multiplier=0.5, embedding_multiplier=2.0, logits_scaling=2.0, lm_head_multiplier=0.5,
    final_logit_softcapping=1.0, logit_scale=0.5, initializer_range=0.1,
)
# Token ids that must lie inside the tiny vocabulary.
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id")

# Per-architecture settings on top of _SIZES: mostly layer patterns, so that a tiny hybrid model has
# one block of each kind.
_EXTRA: dict[str, dict[str, Any]] = {
    "GPTNeoForCausalLM": dict(attention_types=[[["global", "local"], 1]]),
    "Mamba2ForCausalLM": dict(num_heads=4, head_dim=16),
    "Zamba2ForCausalLM": dict(num_hidden_layers=4, layers_block_type=["mamba", "hybrid", "mamba", "mamba"]),
    "NemotronHForCausalLM": dict(layers_block_type=["mamba", "attention", "mlp", "moe"]),
    "OlmoHybridForCausalLM": dict(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"]),
    "DeepseekV4ForCausalLM": dict(head_dim=16, qk_rope_head_dim=8, num_key_value_heads=1),
    "JambaForCausalLM": dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                             expert_layer_offset=1, use_mamba_kernels=False),
    "BambaForCausalLM": dict(num_hidden_layers=2, attn_layer_indices=[1]),
    "GraniteMoeHybridForCausalLM": dict(num_hidden_layers=2, layer_types=["mamba", "attention"]),
    "Lfm2ForCausalLM": dict(num_hidden_layers=2, layer_types=["conv", "full_attention"]),
    "Lfm2MoeForCausalLM": dict(num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"],
                               num_dense_layers=1),
    "Qwen3NextForCausalLM": dict(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"]),
    "Qwen3_5ForCausalLM": dict(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"]),
    "Qwen3_5MoeForCausalLM": dict(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"]),
    "RecurrentGemmaForCausalLM": dict(num_hidden_layers=2, block_types=["recurrent", "attention"]),
    "DeepseekV2ForCausalLM": dict(first_k_dense_replace=1),
    "DeepseekV3ForCausalLM": dict(first_k_dense_replace=1),
}


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


# ---------------------------------------------------------------------------- which architectures
def architectures() -> list[str]:
    """Decoder-only text architectures the installed TransformerLens bridges and transformers can build.

    Read from TransformerLens' ``SUPPORTED_ARCHITECTURES`` (class names of HuggingFace models); kept: the
    causal LM classes (``*ForCausalLM``, GPT-2's and GPT-1's ``*LMHeadModel``) that the installed
    transformers defines. Multimodal, encoder, encoder-decoder, audio and vision classes are left out.
    """
    import transformers
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    out = [name for name in SUPPORTED_ARCHITECTURES
           if (name.endswith("ForCausalLM") or name in _EXTRA_DECODERS) and name not in _NOT_TEXT_DECODERS
           and hasattr(transformers, name)]
    return sorted(set(out), key=str.lower)


def tiny_config(architecture: str):
    """``(config, model_class)`` of a tiny ``architecture`` (a transformers class name), through its config constructor."""
    import transformers

    cls = getattr(transformers, architecture)
    config_cls = cls.config_class
    default = config_cls()

    def known(k: str) -> bool:  # a settable attribute of the config (attribute_map included)
        if isinstance(getattr(config_cls, k, None), property):
            return False
        try:
            return hasattr(default, k)
        except Exception:  # Gemma 4: a per-layer attribute read globally; it is a constructor argument
            return True

    kwargs = {k: v for k, v in {**_SIZES, **_NONTRIVIAL}.items() if known(k)}
    kwargs.update({k: 0 for k in _TOKEN_IDS if known(k) and getattr(default, k, None) is not None})
    if known("kv_lora_rank"):  # multi-head latent attention: one key/value head per query head
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    kwargs.update(_EXTRA.get(architecture, {}))
    if known("tie_word_embeddings"):
        kwargs.setdefault("tie_word_embeddings", False)
    return config_cls(**kwargs), cls


def build(architecture: str, folder: str | Path, *, seed: int = 0) -> tuple[Path, int]:
    """Build, size-check and save a tiny ``architecture`` model with the tiny tokenizer; ``(folder, n_params)``."""
    from streamlens.testing import save_model

    config, cls = tiny_config(architecture)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # zero-initialised projections (nanochat's) would make every removal a no-op
        for p in model.parameters():
            if p.dim() >= 2 and not bool(p.abs().max() > 0):
                p.normal_(0.0, 0.02)
    n = sum(p.numel() for p in model.parameters())
    if n > MAX_PARAMS:
        raise AssertionError(f"tiny {architecture} has {n:,} parameters, more than {MAX_PARAMS:,}: a size was not set")
    return save_model(model, folder), n


# ---------------------------------------------------------------------------- the checks
def _decoder_layers(hf) -> torch.nn.ModuleList:
    """The HF model's list of decoder layers: the longest ModuleList whose length is the number of layers."""
    n = hf.config.num_hidden_layers
    lists = [(name, m) for name, m in hf.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if not lists:
        raise RuntimeError(f"no ModuleList of {n} layers in {type(hf).__name__}")
    return min(lists, key=lambda nm: nm[0].count("."))[1]


def _hand_skip(folder: Path, architecture: str, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and block-skipped logits of a fresh HF model, block ``layer`` replaced by its input with a forward hook."""
    import transformers

    hf = getattr(transformers, architecture).from_pretrained(folder).eval()
    block = _decoder_layers(hf)[layer]

    def hook(module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        return (x, *out[1:]) if isinstance(out, tuple) else x

    with torch.no_grad():
        clean = hf(ids, use_cache=False).logits
        h = block.register_forward_hook(hook, with_kwargs=True)
        try:
            ablated = hf(ids, use_cache=False).logits
        finally:
            h.remove()
    return clean.float(), ablated.float()


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

    bad = []
    if not row.numbers["closure"] <= CLOSURE_TOL:
        bad.append(f"closure {row.numbers['closure']:.1e}")
    if not row.numbers["logits"] <= LOGITS_TOL:
        bad.append(f"traced logits {row.numbers['logits']:.1e} from HF's")
    if not row.numbers["decompose"] <= DECOMPOSE_TOL:
        bad.append(f"decomposition {row.numbers['decompose']:.1e}")
    if not worst <= SKIP_KL_TOL:
        bad.append(f"block-skip KL {worst:.1e} from hand-built hooks")
    if any(v > 1e-6 for k, v in row.numbers.items() if k.startswith("skip_top1_gap")):
        bad.append("block-skip top-1 differs from hand-built hooks")
    row.result, row.reason = ("mismatch", "; ".join(bad)) if bad else ("pass", "")
    row.readout = str(getattr(model.arch, "readout", row.readout))


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
