"""The runnable scripts in examples/, each run in-process on a tiny model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

import streamlens as sl

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_attribution_report(tiny_dirs, tmp_path, capsys):
    assert load("attribution_report").main(["--model", str(tiny_dirs("gpt2")), "--out", str(tmp_path)]) == 0
    assert "report:" in capsys.readouterr().out
    per_layer = pd.read_csv(tmp_path / "per_layer.csv")
    comps = pd.read_csv(tmp_path / "components.csv")
    # per prompt, the components add up to the model's logit
    for _, g in comps.groupby("prompt"):
        assert abs(g["value"].sum() - g["model_value"].iloc[0]) <= 1e-4 * max(1.0, abs(g["model_value"].iloc[0]))
    assert set(per_layer["block_part"]) >= {"attn", "mlp", "embed", "bias"}
    assert "passed" in (tmp_path / "attribution.html").read_text()


def test_sweep_pruning(tiny_dirs, tmp_path, capsys):
    data = tmp_path / "t.txt"
    data.write_text("The stream is a sum of writes.\nEach block adds an update.\nRemoving one may not hurt.\n")
    assert load("sweep_pruning").main(["--model", str(tiny_dirs("llama")), "--data", str(data), "--prune", "2",
                                       "--max-tokens", "16", "--out", str(tmp_path / "p")]) == 0
    curve = pd.read_csv(tmp_path / "p" / "pruning_curve.csv")
    assert curve["step"].tolist() == [0, 1, 2] and curve["kl"].iloc[0] == 0
    assert len(pd.read_csv(tmp_path / "p" / "single.csv")) == 2
    assert (tmp_path / "p" / "pruning.html").exists()


def test_small_refinements_matches_trace_stats(tiny_dirs, tiny_models, tmp_path, capsys):
    out = tmp_path / "r.csv"
    assert load("small_refinements").main(["--model", str(tiny_dirs("neox")), "--max-tokens", "16",
                                           "--threshold", "0.5", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    df = pd.read_csv(out)
    from streamlens.report.demo import demo_corpus

    want = sl.trace_stats(tiny_models("neox"), demo_corpus(8), max_tokens=16, progress=False).to_dataframe()
    pd.testing.assert_series_equal(df["block_rel_update"], want["block_rel_update"], check_names=False)
    assert f"{int((want['block_rel_update'] < 0.5).sum())}/{len(want)} layers" in text


@pytest.mark.parametrize("name", ["attribution_report", "sweep_pruning", "small_refinements"])
def test_every_example_takes_model_and_has_a_docstring(name):
    mod = load(name)
    assert mod.__doc__ and "--model" in (EXAMPLES / f"{name}.py").read_text()
