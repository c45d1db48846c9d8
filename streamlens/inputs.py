"""Turning what a user passes (a string, a list of strings, token ids) into a checked, padded batch.

Batches are right-padded: each sequence keeps the positions 0..n-1 it would have alone, so a
causal model computes the same numbers for its real tokens as it would for that prompt alone, and a
bidirectional model (BERT) masks the padding out of attention. Padding positions are excluded from
every statistic through ``Batch.mask``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from streamlens.errors import StreamlensError

if TYPE_CHECKING:
    from streamlens.model import Model

Inputs = Union[str, Sequence[str], Tensor, Sequence[Sequence[int]]]


@dataclass(frozen=True)
class Batch:
    """A right-padded batch of token ids with its mask and the tokens as strings."""

    input_ids: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    str_tokens: tuple[tuple[str, ...], ...]

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        return self.mask.sum(-1)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if isinstance(v, int):
            return v
    return 0


def _str_tokens(tokenizer, ids: Sequence[int]) -> tuple[str, ...]:
    if tokenizer is None:
        return tuple(str(i) for i in ids)
    return tuple(tokenizer.decode([int(i)]) for i in ids)


def encode(model: "Model", inputs: Inputs, *, max_tokens: int | None = None) -> Batch:
    """Tokenize and check ``inputs`` for ``model``; pad on the right.

    ``max_tokens`` truncates each sequence (used for data sets); without it, a sequence longer
    than the model's context is an error.
    """
    tokenizer = model.tokenizer
    seqs: list[list[int]]
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, Tensor):
        if inputs.dtype.is_floating_point or inputs.dtype == torch.bool:
            raise StreamlensError(f"token ids must be an integer tensor, got dtype {inputs.dtype}")
        if inputs.dim() == 1:
            inputs = inputs[None]
        if inputs.dim() != 2:
            raise StreamlensError(f"token ids must have shape (pos,) or (batch, pos), got {tuple(inputs.shape)}")
        seqs = [row.tolist() for row in inputs]
    elif isinstance(inputs, Sequence):
        if len(inputs) == 0:
            raise StreamlensError("no inputs: got an empty list")
        if all(isinstance(x, str) for x in inputs):
            if tokenizer is None:
                raise StreamlensError("this model has no tokenizer: pass token ids instead of strings")
            seqs = []
            for i, text in enumerate(inputs):
                if not text.strip():
                    raise StreamlensError(f"input {i} is empty ({text!r}): give at least one token of text")
                seqs.append(list(tokenizer(text)["input_ids"]))
        elif all(isinstance(x, Sequence) and not isinstance(x, str) for x in inputs):
            seqs = [[int(t) for t in x] for x in inputs]
        else:
            raise StreamlensError(
                "inputs must be a string, a list of strings, or token ids; "
                f"got a list of {sorted({type(x).__name__ for x in inputs})}"
            )
    else:
        raise StreamlensError(f"inputs must be a string, a list of strings, or token ids; got {type(inputs).__name__}")

    n_ctx, d_vocab = model.arch.n_ctx, model.arch.d_vocab
    for i, ids in enumerate(seqs):
        if len(ids) == 0:
            raise StreamlensError(f"input {i} is empty: it has no tokens")
        bad = [t for t in ids if not 0 <= t < d_vocab]
        if bad:
            raise StreamlensError(
                f"input {i} has token id {bad[0]} outside the vocabulary (0..{d_vocab - 1})"
            )
        if max_tokens is not None:
            seqs[i] = ids = ids[:max_tokens]
        if len(ids) > n_ctx:
            raise StreamlensError(
                f"input {i} has {len(ids)} tokens, longer than the model's context of {n_ctx} tokens"
            )

    longest = max(len(s) for s in seqs)
    pad = _pad_id(tokenizer)
    ids_t = torch.full((len(seqs), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids_t[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return Batch(ids_t, mask, tuple(_str_tokens(tokenizer, s) for s in seqs))


def select_positions(
    batch: Batch, positions: int | str | Sequence[int] | None
) -> tuple[Int[Tensor, "batch sel"], Bool[Tensor, "batch sel"]]:
    """Absolute position indices ``(batch, sel)`` and their validity mask.

    ``None``: every position (padding masked). An int or a list of ints: non-negative values are
    absolute positions; negative values count back from each sequence's *last real token* (so -1 is
    the last non-padding token of every prompt in a padded batch). ``"last"`` is ``-1``.
    """
    lengths = batch.lengths
    n, longest = batch.input_ids.shape
    if positions is None:
        idx = torch.arange(longest).expand(n, longest).clone()
        return idx, batch.mask.clone()
    if isinstance(positions, str):
        if positions != "last":
            raise StreamlensError(f"positions must be None, 'last', an int or a list of ints; got {positions!r}")
        positions = [-1]
    if isinstance(positions, int):
        positions = [positions]
    positions = list(positions)
    if not positions:
        raise StreamlensError("positions is an empty list: choose at least one position")
    idx = torch.empty((n, len(positions)), dtype=torch.long)
    for j, p in enumerate(positions):
        if not isinstance(p, int):
            raise StreamlensError(f"positions must be ints, got {p!r}")
        absolute = lengths + p if p < 0 else torch.full((n,), p)
        bad = ((absolute < 0) | (absolute >= lengths)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise StreamlensError(
                f"position {p} is out of range for input {i}, which has {int(lengths[i])} tokens"
            )
        idx[:, j] = absolute
    return idx, torch.ones_like(idx, dtype=torch.bool)
