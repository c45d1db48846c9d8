"""Data sets: the one rule that tells a file from a text, and :func:`load_texts`.

A ``pathlib.Path`` (any ``os.PathLike``), or a string that ends in ``.txt`` or ``.jsonl`` and has no
line break, is a data file; anything else is text (:func:`is_file`). Every verb applies this rule
(through :func:`streamlens.stream.inputs.encode` and :func:`~streamlens.stream.inputs.batches`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from streamlens.errors import StreamlensError


def is_file(source) -> bool:
    """The one rule for every verb: a ``Path`` (any ``os.PathLike``), or a string ending in ``.txt`` / ``.jsonl``
    without a line break, is a data file; anything else is text."""
    if isinstance(source, os.PathLike):
        return True
    return isinstance(source, str) and "\n" not in source and "\r" not in source \
        and source.strip().lower().endswith((".txt", ".jsonl"))



def load_texts(source: str | os.PathLike | Sequence[str], *, field: str = "text") -> list[str]:
    """Documents as a list of non-empty strings.

    Args:
        source: a list of strings; a ``.txt`` file (one document per line, blank lines skipped);
            a ``.jsonl`` file with one JSON object per line (blank lines skipped); by the one rule
            (:func:`is_file`) any other string is one document.
        field: the key holding the text in each JSONL object.
    """
    if is_file(source):
        return _from_file(Path(source), field)
    if isinstance(source, str):  # not a file by the one rule: one document
        source = [source]
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


def _from_file(path: Path, field: str) -> list[str]:
    if not path.exists():
        raise StreamlensError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise StreamlensError(f"data file {str(path)!r} must end in .txt (one document per line) or .jsonl")
    if path.is_dir():
        raise StreamlensError(f"data file {str(path)!r} is a folder")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise StreamlensError(f"data file {str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason})") from e
    except OSError as e:
        raise StreamlensError(f"cannot read data file {str(path)!r}: {e.strerror or e}") from e
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
