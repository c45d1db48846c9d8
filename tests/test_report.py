"""Report writers and the demo pipeline (tiny model; SmolLM2 with small settings)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import streamlens as sl
from streamlens.present import html as rp_html, tables as rp
from streamlens.report import build, demo
from streamlens.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _fig():
    import plotly.graph_objects as go

    return go.Figure(go.Bar(x=[0, 1], y=[1, 2]))


def test_plotly_js_is_embedded_once_and_nothing_is_fetched(tmp_path):
    rep = rp_html.HtmlReport("t")
    rep.facts("Model", {"n_layers": 2})
    rep.figure("a", _fig())
    rep.figure("b", _fig())
    html = rep.write(tmp_path / "r.html").read_text()
    assert html.count('class="plotly-graph-div"') == 2
    assert html.count("define(\"plotly\"") <= 1 and len(html) > 1_000_000  # the inline bundle, once
    no_js = rp_html.HtmlReport("t")
    no_js.figure("a", _fig())
    assert len(html) - len(no_js.to_html()) < 100_000  # the second figure did not bring plotly.js again
    assert re.search(r"<script[^>]*\bsrc=", html) is None  # every script is inline


def test_check_section_says_failed_when_over_tolerance():
    rep = rp_html.HtmlReport("t")
    rep.check("closure", 1e-3, 1e-4)
    rep.check("other", 1e-6, 1e-4)
    html = rep.to_html()
    assert "closure: FAILED" in html and "other: passed" in html


def test_mean_interval_against_a_direct_computation():
    df = pd.DataFrame({"layer": [0, 0, 0, 1, 1], "value": [1.0, 2.0, 4.0, -1.0, 3.0]})
    out = rp.mean_interval(df, ["layer"]).set_index("layer")
    for layer, vals in ((0, [1.0, 2.0, 4.0]), (1, [-1.0, 3.0])):
        t = torch.tensor(vals, dtype=torch.float64)
        sem = float(t.std() / math.sqrt(len(vals)))
        assert abs(out.loc[layer, "mean"] - float(t.mean())) <= 1e-12
        assert abs(out.loc[layer, "sem"] - sem) <= 1e-12
        assert abs(out.loc[layer, "hi"] - (float(t.mean()) + 1.96 * sem)) <= 1e-12


def test_jsonable_turns_tensors_frames_and_nan_into_json(tmp_path):
    obj = {"t": torch.tensor([1.5, 2.0]), "df": pd.DataFrame({"a": [1]}), "nan": float("nan"), "p": tmp_path}
    back = json.loads(rp.write_json(obj, tmp_path / "x.json").read_text())
    assert back == {"t": [1.5, 2.0], "df": [{"a": 1}], "nan": None, "p": str(tmp_path)}


def test_demo_corpus_is_prose_from_pydoc():
    texts = demo.demo_corpus(5)
    assert len(texts) == 5 and len(set(texts)) == 5
    assert all(len(t) >= 300 and "\n" not in t for t in texts)


@pytest.fixture(scope="module")
def tiny_demo(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return demo.run_demo(str(tiny_dirs("llama")), out, n_docs=3, max_tokens=24, n_prompts=2, progress=False), out


def test_demo_on_a_tiny_model_writes_every_section(tiny_demo, tiny_models):
    res, out = tiny_demo
    assert res.missing == {}, res.missing
    html = res.report.read_text()
    for heading in ("Model", "Direct logit attribution", "Attention reads across positions", "Information flow",
                    "Attention patterns", "Residual-stream trace", "Layer × position", "Logit lens", "Skip sweep",
                    "Dynamics"):
        assert heading in html
    assert html.count("plotly-graph-div") >= 9 and "FAILED" not in html
    for name in ("decompose_layer", "decompose_layer_mean", "decompose_source", "flow_graph", "trace_corpus",
                 "logit_lens", "skip_sweep", "dynamics"):
        assert (out / f"{name}.csv").exists(), name
    summary = json.loads((out / "report_summary.json").read_text())
    assert summary["arch"]["n_layers"] == 2 and not summary["missing"]


def test_demo_numbers_are_the_models_own(tiny_demo, tiny_models):
    res, out = tiny_demo
    model = tiny_models("llama")
    s = res.summary.set_index("quantity")["value"]
    texts = demo.demo_corpus(3)
    prompts = build._prompts_from(model, texts, 2, 16)
    assert abs(float(s["closure error"]) - sl.trace(model, prompts).closure_error()) <= 1e-12
    assert float(s["exactness error"]) <= build.DECOMPOSE_TOL
    stats = sl.trace_stats(model, texts, max_tokens=24, progress=False).to_dataframe()
    assert abs(float(s["median block update (rel.)"]) - stats["block_rel_update"].median()) <= 1e-9
    sweep = pd.read_csv(out / "skip_sweep.csv")
    assert len(sweep) == model.arch.n_layers and (sweep["kl_lo"] <= sweep["kl"] + 1e-12).all()
    assert abs(float(s["median KL of one removal"]) - sweep["kl"].median()) <= 1e-9
    # the per-layer means are the means of the per-prompt contributions in the CSV
    per = pd.read_csv(out / "decompose_layer.csv")
    mean = pd.read_csv(out / "decompose_layer_mean.csv")
    want = per[per["component"] == "attn.1"]["value"].mean()
    assert abs(mean[mean["component"] == "attn.1"]["mean"].iloc[0] - want) <= 1e-9


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(tiny_demo, tmp_path):
    res, _ = tiny_demo
    spec = importlib.util.spec_from_file_location("render_report", ROOT / "scripts" / "render_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.check(res.report, tmp_path / "r.png") == []
    blank = tmp_path / "blank.html"
    blank.write_text("<html><body></body></html>")
    assert mod.check(blank, tmp_path / "b.png")  # the check can fail


def test_report_cli_over_a_data_file(tiny_dirs, tmp_path, capsys):
    data = tmp_path / "texts.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in demo.demo_corpus(3)))
    assert main(["report", str(tiny_dirs("gpt2")), "--data", str(data), "--out", str(tmp_path / "r" / "rep.html"),
                 "--max-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "report:" in out and "closure error" in out
    assert (tmp_path / "r" / "rep.html").exists() and (tmp_path / "r" / "skip_sweep.csv").exists()


@pytest.mark.smollm2
def test_demo_on_smollm2_small_settings(smollm2, tmp_path):
    res = demo.run_demo(smollm2, tmp_path, n_docs=2, max_tokens=16, n_prompts=2, gradients=False, progress=False)
    assert res.missing == {}
    s = res.summary.set_index("quantity")["value"]
    assert float(s["closure error"]) <= build.CLOSURE_TOL and float(s["exactness error"]) <= build.DECOMPOSE_TOL
    assert len(pd.read_csv(tmp_path / "skip_sweep.csv")) == 30
    assert "SmolLM2" in res.report.read_text() or "smollm2" in res.report.read_text()


def test_report_on_a_post_norm_model_says_what_it_did_not_compute(tiny_models, tmp_path):
    """BERT has no exact per-writer decomposition and no identity-path gradient: those sections are
    marked "not computed" with the library's reason; everything else is still computed."""
    res = build.build_report(tiny_models("bert"), demo.demo_corpus(2), tmp_path / "bert.html", n_prompts=1,
                            max_tokens=16, progress=False)
    assert "Direct logit attribution" in res.missing and "post-norm" in res.missing["Direct logit attribution"]
    html = res.report.read_text()
    assert "not computed" in html and "Skip sweep" in html
    assert (tmp_path / "skip_sweep.csv").exists()
