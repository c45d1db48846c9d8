"""What a user passes (texts, files, prompts, token ids) turned into checked, padded batches: the one batcher.

Inputs: a string (one text), a list of strings, token ids (an integer tensor ``(pos,)`` or
``(batch, pos)``, or a list of lists of ints). Data sets (:func:`load_texts`): a list of texts, or a
``.txt`` file (one document per line) or ``.jsonl`` file (a ``"text"`` field per line).

**Files or texts, one rule for every verb** (:func:`is_file`): a ``pathlib.Path`` (any
``os.PathLike``), or a string that ends in ``.txt`` or ``.jsonl`` and has no line break, is a data
file and is read with :func:`load_texts`; anything else is text. So ``trace(model, "t.txt")``,
``trace_stats(model, "t.txt")``, ``dynamics(model, "t.txt")`` and ``skip_sweep(model, "t.txt")`` all
read the file, and a missing file is an error, never a one-line document.

**The start token** (``prepend_bos``, a keyword of every verb and ``--prepend-bos/--no-prepend-bos``
on the command line): ``None`` (the default) prepends the tokenizer's BOS token when it has one,
which is TransformerLens' convention and what streamlens has always done (SmolLM2: ``<|im_start|>``,
GPT-2: ``<|endoftext|>``); ``False`` tokenizes as plain HuggingFace does without it (for SmolLM2 and
GPT-2, ``tokenizer(text, add_special_tokens=False)``); ``True`` insists on it (an error for a
tokenizer without a BOS token). Token ids are used as given unless ``prepend_bos=True``. The choice
changes the numbers, so every result records it (``result.prepend_bos``) with the token ids it was
computed on (``result.token_ids``), and saves both in its ``.json`` file.

**Numbers**: token ids, positions, layers and sizes accept integer-like values (``int``,
``np.int64``, a 0-d integer tensor) and refuse floats and bools with a message naming the value
(:func:`as_int`); ``max_tokens`` must be a positive int or None.

Positions (one vocabulary for every verb, :func:`select_positions`): ``None`` (every real token),
``"last"``, an int or a list of ints (negative ints count back from each sequence's last real token),
a ``slice`` of absolute positions, or a boolean mask ``(batch, pos)``.

Batches are right-padded: each sequence keeps the positions 0..n-1 it would have alone, so a
causal model computes the same numbers for its real tokens as it would for that prompt alone, and a
bidirectional model (BERT) masks the padding out of attention. Padding positions are excluded from
every statistic through ``Batch.mask``.
"""

from __future__ import annotations

import contextvars
import functools
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from streamlens.errors import StreamlensError
from streamlens.stream.data import is_file, load_texts

if TYPE_CHECKING:
    from streamlens.model.loading import Model

Inputs = Union[str, Sequence[str], Tensor, Sequence[Sequence[int]]]


@dataclass(frozen=True)
class Batch:
    """A right-padded batch of token ids with its mask and the tokens as strings."""

    input_ids: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    str_tokens: tuple[tuple[str, ...], ...]
    prepend_bos: bool = False  # whether a BOS token was put in front of each text

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


