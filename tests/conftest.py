"""Session-scoped tiny models (random weights, built through config constructors) and SmolLM2."""

from __future__ import annotations

import warnings

import pytest

import streamlens as sl
from streamlens.testing import build_tiny

warnings.filterwarnings("ignore")

# The four architectures every feature is tested on; the rest are covered by the capture tests.
CORE_ARCHS = ("gpt2", "neox", "llama", "bert")
MORE_ARCHS = ("gptj", "gemma", "gemma2", "opt", "qwen2")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Folder per tiny architecture, built once per session (lazily)."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, object] = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = build_tiny(arch, root / arch)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs):
    cache: dict[str, sl.Model] = {}

    def get(arch: str) -> sl.Model:
        if arch not in cache:
            cache[arch] = sl.load(str(tiny_dirs(arch)))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def smollm2():
    return sl.load("smollm2-135m")


PROMPTS = ["The cat sat on the mat because it was", "Hello", "Python is a programming language"]


@pytest.fixture(scope="session")
def induction_model(tmp_path_factory):
    """A 2-layer GPT-2 trained (seeded, ~10 s) to do induction on repeated random tokens."""
    from streamlens.testing import train_induction_model

    return sl.load(str(train_induction_model(tmp_path_factory.mktemp("induction") / "model")))
