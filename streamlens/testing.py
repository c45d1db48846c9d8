"""Tiny random-weight models for tests, examples and benchmarks, built offline through config constructors.

``build_tiny("llama", folder)`` writes a ``save_pretrained`` folder (model + tokenizer) that
``streamlens.load(folder)`` boots offline. The tokenizer is a byte-level BPE trained on Python's own
documentation (``pydoc_data.topics``, present on every machine). Sizes are asserted, so a "tiny"
model can never silently be full size.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

TINY_ARCHS = ("gpt2", "neox", "llama", "bert", "gptj", "gemma", "gemma2", "opt", "qwen2")
_VOCAB = 512


def pydoc_texts() -> list[str]:
    """Passages of real English: the topics of Python's own documentation (sorted, deterministic)."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


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
