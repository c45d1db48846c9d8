"""The shape of the package: no import loop, no shadowed module, no private import across modules, small modules,
one result contract, and a command line that starts without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import streamlens as sl
from streamlens.present.results import Result

ROOT = Path(sl.__file__).parent
MODULES = {".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"): p
           for p in ROOT.rglob("*.py")}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """Module-level imports of ``path`` (inside ``if TYPE_CHECKING`` and functions excluded): ``(module, names)``."""
    tree = ast.parse(path.read_text())
    out = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def _targets(module: str, names: list[str]) -> list[str]:
    """The streamlens modules an import statement loads (``from pkg import sub`` loads ``pkg.sub``)."""
    found = [module] if module in MODULES else []
    found += [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
    return found


def test_no_import_cycle():
    graph = {m: sorted({t for mod, names in _imports(p) for t in _targets(mod, names) if t != m})
             for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for t in graph[m]:
            visit(t, stack + [m])
        state[m] = 2

    for m in graph:
        visit(m, [])


def test_no_private_name_imported_across_modules():
    bad = [f"{m}: from {mod} import {n}" for m, p in MODULES.items() for mod, names in _imports(p)
           if mod.startswith("streamlens") for n in names if n.startswith("_")]
    assert not bad, bad


def test_no_module_shadowed_by_a_public_name():
    subs = {m.split(".")[1] for m in MODULES if m.count(".") >= 1}
    assert not subs & set(sl.__all__), subs & set(sl.__all__)
    for name in sl.__all__:
        getattr(sl, name)  # every public name resolves
    import streamlens.depth.claims as claims_module

    assert claims_module.__name__ == "streamlens.depth.claims" and callable(sl.dynamics)


def test_modules_stay_small():
    big = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 420}
    assert not big, f"modules over ~400 lines: {big}"


def test_every_result_type_follows_the_contract(tiny_models, tmp_path):
    m = tiny_models("gpt2")
    results = [sl.trace(m, "Hello world"), sl.trace_stats(m, ["Hello world", "A test"], progress=False),
               sl.decompose(m, ["Hello world"], " the", progress=False),
               sl.logit_lens(m, "Hello world", progress=False),
               sl.skip_sweep(m, ["Hello world again", "A test of it"], max_tokens=8, progress=False, n_boot=20),
               sl.dynamics(m, ["Hello world again", "A test of it"], progress=False),
               sl.gradient_split(m, ["Hello world again"])]
    for r in results:
        assert isinstance(r, Result), type(r)
        df = r.to_dataframe()
        assert len(df) > 0
        assert r._repr_html_().startswith(f"<b>{type(r).__name__}</b>")
        for suffix in (".csv", ".jsonl", ".json", ".html"):
            assert r.save(tmp_path / f"{type(r).__name__}{suffix}").stat().st_size > 0
        with pytest.raises(sl.StreamlensError, match=r"cannot save a \w+ as 'x.parquet': use one of .csv"):
            r.save(tmp_path / "x.parquet")
    assert len(repr(results[-1])) < 300  # a gradient split does not print its tensors


def test_the_command_line_starts_without_torch():
    code = ("import sys, streamlens.cli as c\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'pandas' not in sys.modules, sorted(sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "usage: streamlens" in out.stdout