def as_int(value, what: str) -> int:
    """``value`` as an int if it is integer-like (``int``, ``np.int64``, a 0-d integer tensor); else an error
    naming ``what`` and the value. Floats (even ``2.0``) and bools are refused: they are never meant as indices."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise StreamlensError(f"{what} must be an int, got {value!r}")
    if isinstance(value, Tensor) and value.dim() == 0 and not value.dtype.is_floating_point:
        return int(value)
    try:
        return operator.index(value)
    except TypeError:
        raise StreamlensError(f"{what} must be an int, got {value!r} ({type(value).__name__})") from None


def is_int_like(value) -> bool:
    try:
        as_int(value, "")
        return True
    except StreamlensError:
        return False


def check_max_tokens(max_tokens) -> int | None:
    """``max_tokens`` as a positive int, or None (keep every token)."""
    if max_tokens is None:
        return None
    n = as_int(max_tokens, "max_tokens")
    if n < 1:
        raise StreamlensError(f"max_tokens must be a positive int (or None for every token), got {max_tokens!r}")
    return n


def check_prepend_bos(prepend_bos) -> bool | None:
    if prepend_bos is not None and not isinstance(prepend_bos, bool):
        raise StreamlensError(f"prepend_bos must be True, False or None (the default), got {prepend_bos!r}")
    return prepend_bos


def resolve_bos(model: "Model", prepend_bos: bool | None) -> bool:
    """The start-token choice for texts: ``prepend_bos``, or (None) whether the tokenizer has a BOS token."""
    return (_bos_id(model.tokenizer) is not None) if prepend_bos is None else prepend_bos


def _bos_id(tokenizer) -> int | None:
    v = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    return v if isinstance(v, int) else None


def _tokenize(tokenizer, text: str, prepend_bos: bool | None) -> tuple[list[int], bool]:
    """Token ids of ``text`` and whether a BOS token was put in front (see the module docstring)."""
    bos = _bos_id(tokenizer)
    ids = list(tokenizer(text)["input_ids"])
    if prepend_bos is None:
        prepend_bos = bos is not None
    if prepend_bos:
        if bos is None:
            raise StreamlensError("prepend_bos=True, but this model's tokenizer has no BOS token")
        return (ids if ids and ids[0] == bos else [bos, *ids]), True
    if bos is not None and ids and ids[0] == bos:
        plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not plain or plain[0] != bos:  # the tokenizer added it (a text may itself start with the BOS string)
            ids = ids[1:]
    return ids, False


# One recorder per running verb (a context variable, so threads and nested verbs each keep their own).
_RECORDER: contextvars.ContextVar[list | None] = contextvars.ContextVar("streamlens_inputs", default=None)


def recorded(verb):
    """Decorate a verb so the result it returns records its start-token choice and the token ids it saw.

    Every :func:`encode` call made while the verb runs adds its sequences (without padding) to the
    result's ``token_ids``; ``prepend_bos`` is the resolved choice (True, False, or None where it varied).
    """
    @functools.wraps(verb)
    def run(*args, **kwargs):
        seen: list = []
        token = _RECORDER.set(seen)
        try:
            result = verb(*args, **kwargs)
        finally:
            _RECORDER.reset(token)
        if hasattr(result, "__dict__") and seen:
            flags = {bos for bos, _, _ in seen}
            # compact: every id in one int32 array (4 bytes a token) plus where each sequence ends
            ids = np.concatenate([flat for _, flat, _ in seen])
            ends = np.cumsum(np.concatenate([lengths for _, _, lengths in seen]))
            object.__setattr__(result, "recorded_inputs", (flags.pop() if len(flags) == 1 else None, ids, ends))
        return result

    return run


def encode(model: "Model", inputs: Inputs, *, max_tokens: int | None = None, prepend_bos: bool | None = None) -> Batch:
    """Tokenize and check ``inputs`` for ``model``; pad on the right.

    ``max_tokens`` truncates each sequence (used for data sets); without it, a sequence longer
    than the model's context is an error. ``prepend_bos``: the start token (module docstring).
    A data file (:func:`is_file`) is read with :func:`load_texts`.
    """
    tokenizer = model.tokenizer
    max_tokens = check_max_tokens(max_tokens)
    check_prepend_bos(prepend_bos)
    seqs: list[list[int]]
    added = False
    if is_file(inputs):
        inputs = load_texts(inputs)
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
    elif isinstance(inputs, Sequence) and not isinstance(inputs, str):
        if len(inputs) == 0:
            raise StreamlensError("no inputs: got an empty list")
        if all(isinstance(x, str) for x in inputs):
            if tokenizer is None:
                raise StreamlensError("this model has no tokenizer: pass token ids instead of strings")
            seqs = []
            for i, text in enumerate(inputs):
                if not text.strip():
                    raise StreamlensError(f"input {i} is empty ({text!r}): give at least one token of text")
                ids, added = _tokenize(tokenizer, text, prepend_bos)
                seqs.append(ids)
        elif all(isinstance(x, (Sequence, Tensor, np.ndarray)) and not isinstance(x, str) for x in inputs):
            seqs = [[as_int(t, f"token id {t!r} of input {i}") for t in x] for i, x in enumerate(inputs)]
        else:
            raise StreamlensError(
                "inputs must be a string, a list of strings, or token ids; "
                f"got a list of {sorted({type(x).__name__ for x in inputs})}"
            )
    else:
        raise StreamlensError(f"inputs must be a string, a list of strings, or token ids; got {type(inputs).__name__}")
    if prepend_bos and not added:  # token ids with prepend_bos=True
        bos = _bos_id(tokenizer)
        if bos is None:
            raise StreamlensError("prepend_bos=True, but this model's tokenizer has no BOS token")
        seqs = [s if s and s[0] == bos else [bos, *s] for s in seqs]
        added = True

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
    rec = _RECORDER.get()
    if rec is not None:
        rec.append((added, np.fromiter((t for s in seqs for t in s), dtype=np.int32),
                    np.array([len(s) for s in seqs], dtype=np.int64)))
    return Batch(ids_t, mask, tuple(_str_tokens(tokenizer, s) for s in seqs), added)


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
    if is_int_like(positions):
        positions = [positions]
    if not isinstance(positions, (Sequence, Tensor, np.ndarray)):
        raise StreamlensError(f"positions must be None, 'last', an int, a list of ints, a slice or a boolean "
                              f"mask; got {positions!r}")
    positions = list(positions)
    if not positions:
        raise StreamlensError("positions is an empty list: choose at least one position")
    idx = torch.empty((n, len(positions)), dtype=torch.long)
    for j, p in enumerate(positions):
        p = as_int(p, "a position")
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
    if is_file(inputs):
        return load_texts(inputs)
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
