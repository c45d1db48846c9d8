"""The ``streamlens`` command, called through ``main([...])``: schemas, identities, exit codes."""

from __future__ import annotations

import json

import pytest

import streamlens as sl
from streamlens.cli import build_parser, main

SUBCOMMANDS = ("trace", "attribute", "lens", "sweep", "report", "demo", "dynamics")


def run_json(capsys, argv) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_every_subcommand_has_help_with_an_example(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"streamlens {cmd}" in out
    for flag in ("--device", "--dtype", "--batch-size", "--max-tokens", "--seed", "--debug"):
        assert flag in out


def test_usage_errors_exit_2(capsys):
    for argv in (["attribute", "m", "--prompt", "x"], ["sweep", "m"], ["nope"], ["lens", "m", "--prompt", "x", "--format", "xml"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
    capsys.readouterr()


@pytest.mark.parametrize("arch,unit", [("llama", "layer"), ("gpt2", "head"), ("neox", "neuron")])
def test_attribute_json_schema_and_sum_identity(tiny_dirs, capsys, arch, unit):
    out = run_json(capsys, ["attribute", str(tiny_dirs(arch)), "--prompt", "The cat sat on the", "--target", " the",
                            "--unit", unit, "--format", "json"])
    for key in ("model", "tokens", "position", "target", "contrast", "logit", "bias", "components"):
        assert key in out
    assert out["position"] == len(out["tokens"]) - 1
    assert out["target"] == " the" and out["contrast"] is None
    comps = out["components"]
    assert {"name", "kind", "layer", "head", "value"} <= set(comps[0])
    assert {c["kind"] for c in comps} >= {"embed", "mlp", "attn" if unit == "layer" else "head" if unit == "head" else "neuron"}
    assert "bias" not in {c["kind"] for c in comps}
    total = sum(c["value"] for c in comps) + out["bias"]
    assert abs(total - out["logit"]) <= 1e-4 * max(1.0, abs(out["logit"]))
    # the logit is the model's own: compare with a plain forward pass
    model = sl.load(str(tiny_dirs(arch)))
    tr = sl.trace(model, "The cat sat on the", positions="last", layers=[0])
    tid = model.tokenizer(" the")["input_ids"][-1]
    assert abs(float(tr["logits"][0, 0, tid]) - out["logit"]) <= 1e-4 * max(1.0, abs(out["logit"]))


def test_attribute_contrast_is_a_logit_difference(tiny_dirs, capsys, tmp_path):
    folder = str(tiny_dirs("llama"))
    argv = ["attribute", folder, "--prompt", "Hello world", "--format", "json"]
    a = run_json(capsys, argv + ["--target", " the"])
    b = run_json(capsys, argv + ["--target", " a"])
    d = run_json(capsys, argv + ["--target", " the", "--contrast", " a", "--position", "0", "--out", str(tmp_path / "x.json")])
    assert d["contrast"] == " a" and d["position"] == 0
    assert abs(sum(c["value"] for c in d["components"]) + d["bias"] - d["logit"]) <= 1e-4 * max(1.0, abs(d["logit"]))
    assert json.loads((tmp_path / "x.json").read_text())["logit"] == d["logit"]
    # at the last position the difference equals the two logits' difference
    d_last = run_json(capsys, argv + ["--target", " the", "--contrast", " a"])
    assert abs(d_last["logit"] - (a["logit"] - b["logit"])) <= 1e-4


def test_attribute_table_csv_and_html(tiny_dirs, capsys, tmp_path):
    folder = str(tiny_dirs("llama"))
    assert main(["attribute", folder, "--prompt", "Hello world", "--target", " the", "--format", "csv",
                 "--html", str(tmp_path / "a.html")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("name,kind,layer,head")
    html = (tmp_path / "a.html").read_text()
    assert "passed" in html and html.count("plotly-graph-div") >= 1


@pytest.mark.parametrize("argv,words", [
    (["--target", "the cat sat on"], "not a single token"),
    (["--target", " the", "--position", "50"], "out of range"),
])
def test_attribute_bad_input_exits_1_with_one_line(tiny_dirs, capsys, argv, words):
    assert main(["attribute", str(tiny_dirs("llama")), "--prompt", "Hello world", *argv]) == 1
    err = [l for l in capsys.readouterr().err.splitlines() if "error" in l.lower()]
    assert len(err) == 1 and words in err[0] and err[0].startswith("streamlens attribute: error:")


def test_unknown_model_path_exits_1(tmp_path, capsys):
    assert main(["trace", str(tmp_path / "missing"), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(sl.StreamlensError, match="does not exist"):
        main(["trace", str(tmp_path / "missing"), "--prompt", "x", "--debug"])


def test_trace_still_works(tiny_dirs, capsys, tmp_path):
    assert main(["trace", str(tiny_dirs("gpt2")), "--prompt", "Hello world", "--out", str(tmp_path / "t.json")]) == 0
    assert "closure error" in capsys.readouterr().out
    assert json.loads((tmp_path / "t.json").read_text())["closure_error"] <= 1e-4


@pytest.mark.parametrize("cmd", ["sweep", "report", "dynamics"])
def test_empty_data_file_exits_1(tiny_dirs, tmp_path, capsys, cmd):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    argv = [cmd, str(tiny_dirs("llama")), "--data", str(empty)]
    if cmd == "report":
        argv += ["--out", str(tmp_path / "r.html")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([l for l in err.splitlines() if "error:" in l]) == 1


def test_parser_covers_every_subcommand():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(SUBCOMMANDS) | {"merge"}  # merge reads files, no model: tests/test_distributed.py


def test_sweep_writes_rows_and_resumes_an_interrupted_run(tiny_dirs, tmp_path, capsys):
    from streamlens.report.demo import demo_corpus

    data = tmp_path / "texts.txt"
    data.write_text("\n".join(demo_corpus(3)))
    folder = str(tiny_dirs("gpt2"))
    argv = ["sweep", folder, "--data", str(data), "--unit", "attn", "--max-tokens", "16"]
    full = tmp_path / "full.jsonl"
    assert main(argv + ["--out", str(full)]) == 0
    table = capsys.readouterr().out
    assert "attn.0" in table and "attn.1" in table and "kl" in table
    rows = [json.loads(l) for l in full.read_text().splitlines() if l.strip()]
    assert [r["unit"] for r in rows] == ["attn.0", "attn.1"]
    # an interrupted run: only the first row made it to disk
    part = tmp_path / "part.jsonl"
    part.write_text(full.read_text().splitlines()[0] + "\n")
    assert main(argv + ["--out", str(part)]) == 1  # refuses to overwrite without --resume
    assert "resume" in capsys.readouterr().err
    assert main(argv + ["--out", str(part), "--resume"]) == 0
    resumed = [json.loads(l) for l in part.read_text().splitlines() if l.strip()]
    assert [r["unit"] for r in resumed] == ["attn.0", "attn.1"]
    for a, b in zip(rows, resumed):
        assert abs(a["kl"] - b["kl"]) <= 1e-9 and abs(a["delta_ce"] - b["delta_ce"]) <= 1e-9


def test_sweep_bad_metric_and_missing_file_exit_1(tiny_dirs, tmp_path, capsys):
    folder = str(tiny_dirs("gpt2"))
    assert main(["sweep", folder, "--data", str(tmp_path / "nope.txt")]) == 1
    assert "does not exist" in capsys.readouterr().err
    data = tmp_path / "t.txt"
    data.write_text("some text here\n")
    assert main(["sweep", folder, "--data", str(data), "--metrics", "kl,bogus"]) == 1
    assert "bogus" in capsys.readouterr().err


def test_lens_json(tiny_dirs, capsys):
    rows = run_json(capsys, ["lens", str(tiny_dirs("llama")), "--prompt", "Hello world", "--target", " the", "--format", "json"])
    assert [r["layer"] for r in rows] == [0, 1]
    assert all(0 <= r["top_prob"] <= 1 and r["kl"] >= -1e-6 and "target_rank" in r for r in rows)
    assert rows[-1]["kl"] <= 1e-3  # the last resid_post read through the lens is the model's own output


def test_dynamics_cli(tiny_dirs, tmp_path, capsys):
    data = tmp_path / "t.txt"
    data.write_text("The residual stream is a sum.\nEach layer adds an update to it.\n")
    assert main(["dynamics", str(tiny_dirs("llama")), "--data", str(data), "--out", str(tmp_path / "d.csv")]) == 0
    assert "block_rel_update" in capsys.readouterr().out
    assert (tmp_path / "d.csv").exists()
