"""Evaluation data: a list of texts, a text file (one document per line) or a JSONL file.

    >>> load_texts(["first document", "second document"])
    >>> load_texts("corpus.txt")                 # one document per non-blank line
    >>> load_texts("corpus.jsonl", field="text") # one JSON object per line
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from streamlens.errors import StreamlensError


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
