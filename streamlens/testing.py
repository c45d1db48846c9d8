"""Tiny random-weight models for tests, examples and benchmarks, built offline through config constructors.

``build_tiny("llama", folder)`` writes a ``save_pretrained`` folder (model + tokenizer) that
``streamlens.load(folder)`` boots offline. The tokenizer is a byte-level BPE trained on Python's own
documentation (``pydoc_data.topics``, present on every machine). Sizes are asserted, so a "tiny"
model can never silently be full size.

``build_bridged(architecture, folder)`` does the same for any decoder-only text architecture the
installed TransformerLens bridges (``bridged_architectures()``, by transformers class name), for the
coverage check of :mod:`streamlens.coverage`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from streamlens.report.demo import pydoc_texts

TINY_ARCHS = ("gpt2", "neox", "llama", "bert", "gptj", "gemma", "gemma2", "opt", "qwen2")
_VOCAB = 512


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE tokenizer with a 512-token vocabulary, trained on :func:`pydoc_texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(pydoc_texts(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_config(arch: str, *, n_layers: int = 2, d_model: int = 32, n_heads: int = 4, d_mlp: int = 64,
                n_ctx: int = 128, vocab: int | None = None):
    """``(config, model_class)`` for a tiny model of ``arch``."""
    import transformers as T

    v = vocab or len(tiny_tokenizer())
    common = dict(vocab_size=v, hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                  intermediate_size=d_mlp, max_position_embeddings=n_ctx)
    if arch == "gpt2":
        return T.GPT2Config(vocab_size=v, n_positions=n_ctx, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
                            n_inner=d_mlp), T.GPT2LMHeadModel
    if arch == "neox":
        return T.GPTNeoXConfig(**common, use_parallel_residual=True, rotary_pct=0.5), T.GPTNeoXForCausalLM
    if arch == "llama":
        return T.LlamaConfig(**common, num_key_value_heads=max(1, n_heads // 2)), T.LlamaForCausalLM
    if arch == "qwen2":
        return T.Qwen2Config(**common, num_key_value_heads=max(1, n_heads // 2)), T.Qwen2ForCausalLM
    if arch == "bert":
        return T.BertConfig(**common), T.BertForMaskedLM
    if arch == "gptj":
        return T.GPTJConfig(vocab_size=v, n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_positions=n_ctx,
                            n_inner=d_mlp, rotary_dim=d_model // n_heads // 2), T.GPTJForCausalLM
    if arch == "gemma":
        return T.GemmaConfig(**common, num_key_value_heads=1, head_dim=d_model // n_heads), T.GemmaForCausalLM
    if arch == "gemma2":
        return T.Gemma2Config(**common, num_key_value_heads=max(1, n_heads // 2), head_dim=d_model // n_heads,
                              final_logit_softcapping=None), T.Gemma2ForCausalLM
    if arch == "opt":
        return T.OPTConfig(vocab_size=v, hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                           ffn_dim=d_mlp, max_position_embeddings=n_ctx, word_embed_proj_dim=d_model), T.OPTForCausalLM
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {TINY_ARCHS}")


def build_tiny(arch: str, folder: str | Path, *, seed: int = 0, max_params: int = 200_000, **sizes) -> Path:
    """Build a tiny random ``arch`` model, check its size, and save it (with tokenizer) to ``folder``."""
    cfg, cls = tiny_config(arch, **sizes)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    if n > max_params:
        raise AssertionError(f"tiny {arch} has {n:,} parameters, more than {max_params:,}: the config was not read")
    folder = Path(folder)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def save_model(model, folder: str | Path) -> Path:
    """Save an in-memory HuggingFace model with the tiny tokenizer, for ``streamlens.load``."""
    folder = Path(folder)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------- a known mechanism
def induction_batch(n: int, half: int = 16, *, seed: int = 0, vocab: int | None = None) -> torch.Tensor:
    """``n`` sequences of ``half`` random tokens repeated twice: ``(n, 2 * half)``.

    On the repeated half, token ``i`` is predictable only by induction: find the previous
    occurrence of the current token and copy the token that followed it.
    """
    v = vocab or len(tiny_tokenizer())
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(1, v, (n, half), generator=g)
    return torch.cat([first, first], dim=1)


def train_induction_model(folder: str | Path, *, seed: int = 0, steps: int = 1500, half: int = 16,
                          batch: int = 64, lr: float = 1e-3, min_accuracy: float = 0.9) -> Path:
    """Train a 2-layer GPT-2 (d_model 64, 4 heads, tiny MLP) on repeated random tokens; save it.

    It learns an induction circuit: a previous-token head in layer 0 and an induction head in
    layer 1. The repeat length varies per step (``half // 2`` to ``2 * half - 1``), so no fixed
    positional offset solves the task; the circuit forms in a phase transition around step 800
    (loss ~5.4 -> ~2), and by step 1500 the loss is ~0.2. Raises if the repeated half is not
    predicted with ``min_accuracy`` (checked on fresh sequences of three lengths), so a test built
    on it can never rest on an untrained model.
    """
    import transformers as T

    torch.manual_seed(seed)
    v = len(tiny_tokenizer())
    cfg = T.GPT2Config(vocab_size=v, n_positions=4 * half, n_embd=64, n_layer=2, n_head=4, n_inner=64,
                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = T.GPT2LMHeadModel(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        # The repeat length varies per step, so a fixed positional offset cannot solve the task:
        # only content-based induction (previous-token head -> induction head) does.
        h = int(torch.randint(half // 2, 2 * half, (1,), generator=g))
        ids = induction_batch(batch, h, seed=seed * 100_003 + step + 1, vocab=v)
        logits = model(ids).logits
        # next-token loss on the repeated half only (the first half is unpredictable noise)
        loss = torch.nn.functional.cross_entropy(logits[:, h - 1 : -1].reshape(-1, v), ids[:, h:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    acc = min(induction_accuracy(model, half=h, seed=seed + 10_000) for h in (half // 2 + 1, half, 2 * half - 1))
    if acc < min_accuracy:
        raise AssertionError(f"the induction model reached only {acc:.1%} accuracy on the repeated half after {steps} steps")
    return save_model(model, folder)


def induction_accuracy(hf_model, *, half: int = 16, n: int = 128, seed: int = 12345) -> float:
    """Top-1 accuracy of ``hf_model`` on the repeated half of fresh induction sequences."""
    ids = induction_batch(n, half, seed=seed, vocab=hf_model.config.vocab_size)
    with torch.no_grad():
        pred = hf_model(ids).logits[:, half - 1 : -1].argmax(-1)
    return float((pred == ids[:, half:]).float().mean())


def _attention_patterns(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer ``(batch, head, query, key)`` attention patterns, read at the bridge's ``attn.hook_pattern``."""
    from streamlens.model import hooks

    pats: dict[int, torch.Tensor] = {}
    attach = [(model.bridge.blocks[l].attn.hook_pattern, lambda t, l=l: pats.__setitem__(l, t.detach()))
              for l in range(model.arch.n_layers)]
    with torch.no_grad(), hooks.attached(attach):
        model.run(ids, torch.ones_like(ids, dtype=torch.bool))
    return [pats[l] for l in range(model.arch.n_layers)]


def induction_scores(model, *, half: int = 16, n: int = 32, seed: int = 999) -> torch.Tensor:
    """``(n_layers, n_heads)``: mean attention from each repeated-half token to the token after its previous occurrence.

    ``model`` is a :class:`streamlens.Model`.
    """
    pats = _attention_patterns(model, induction_batch(n, half, seed=seed, vocab=model.arch.d_vocab))
    q = torch.arange(half, 2 * half)
    return torch.stack([p[:, :, q, q - half + 1].mean(dim=(0, 2)) for p in pats])


def previous_token_scores(model, *, half: int = 16, n: int = 32, seed: int = 999) -> torch.Tensor:
    """``(n_layers, n_heads)``: mean attention from each token (after the first) to the token just before it."""
    pats = _attention_patterns(model, induction_batch(n, half, seed=seed, vocab=model.arch.d_vocab))
    q = torch.arange(1, 2 * half)
    return torch.stack([p[:, :, q, q - 1].mean(dim=(0, 2)) for p in pats])


BRIDGED_MAX_PARAMS = 400_000

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
    final_logit_softcapping=1.0, logits_soft_cap=1.0, logit_scale=0.5, initializer_range=0.1,
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
    # attention and Mamba side by side, each with its own output multiplier (1 by default)
    "FalconH1ForCausalLM": dict(attention_out_multiplier=0.5, ssm_out_multiplier=0.75, attention_in_multiplier=1.5,
                                mlp_multipliers=[1.25, 0.8]),
    "Gemma4ForCausalLM": dict(global_head_dim=8),
    "DeepseekV2ForCausalLM": dict(first_k_dense_replace=1),
    "DeepseekV3ForCausalLM": dict(first_k_dense_replace=1),
}


# ---------------------------------------------------------------------------- every architecture the bridge knows
def bridged_architectures() -> list[str]:
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


def bridged_config(architecture: str):
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


def build_bridged(architecture: str, folder: str | Path, *, seed: int = 0) -> tuple[Path, int]:
    """Build, size-check and save a tiny ``architecture`` model with the tiny tokenizer; ``(folder, n_params)``."""
    config, cls = bridged_config(architecture)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # zero-initialised projections (nanochat's) would make every removal a no-op
        for p in model.parameters():
            if p.dim() >= 2 and not bool(p.abs().max() > 0):
                p.normal_(0.0, 0.02)
        # a scale of the whole stream at the end of a block (Gemma 4's layer_scalar, 1 by default): away from 1
        for i, (name, buf) in enumerate(n_b for n_b in model.named_buffers() if n_b[0].endswith("layer_scalar")):
            buf.fill_(0.75 + 0.5 * i)
    n = sum(p.numel() for p in model.parameters())
    if n > BRIDGED_MAX_PARAMS:
        raise AssertionError(f"tiny {architecture} has {n:,} parameters, more than {BRIDGED_MAX_PARAMS:,}: a size was not set")
    return save_model(model, folder), n
