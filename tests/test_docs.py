"""Executable documentation: every ``>>>`` example in the package's docstrings and every code block in the
README runs here, on a tiny model standing in for SmolLM2 (the real model is exercised by the smollm2 tests).

An example that shows an output is compared with it; an example that shows none only has to run.
"""

from __future__ import annotations

import doctest
import importlib
import json
import re
import shlex
from pathlib import Path

import pytest

import streamlens as sl
from streamlens.model import zoo
from streamlens.report.demo import demo_corpus
from streamlens.testing import tiny_config

README = Path(__file__).parents[1] / "README.md"
PACKAGE = Path(sl.__file__).parent
DOC_MODULES = sorted(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
                     for p in PACKAGE.rglob("*.py") if ">>>" in p.read_text())


class _RunsOrMatches(doctest.OutputChecker):
    def check_output(self, want, got, optionflags):
        return want == "" or super().check_output(want, got, optionflags)


@pytest.fixture(scope="module")
def doc_world(tmp_path_factory, monkeypatch_module):
    """A 4-layer tiny Llama with SmolLM2's tokenizer standing in for ``smollm2-135m``, a small corpus on disk,
    and a working folder (so " Paris" is one token, as in the examples)."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo.materialise("smollm2-135m"))
    cfg, cls = tiny_config("llama", n_layers=4, vocab=len(tok), n_ctx=512)
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    assert sum(p.numel() for p in hf.parameters()) < 4_000_000  # the vocabulary is most of it
    folder = tmp_path_factory.mktemp("doc") / "llama"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    monkeypatch_module.setattr(zoo, "materialise", lambda name: folder)
    work = tmp_path_factory.mktemp("work")
    texts = demo_corpus(3)
    (work / "texts.txt").write_text("\n".join(texts))
    (work / "corpus.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    monkeypatch_module.chdir(work)
    model = sl.load("smollm2-135m")
    return {"model": model, "texts": [t[:200] for t in texts], "work": work}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.parametrize("module", DOC_MODULES)
def test_docstring_examples_run(module, doc_world):
    mod = importlib.import_module(module)
    model, texts = doc_world["model"], doc_world["texts"]
    trace = sl.trace(model, texts[:2])
    extra = {"streamlens": sl, "sl": sl, "model": model, "texts": texts, "trace": trace,
             "sweep": sl.skip_sweep(model, texts, max_tokens=16, progress=False, n_boot=20),
             "df": trace.to_dataframe()}
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(checker=_RunsOrMatches(), optionflags=doctest.ELLIPSIS)
    tests = [t for t in finder.find(mod, module, globs={**vars(mod), **extra}) if t.examples]
    assert tests, f"{module} mentions >>> but no example was found"
    for t in tests:
        t.globs.update(extra)
        report: list[str] = []
        result = runner.run(t, out=report.append)
        assert result.failed == 0, f"{t.name}: {result.failed} of {result.attempted} examples failed:\n" + "".join(report)


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S)


def test_readme_python_blocks_run(doc_world):
    ns: dict = {}
    for i, block in enumerate(_blocks("python")):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), ns)
        except Exception as e:  # noqa: BLE001 - reported with the block it came from
            raise AssertionError(f"README python block {i} failed: {type(e).__name__}: {e}\n{block}") from e


def test_readme_command_lines_run(doc_world, capsys):
    from streamlens.cli import main

    commands = [line for block in _blocks("bash") for line in block.splitlines() if line.startswith("streamlens ")]
    assert commands, "the README shows no streamlens command"
    for line in commands:
        argv = shlex.split(line)[1:]
        if argv[0] == "demo":
            argv += ["--n-docs", "2", "--max-tokens", "16"]
        assert main(argv) == 0, f"README command failed: {line}\n{capsys.readouterr().err}"
