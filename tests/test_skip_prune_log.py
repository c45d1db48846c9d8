"""Pruning curves written to a file step by step and resumed after an interruption: the same curve."""

import json
import math

import pandas as pd
import pytest

import streamlens as sl
from streamlens.cli import main
from streamlens.report.demo import pydoc_texts

TEXTS = [t[:300] for t in pydoc_texts()[:5]]
KW = {"max_tokens": 20, "batch_size": 2, "progress": False, "n_boot": 200}
METRICS = ("kl", "ce", "top1")


def _same(a: pd.DataFrame, b: pd.DataFrame):
    assert list(a.columns) == list(b.columns)
    for col in a.columns:
        for x, y in zip(a[col], b[col]):
            same = x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)) \
                or (x is None and y is None) or (pd.isna(x) and pd.isna(y))
            assert same, (col, x, y)
    assert len(a) == len(b)


class Interrupted(Exception):
    pass


def _interrupt_after(ev, calls: int):
    """Make ``ev``'s ``calls + 1``-th streaming pass (step ``calls``) fail, as a kill during that step would."""
    real, seen = ev.evaluate_many, []

    def evaluate_many(*a, **k):
        if len(seen) == calls:
            raise Interrupted(f"killed during step {calls}")
        seen.append(1)
        return real(*a, **k)

    ev.evaluate_many = evaluate_many


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_an_interrupted_curve_resumes_to_the_same_curve(tiny_models, tmp_path, suffix):
    m = tiny_models("llama")
    want = sl.LayerSkipEvaluator(m, TEXTS, **KW).prune(3, unit="head", mode="mean").to_dataframe()
    for k in (0, 1, 2, 3):  # killed during step k: steps 0..k-1 are on disk
        out = tmp_path / f"curve{k}{suffix}"
        ev = sl.LayerSkipEvaluator(m, TEXTS, **KW)
        _interrupt_after(ev, k)
        with pytest.raises(Interrupted):
            ev.prune(3, unit="head", mode="mean", out=out)
        log = [json.loads(x) for x in (tmp_path / f"curve{k}{suffix}.steps.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log[1:]] == list(range(k))
        with pytest.raises(sl.StreamlensError, match="resume=True"):
            sl.LayerSkipEvaluator(m, TEXTS, **KW).prune(3, unit="head", mode="mean", out=out)
        ev = sl.LayerSkipEvaluator(m, TEXTS, **KW)
        passes = []
        real = ev.evaluate_many
        ev.evaluate_many = lambda *a, **kw: (passes.append(1), real(*a, **kw))[1]
        got = ev.prune(3, unit="head", mode="mean", out=out, resume=True).to_dataframe()
        assert len(passes) == 4 - k  # only the unfinished steps ran
        _same(got, want)
        on_disk = pd.read_csv(out) if suffix == ".csv" else pd.read_json(out, lines=True, precise_float=True)
        assert list(on_disk["removed"].fillna("")) == list(want["removed"])
        for col in ("kl", "delta_ce", "top1_hi"):
            assert list(on_disk[col]) == list(want[col]), col


def test_a_curve_extends_and_a_different_run_is_refused(tiny_models, tmp_path):
    m = tiny_models("llama")
    out = tmp_path / "curve.csv"
    ev = sl.LayerSkipEvaluator(m, TEXTS, **KW)
    ev.prune(1, unit="head", out=out)
    longer = ev.prune(3, unit="head", out=out, resume=True).to_dataframe()
    _same(longer, sl.LayerSkipEvaluator(m, TEXTS, **KW).prune(3, unit="head").to_dataframe())
    _same(ev.prune(2, unit="head", out=out, resume=True).to_dataframe(), longer.iloc[:3].reset_index(drop=True))
    with pytest.raises(sl.StreamlensError, match=r"by: 'kl' in the file, 'delta_ce' now"):
        ev.prune(3, unit="head", by="ce", out=out, resume=True)
    with pytest.raises(sl.StreamlensError, match=r"mode: 'skip' in the file, 'mean' now.*"):
        ev.prune(3, unit="head", mode="mean", out=out, resume=True)
    with pytest.raises(sl.StreamlensError, match=r"max_tokens: 20 in the file, 16 now"):
        sl.LayerSkipEvaluator(m, TEXTS, **{**KW, "max_tokens": 16}).prune(3, unit="head", out=out, resume=True)
    with pytest.raises(sl.StreamlensError, match=r"data: '[0-9a-f]+' in the file, '[0-9a-f]+' now"):
        sl.LayerSkipEvaluator(m, TEXTS[:4], **KW).prune(3, unit="head", out=out, resume=True)
    with pytest.raises(sl.StreamlensError, match=r"metrics: .* in the file, .* now"):
        ev.prune(3, unit="head", metrics=("kl", "top1"), out=out, resume=True)
    with pytest.raises(sl.StreamlensError, match=r"model: .*weights: .*"):
        sl.LayerSkipEvaluator(tiny_models("gpt2"), TEXTS, **KW).prune(2, unit="head", out=out, resume=True)
    # a table without its log is not taken for one
    (tmp_path / "orphan.csv").write_text("step,unit\n0,none\n")
    with pytest.raises(sl.StreamlensError, match="without its steps log"):
        ev.prune(2, unit="head", out=tmp_path / "orphan.csv", resume=True)
    # a line cut off by a kill is dropped (that step is redone), with a warning
    log = tmp_path / "curve.csv.steps.jsonl"
    log.write_bytes(log.read_bytes() + b'{"step": 4, "un')
    with pytest.warns(UserWarning, match="cut off"):
        _same(ev.prune(3, unit="head", out=out, resume=True).to_dataframe(), longer)


def test_the_command_line_writes_and_resumes_a_curve(tiny_dirs, tmp_path, capsys):
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(t.replace("\n", " ") for t in TEXTS) + "\n")
    args = ["sweep", str(tiny_dirs("llama")), "--data", str(data), "--unit", "mlp", "--max-tokens", "20",
            "--batch-size", "2", "--out", str(tmp_path / "curve.csv")]
    assert main([*args, "--prune", "1"]) == 0
    assert main([*args, "--prune", "2"]) == 1 and "resume" in capsys.readouterr().err
    assert main([*args, "--prune", "2", "--resume"]) == 0
    want = sl.LayerSkipEvaluator(sl.load(str(tiny_dirs("llama"))), sl.load_texts(data), max_tokens=20, batch_size=2,
                                 progress=False).prune(2, unit="mlp").to_dataframe()
    got = pd.read_csv(tmp_path / "curve.csv")
    assert list(got["unit"]) == list(want["unit"])
    for col in ("kl", "kl_lo", "delta_ce", "top1"):
        assert list(got[col]) == list(want[col]), col
    assert main([*args, "--prune", "2", "--resume", "--by", "ce"]) == 1
    assert "by: 'kl' in the file, 'delta_ce' now" in capsys.readouterr().err
    assert main([*args, "--prune", "2", "--shard", "0/2"]) == 1 and "--prune" in capsys.readouterr().err
