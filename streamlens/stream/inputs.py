"""What a user passes (texts, files, prompts, token ids) turned into checked, padded batches: the one batcher.

Inputs: a string (one text), a list of strings, token ids (an integer tensor ``(pos,)`` or
``(batch, pos)``, or a list of lists of ints). Data sets (:func:`load_texts`): a list of texts, or a
``.txt`` file (one document per line) or ``.jsonl`` file (a ``"text"`` field per line).

Positions (one vocabulary for every verb, :func:`select_positions`): ``None`` (every real token),
``"last"``, an int or a list of ints (negative ints count back from each sequence's last real token),
a ``slice`` of absolute positions, or a boolean mask ``(batch, pos)``.

Batches are right-padded: each sequence keeps the positions 0..n-1 it would have alone, so a
causal model computes the same numbers for its real tokens as it would for that prompt alone, and a
bidirectional model (BERT) masks the padding out of attention. Padding positions are excluded from
every statistic through ``Batch.mask``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from streamlens.errors import StreamlensError

if TYPE_CHECKING:
    from streamlens.model.loading import Model

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


Positions = Union[None, str, int, Sequence[int], slice, Tensor]


def select_positions(batch: Batch, positions: Positions) -> tuple[Int[Tensor, "batch sel"], Bool[Tensor, "batch sel"]]:
    """Absolute position indices ``(batch, sel)`` and their validity mask (False: nothing there).

    ``None``: every position (padding masked). An int or a list of ints: non-negative values are
    absolute positions; negative values count back from each sequence's *last real token* (so -1 is
    the last non-padding token of every prompt in a padded batch); out of range is an error.
    ``"last"`` is ``-1``. A ``slice`` of absolute positions (positions past a sequence's end are
    masked). A boolean mask ``(batch, pos)``: its True entries, packed to the left of each row.
    """
    lengths = batch.lengths
    n, longest = batch.input_ids.shape
    if positions is None:
        idx = torch.arange(longest).expand(n, longest).clone()
        return idx, batch.mask.clone()
    if isinstance(positions, slice):
        cols = torch.arange(longest)[positions]
        if len(cols) == 0:
            raise StreamlensError(f"positions {positions} selects no position of a {longest}-token batch")
        idx = cols.expand(n, len(cols)).clone()
        return idx, batch.mask.gather(1, idx)
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        if positions.dim() != 2 or positions.shape[0] != n:
            raise StreamlensError(f"a positions mask must have shape (batch, pos) = ({n}, pos), got {tuple(positions.shape)}")
        chosen = torch.zeros(n, longest, dtype=torch.bool)
        w = min(longest, positions.shape[1])
        chosen[:, :w] = positions[:, :w].cpu()
        chosen &= batch.mask
        width = max(int(chosen.sum(1).max()), 1)
        # stable sort puts each row's chosen columns first, in order
        order = torch.sort((~chosen).to(torch.int8), dim=1, stable=True).indices[:, :width]
        return order, chosen.gather(1, order)
    if isinstance(positions, str):
        if positions != "last":
            raise StreamlensError(f"positions must be None, 'last', an int, a list of ints, a slice or a boolean "
                                  f"mask; got {positions!r}")
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


def position_mask(batch: Batch, positions: Positions) -> Bool[Tensor, "batch pos"]:
    """The chosen real positions of ``batch`` as a ``(batch, pos)`` mask (see :func:`select_positions`)."""
    idx, valid = select_positions(batch, positions)
    mask = torch.zeros_like(batch.mask)
    rows = torch.arange(idx.shape[0])[:, None].expand_as(idx)
    mask[rows[valid], idx[valid]] = True
    return mask & batch.mask


# ---------------------------------------------------------------------------- the batcher
def check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise StreamlensError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def as_sequences(inputs: Inputs) -> Sequence:
    """``inputs`` as a sequence of items (texts or id rows): one string or one 1-D id tensor becomes a list of one."""
    if isinstance(inputs, str):
        return [inputs]
    if isinstance(inputs, Tensor) and inputs.dim() == 1:
        return inputs[None]
    return inputs


def batches(inputs: Inputs, batch_size: int) -> Iterator[tuple[int, Sequence]]:
    """``(start, chunk)`` pairs covering ``inputs`` (texts or token ids), ``batch_size`` items each."""
    check_batch_size(batch_size)
    items = as_sequences(inputs)
    if len(items) == 0:
        raise StreamlensError("no inputs: got an empty list")
    for start in range(0, len(items), batch_size):
        yield start, items[start:start + batch_size]


# ---------------------------------------------------------------------------- data sets
def load_texts(source: str | os.PathLike | Sequence[str], *, field: str = "text") -> list[str]:
    """Documents as a list of non-empty strings.

    Args:
        source: a list of strings; a ``.txt`` file (one document per line, blank lines skipped);
            a ``.jsonl`` file with one JSON object per line (blank lines skipped).
        field: the key holding the text in each JSONL object.
    """
    if isinstance(source, (str, os.PathLike)) and (isinstance(source, os.PathLike) or _looks_like_path(source)):
        return _from_file(Path(source), field)
    if isinstance(source, str):
        raise StreamlensError(
            f"data {source[:60]!r} is a single string: pass a list of documents, or a .txt/.jsonl file path"
        )
    if not isinstance(source, Sequence):
        raise StreamlensError(f"data must be a list of strings or a .txt/.jsonl path, got {type(source).__name__}")
    texts = list(source)
    if not texts:
        raise StreamlensError("the data set is empty: got an empty list of documents")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise StreamlensError(f"document {i} is a {type(t).__name__}, not a string")
        if not t.strip():
            raise StreamlensError(f"document {i} is empty ({t!r})")
    return texts


def _looks_like_path(s: str) -> bool:
    return "\n" not in s and (s.endswith((".txt", ".jsonl")) or os.path.exists(s))


def _from_file(path: Path, field: str) -> list[str]:
    if not path.exists():
        raise StreamlensError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise StreamlensError(f"data file {str(path)!r} must end in .txt (one document per line) or .jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    texts: list[str] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if suffix == ".txt":
            texts.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise StreamlensError(f"{path.name} line {n} is not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict) or field not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise StreamlensError(f"{path.name} line {n} has no field {field!r} (it has {keys}); pass field=...")
        text = obj[field]
        if not isinstance(text, str) or not text.strip():
            raise StreamlensError(f"{path.name} line {n}: field {field!r} is empty or not a string ({text!r})")
        texts.append(text)
    if not texts:
        raise StreamlensError(f"data file {str(path)!r} holds no documents")
    return texts
