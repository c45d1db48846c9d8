"""Task metrics, as layer-pruning papers report them, and a small built-in multiple-choice set.

* ``logit_diff``: the retained fraction of the logit difference ``logit[target] - logit[contrast]``:
  ``sum(ablated differences) / sum(clean differences)`` over the selected positions (1: fully
  retained, 0: gone), with the same percentile bootstrap over documents as every metric (a ratio of
  per-document sums). Needs ``target=`` and ``contrast=``.
* ``mc_accuracy``: multiple-choice accuracy from answer-token logits: 1 where the target token has the
  largest logit among the document's ``choices``, else 0 (MMLU-style, as in ShortGPT's tables). Needs
  ``target=`` and ``choices=``; usually with ``positions="last"``.
* a callable ``f(ablated_logits, clean_logits) -> (rows,)``: a user-supplied metric on the ``(rows,
  vocab)`` float32 logits at the selected positions, averaged over them with the same intervals. Its
  column is its ``__name__``.

    >>> texts, choices, answers = multiple_choice_set()
    >>> ev = streamlens.LayerSkipEvaluator(model, texts, positions="last", target=answers, choices=choices)
    >>> ev.sweep("block", metrics=("mc_accuracy", "kl")).to_dataframe()
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from streamlens.errors import StreamlensError


class Task:
    """The per-document answer tokens of the task metrics, and the user's metric functions."""

    def __init__(self, model, n_docs: int, target=None, contrast=None, choices=None):
        self.target = None if target is None else _per_doc(model, target, n_docs, "target")
        self.contrast = None if contrast is None else _per_doc(model, contrast, n_docs, "contrast")
        self.choices = None
        if choices is not None:
            rows = [choices] * n_docs if choices and not isinstance(choices[0], (list, tuple)) else list(choices)
            if len(rows) != n_docs:
                raise StreamlensError(f"choices has {len(rows)} lists for {n_docs} documents")
            ids = [[_token(model, c, "choices") for c in r] for r in rows]
            if len({len(r) for r in ids}) != 1 or len(ids[0]) < 2:
                raise StreamlensError("choices must give every document the same number (>= 2) of answer tokens")
            self.choices = torch.tensor(ids)
            if self.target is not None:
                bad = [i for i in range(n_docs) if int(self.target[i]) not in ids[i]]
                if bad:
                    raise StreamlensError(f"document {bad[0]}'s target is not one of its choices")
        self.fns: dict[str, Callable] = {}

    def check(self, names: Sequence[str], metrics) -> None:
        """Refuse a task metric whose inputs were not given; register the user's functions."""
        if "logit_diff" in names and (self.target is None or self.contrast is None):
            raise StreamlensError("metric 'logit_diff' needs target= and contrast= (a token, or one per document)")
        if "mc_accuracy" in names and (self.target is None or self.choices is None):
            raise StreamlensError("metric 'mc_accuracy' needs target= (the right answer) and choices= (answer tokens)")
        for f in ([metrics] if callable(metrics) else [m for m in metrics if callable(m)]):
            self.fns[f.__name__] = f

    def needs_logits(self, names: Sequence[str]) -> bool:
        """Whether a metric of ``names`` reads the clean logits (the clean pass then keeps them)."""
        return "logit_diff" in names or any(n in self.fns for n in names)

    def fingerprint(self, names: Sequence[str]) -> dict:
        out = {}
        for k, v in (("target", self.target), ("contrast", self.contrast), ("choices", self.choices)):
            if v is not None:
                out[k] = hashlib.sha256(v.numpy().tobytes()).hexdigest()[:16]
        for name in names:
            if name in self.fns:
                code = getattr(self.fns[name], "__code__", None)
                out[f"fn:{name}"] = hashlib.sha256(code.co_code if code else name.encode()).hexdigest()[:16]
        return out

    def values(self, c, lg: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
        """Per selected row of the clean batch ``c``: each task metric of ``names`` for ablated logits ``lg``."""
        out = {}
        doc = c.doc.cpu()
        if "logit_diff" in names:
            t, k = self.target[doc].to(lg.device)[:, None], self.contrast[doc].to(lg.device)[:, None]
            out["logit_diff"] = (lg.gather(-1, t) - lg.gather(-1, k))[:, 0]
            out["logit_diff_clean"] = (c.logits.gather(-1, t) - c.logits.gather(-1, k))[:, 0]
        if "mc_accuracy" in names:
            ch = self.choices[doc].to(lg.device)  # (rows, choices)
            pick = ch.gather(-1, lg.gather(-1, ch).argmax(-1, keepdim=True))[:, 0]
            out["mc_accuracy"] = (pick == self.target[doc].to(lg.device)).float()
        for name, f in self.fns.items():
            if name in names:
                v = f(lg, c.logits)
                if not isinstance(v, Tensor) or v.shape != (lg.shape[0],):
                    raise StreamlensError(f"metric {name!r} must return one value per row, a tensor of shape "
                                          f"({lg.shape[0]},); got {getattr(v, 'shape', type(v).__name__)}")
                out[name] = v.float()
        return out


def _token(model, tok, what: str) -> int:
    if isinstance(tok, int) and not isinstance(tok, bool):
        if not 0 <= tok < model.arch.d_vocab:
            raise StreamlensError(f"{what} token id {tok} is outside the vocabulary (0..{model.arch.d_vocab - 1})")
        return tok
    if isinstance(tok, str) and model.tokenizer is not None:
        ids = model.tokenizer(tok, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise StreamlensError(f"{what} {tok!r} is {len(ids)} tokens; give a single-token string or a token id")
        return int(ids[0])
    raise StreamlensError(f"{what} must be a token id or a single-token string, got {tok!r}")


def _per_doc(model, value, n_docs: int, what: str) -> Tensor:
    values = value if isinstance(value, (list, tuple)) else [value] * n_docs
    if len(values) != n_docs:
        raise StreamlensError(f"{what} has {len(values)} entries for {n_docs} documents")
    return torch.tensor([_token(model, v, what) for v in values])


# --------------------------------------------------------------------------- a small built-in set
_QUESTIONS = [
    ("What is the capital of France?", ["Berlin", "Paris", "Madrid", "Rome"], 1),
    ("How many days are in a week?", ["Seven", "Five", "Ten", "Three"], 0),
    ("Which animal barks?", ["Cat", "Cow", "Dog", "Fish"], 2),
    ("What colour is the sky on a clear day?", ["Green", "Red", "Yellow", "Blue"], 3),
    ("What is two plus two?", ["Four", "Six", "One", "Nine"], 0),
    ("Which of these is a fruit?", ["Carrot", "Apple", "Potato", "Onion"], 1),
    ("What do bees make?", ["Milk", "Silk", "Honey", "Wool"], 2),
    ("Which planet do we live on?", ["Mars", "Venus", "Jupiter", "Earth"], 3),
    ("What is frozen water called?", ["Ice", "Steam", "Sand", "Glass"], 0),
    ("How many legs does a spider have?", ["Six", "Eight", "Four", "Ten"], 1),
    ("Which is the largest ocean?", ["Arctic", "Indian", "Pacific", "Atlantic"], 2),
    ("What language is this question written in?", ["French", "German", "Spanish", "English"], 3),
]


def multiple_choice_set() -> tuple[list[str], list[str], list[str]]:
    """``(texts, choices, answers)``: 12 general-knowledge questions, four options each, formatted as
    ``Question: ... A. ... B. ... Answer:``; the answer tokens are ``" A"`` .. ``" D"``."""
    letters = [" A", " B", " C", " D"]
    texts, answers = [], []
    for q, options, right in _QUESTIONS:
        body = "\n".join(f"{l.strip()}. {o}" for l, o in zip(letters, options))
        texts.append(f"Question: {q}\n{body}\nAnswer:")
        answers.append(letters[right])
    return texts, letters, answers
