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
