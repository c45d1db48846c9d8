"""What a logit decomposition reads out: a token, a logit difference, the top-k tokens, a direction, or the vocabulary.

Every target is a *readout*: a vector ``u`` in the space the unembedding reads (the final norm's
output) and an offset ``c``, so that the target's value is ``u · ln_final(x) + c``:

=============================  =====================================  ===================================
target                          u                                      c
=============================  =====================================  ===================================
token ``t`` (str or id)         ``W_U[t]``                             ``b_U[t]``
``t`` with ``contrast=c``       ``W_U[t] − W_U[c]``                    ``b_U[t] − b_U[c]`` (logit difference)
``"top:5"`` / ``"vocab"``       each of the top-5 / every token        its ``b_U``
a float tensor ``(d_model,)``   the tensor itself                      0: value = direction · ln_final(x)
=============================  =====================================  ===================================

A string target must be exactly one token; anything else is an error that shows how it tokenizes.
``"top:K"`` and ``"vocab"`` are keywords (use the token id to ask for a token spelled like that).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from streamlens.errors import StreamlensError
from streamlens.readout.unembed import unembed_matrices, vocab_chunks

if TYPE_CHECKING:
    from streamlens.model.loading import Model

KEYWORDS = ("top:K", "vocab")


@dataclass(frozen=True)
class Target:
    """A resolved target before the forward pass (``top`` is chosen from the model's own logits)."""

    kind: str  # "token" | "logit_diff" | "direction" | "top" | "vocab"
    ids: Int[Tensor, " prompt"] | None = None
    contrast: Int[Tensor, " prompt"] | None = None
    direction: Float[Tensor, " d_model"] | None = None
    k: int = 1

    def take(self, start: int, stop: int) -> "Target":
        """The target of prompts ``start:stop`` (one batch)."""
        cut = lambda t: None if t is None else t[start:stop]  # noqa: E731
        return Target(self.kind, cut(self.ids), cut(self.contrast), self.direction, self.k)


def token_id(model, token, *, what: str = "target") -> int:
    """A single token id from a string (must tokenize to exactly one token) or an int."""
    d_vocab = model.arch.d_vocab
    if isinstance(token, Tensor) and token.dim() == 0 and not token.dtype.is_floating_point:
        token = int(token)
    if isinstance(token, bool):
        raise StreamlensError(f"{what} must be a token (string or id), got {token!r}")
    if isinstance(token, int):
        if not 0 <= token < d_vocab:
            raise StreamlensError(f"{what} token id {token} is outside the vocabulary (0..{d_vocab - 1})")
        return token
    if isinstance(token, str):
        if model.tokenizer is None:
            raise StreamlensError(f"this model has no tokenizer: give the {what} {token!r} as a token id")
        ids = list(model.tokenizer(token, add_special_tokens=False)["input_ids"])
        if not ids:
            raise StreamlensError(f"{what} {token!r} is empty: it tokenizes into no token; give one token, e.g. ' Paris'")
        if len(ids) != 1:
            pieces = [model.tokenizer.decode([i]) for i in ids]
            raise StreamlensError(
                f"{what} {token!r} is not a single token: it tokenizes into {len(ids)} tokens {pieces} "
                f"(ids {ids}); choose one token, e.g. {pieces[0]!r} if any, or pass a token id"
            )
        return int(ids[0])
    raise StreamlensError(f"{what} must be a token (string or id), a list of them, a keyword {KEYWORDS} or a "
                          f"direction tensor of shape (d_model,); got {type(token).__name__}")


def _per_prompt(model, spec, n: int, what: str) -> Tensor:
    if isinstance(spec, Tensor) and spec.dim() == 1 and not spec.dtype.is_floating_point:
        spec = spec.tolist()
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        if len(spec) != n:
            raise StreamlensError(f"{what} has {len(spec)} entries but there are {n} prompts: give one per prompt")
        return torch.tensor([token_id(model, t, what=what) for t in spec], dtype=torch.long)
    return torch.full((n,), token_id(model, spec, what=what), dtype=torch.long)


def resolve(model, target, contrast, n_prompts: int) -> Target:
    """Check ``target`` / ``contrast`` against the model and the number of prompts."""
    d_model = model.arch.d_model
    if isinstance(target, Tensor) and target.dtype.is_floating_point:
        if contrast is not None:
            raise StreamlensError("contrast goes with a token target; for a direction pass the difference as the direction")
        if tuple(target.shape) != (d_model,):
            raise StreamlensError(f"a direction target must have shape ({d_model},) (d_model), got {tuple(target.shape)}")
        if not torch.isfinite(target).all():
            raise StreamlensError("the direction target contains NaN or inf")
        return Target("direction", direction=target.detach().float().cpu())
    if isinstance(target, str) and target == "vocab":
        if contrast is not None:
            raise StreamlensError("contrast cannot be combined with target='vocab'")
        return Target("vocab", k=model.arch.d_vocab)
    if isinstance(target, str) and target.startswith("top:"):
        k = target[4:]
        if not k.isdigit() or not 1 <= int(k) <= model.arch.d_vocab:
            raise StreamlensError(f"target {target!r}: write 'top:K' with K between 1 and {model.arch.d_vocab}")
        if contrast is not None:
            raise StreamlensError(f"contrast cannot be combined with target={target!r}")
        return Target("top", k=int(k))
    if target is None:
        raise StreamlensError(f"target is required: a token, a list of tokens (one per prompt), {KEYWORDS}, or a direction")
    ids = _per_prompt(model, target, n_prompts, "target")
    if contrast is None:
        return Target("token", ids=ids)
    return Target("logit_diff", ids=ids, contrast=_per_prompt(model, contrast, n_prompts, "contrast"))


def readout(model, tgt: Target, logits: Float[Tensor, "batch sel vocab"]):
    """``(ids, contrast)`` of shape ``(batch, sel, k)`` for token-like targets (``top`` from ``logits``)."""
    b, s, _ = logits.shape
    if tgt.kind == "top":
        return logits.float().topk(tgt.k, dim=-1).indices.cpu(), None
    if tgt.kind in ("token", "logit_diff"):
        ids = tgt.ids[:, None, None].expand(b, s, 1)
        con = None if tgt.contrast is None else tgt.contrast[:, None, None].expand(b, s, 1)
        return ids, con
    return None, None


def readouts(model: Model, tgt: Target, ids, con, chunk_size: int):
    """Yield ``(slice over targets, u, c, shared)`` covering every target; the vocabulary in chunks.

    ``u`` is ``(k, d)`` when ``shared`` (the same rows for every position) or ``(b, s, k, d)``.
    """
    W, bU = unembed_matrices(model)
    if tgt.kind == "direction":
        yield slice(0, 1), tgt.direction.to(W.device)[None], torch.zeros(1, device=W.device), True
    elif tgt.kind == "vocab":
        for sl in vocab_chunks(W.shape[0], chunk_size):
            yield sl, W[sl], bU[sl], True
    else:
        ids = ids.to(W.device)
        u, c = W[ids], bU[ids]
        if con is not None:
            con = con.to(W.device)
            u, c = u - W[con], c - bU[con]
        yield slice(0, ids.shape[-1]), u, c, False


def target_ids(model: Model, target, n: int) -> Tensor | None:
    """One token id per prompt for a token target of the lens (None: no target)."""
    if target is None:
        return None
    if isinstance(target, (list, tuple)):
        if len(target) != n:
            raise StreamlensError(f"target has {len(target)} entries but there are {n} prompts: give one per prompt")
        return torch.tensor([token_id(model, t) for t in target])
    return torch.full((n,), token_id(model, target))
