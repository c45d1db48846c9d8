"""Nothing silent, nothing lost (issue 10): every wrong input, file and state gets a clear answer.

One test per item; each failed on the main of the day it was written and passes after the fix.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import streamlens as sl
from streamlens.cli import main
from streamlens.errors import StreamlensError, UnsupportedModelError
from streamlens.stream.inputs import encode

TEXTS = ["The cat sat on the mat because it was tired", "Python is a programming language that people like"]


@pytest.fixture
def llama(tiny_models):
    return tiny_models("llama")


@pytest.fixture
def fresh(tiny_dirs):
    """A model of its own (the test may break it)."""
    def get(arch="llama"):
        return sl.load(str(tiny_dirs(arch)))
    return get


# ------------------------------------------------------------------------- one rule for files and texts
def test_one_rule_for_file_paths_and_texts(tmp_path):
    from streamlens.stream.inputs import is_file

    assert is_file(tmp_path / "x") and is_file("t.txt") and is_file("a/b.jsonl")
    assert not is_file("The cat sat") and not is_file("line one\nends in .txt") and not is_file("notes.md")


@pytest.mark.parametrize("as_path", [str, Path])
def test_every_verb_reads_a_data_file_the_same_way(llama, tmp_path, as_path):
    f = tmp_path / "t.txt"
    f.write_text("\n".join(TEXTS))
    src = as_path(f)
    want = sl.trace_stats(llama, TEXTS, max_tokens=8, progress=False).to_dataframe()
    got = sl.trace_stats(llama, src, max_tokens=8, progress=False).to_dataframe()
    pd.testing.assert_frame_equal(got, want)
    d_file = sl.dynamics(llama, src, max_tokens=8, progress=False, gradients=False).to_dataframe()
    d_list = sl.dynamics(llama, TEXTS, max_tokens=8, progress=False, gradients=False).to_dataframe()
    pd.testing.assert_frame_equal(d_file, d_list)
    tr = sl.trace(llama, src, positions="last", layers=[0])
    assert tr.input_ids.shape[0] == 2  # two documents, not the file's name
    with pytest.raises(StreamlensError, match="does not exist"):
        sl.trace_stats(llama, tmp_path / "missing.txt", progress=False)


# ------------------------------------------------------------------------- the start token
def test_prepend_bos_is_an_explicit_recorded_choice(llama, tmp_path):
    bos = llama.tokenizer.bos_token_id
    with_bos = sl.trace(llama, "The cat sat", positions="last", layers=[0])
    without = sl.trace(llama, "The cat sat", positions="last", layers=[0], prepend_bos=False)
    assert with_bos.prepend_bos is True and without.prepend_bos is False
    assert int(with_bos.input_ids[0, 0]) == bos and int(without.input_ids[0, 0]) != bos
    assert with_bos.token_ids[0][1:] == without.token_ids[0]
    assert without.token_ids[0] == tuple(llama.tokenizer("The cat sat", add_special_tokens=False)["input_ids"])
    # every verb takes the keyword and records it
    for res in (sl.trace_stats(llama, TEXTS, max_tokens=8, progress=False, prepend_bos=False),
                sl.logit_lens(llama, "The cat sat", progress=False, prepend_bos=False),
                sl.decompose(llama, "The cat sat", " the", progress=False, prepend_bos=False),
                sl.skip_sweep(llama, TEXTS, max_tokens=8, progress=False, prepend_bos=False, n_boot=10),
                sl.dynamics(llama, TEXTS, max_tokens=8, progress=False, gradients=False, prepend_bos=False),
                sl.gradient_split(llama, TEXTS, max_tokens=8, prepend_bos=False)):
        assert res.prepend_bos is False, type(res).__name__
        assert res.token_ids and all(ids[0] != bos for ids in res.token_ids), type(res).__name__
        saved = json.loads(res.save(tmp_path / "r.json").read_text())
        assert saved["prepend_bos"] is False and saved["token_ids"] == [list(t) for t in res.token_ids]
    # it changes the numbers, which is why it is recorded
    a = sl.trace_stats(llama, TEXTS, max_tokens=8, progress=False).to_dataframe()
    b = sl.trace_stats(llama, TEXTS, max_tokens=8, progress=False, prepend_bos=False).to_dataframe()
    assert not np.allclose(a["resid_post_norm"], b["resid_post_norm"])


def test_prepend_bos_on_token_ids_and_without_a_bos_token(llama):
    ids = torch.tensor([[5, 6, 7]])
    assert encode(llama, ids).input_ids.tolist() == [[5, 6, 7]]  # ids are used as given
    assert encode(llama, ids, prepend_bos=True).input_ids.tolist() == [[llama.tokenizer.bos_token_id, 5, 6, 7]]
    with pytest.raises(StreamlensError, match="prepend_bos"):
        encode(llama, "x", prepend_bos="yes")


def test_prepend_bos_cli_flag_and_json(tiny_dirs, capsys):
    assert main(["lens", str(tiny_dirs("llama")), "--prompt", "The cat sat", "--format", "json", "--no-prepend-bos"]) == 0
    capsys.readouterr()
    assert main(["dynamics", str(tiny_dirs("llama")), "--data", "x.txt", "--no-prepend-bos", "--max-tokens", "8"]) == 1
    assert "x.txt" in capsys.readouterr().err


# ------------------------------------------------------------------------- non-finite values
def _poison(model, layer: int):
    with torch.no_grad():
        model.hf.model.layers[layer].mlp.down_proj.weight[0, 0] = float("nan")


def test_a_nan_weight_is_named_by_its_layer(fresh):
    m = fresh("llama")
    _poison(m, 1)
    with pytest.raises(StreamlensError, match=r"non-finite.*layer 1"):
        sl.trace(m, "The cat sat")
    with pytest.raises(StreamlensError, match=r"non-finite.*layer 1"):
        sl.skip_sweep(m, TEXTS, max_tokens=8, progress=False, n_boot=10)
    with pytest.raises(StreamlensError, match=r"non-finite.*layer 1"):
        sl.dynamics(m, TEXTS, max_tokens=8, progress=False)
    with pytest.raises(StreamlensError, match=r"non-finite"):
        sl.gradient_split(m, TEXTS, max_tokens=8)


def test_check_finite_helper_names_what_it_checked():
    from streamlens.stream.engine import check_finite

    check_finite(torch.ones(3), "the logits")
    with pytest.raises(StreamlensError, match="the ablated logits"):
        check_finite(torch.tensor([1.0, float("inf")]), "the ablated logits")


# ------------------------------------------------------------------------- integer-like inputs
def test_float_token_ids_are_refused(llama):
    with pytest.raises(StreamlensError, match="1.9"):
        encode(llama, [[1.9, 2.9]])
    with pytest.raises(StreamlensError, match="True"):
        encode(llama, [[True, 2]])
    assert encode(llama, [[np.int64(3), 4]]).input_ids.tolist() == [[3, 4]]


def test_numpy_ints_are_layers_and_positions_floats_are_not(llama):
    a = sl.trace(llama, "The cat sat", layers=np.int64(1), positions=np.int64(1))
    b = sl.trace(llama, "The cat sat", layers=1, positions=1)
    torch.testing.assert_close(a["resid_post", 1], b["resid_post", 1], rtol=0, atol=0)
    sl.trace(llama, "The cat sat", layers=[np.int32(0)], positions=[np.int64(-1)])
    for bad in (1.0, [1.0], True):
        with pytest.raises(StreamlensError, match="layer"):
            sl.trace(llama, "The cat sat", layers=bad)
    for bad in (1.0, [0.5], [True]):
        with pytest.raises(StreamlensError, match="position"):
            sl.trace(llama, "The cat sat", positions=bad)


@pytest.mark.parametrize("bad", [-3, 0, 2.5, True])
def test_max_tokens_must_be_a_positive_int(llama, bad):
    with pytest.raises(StreamlensError, match="max_tokens"):
        sl.trace_stats(llama, TEXTS, max_tokens=bad, progress=False)


# ------------------------------------------------------------------------- models changed behind the user's back
def test_loading_an_in_memory_model_leaves_it_untouched(tiny_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dirs("llama"))).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_dirs("llama")))
    types = [type(m) for m in hf.modules()]
    impl = hf.config._attn_implementation
    ids = torch.tensor([[5, 6, 7, 8]])
    before = hf(ids).logits
    add_bos = getattr(tok, "add_bos_token", None)
    model = sl.load(hf, tok)
    assert [type(m) for m in hf.modules()] == types and hf.config._attn_implementation == impl
    assert getattr(tok, "add_bos_token", None) == add_bos
    torch.testing.assert_close(hf(ids).logits, before, rtol=0, atol=0)
    assert model.hf is not hf
    sl.trace(model, "The cat", layers=[0])


def test_compatibility_mode_bridges_are_refused(tiny_dirs, fresh):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(tiny_dirs("llama")))
    bridge.enable_compatibility_mode()
    with pytest.raises(UnsupportedModelError, match="compatibility mode"):
        sl.load(bridge)
    m = fresh("llama")  # switched on after loading: refused by the next verb
    m.bridge.enable_compatibility_mode()
    with pytest.raises(UnsupportedModelError, match="compatibility mode"):
        sl.trace(m, "The cat")


def test_meta_device_models_are_refused(fresh):
    m = fresh("llama")
    m.hf.to("meta")
    with pytest.raises(StreamlensError, match="meta"):
        sl.trace(m, "The cat")


def test_one_submodule_in_train_mode_is_detected(fresh):
    m = fresh("llama")
    m.hf.model.layers[1].mlp.train()
    with pytest.raises(StreamlensError, match=r"train mode.*layers\.1\.mlp"):
        sl.trace(m, "The cat")


# ------------------------------------------------------------------------- concurrency
def test_two_threads_on_one_model_get_the_numbers_of_one(llama):
    prompts = ["The cat sat on the mat", "Hello there", "Python is a language"]
    want = [sl.trace(llama, p, layers=[0, 1])["resid_post", 1] for p in prompts]
    errors, results = [], {}

    def work(k):
        try:
            for i in range(6):
                results[(k, i)] = sl.trace(llama, prompts[(k + i) % 3], layers=[0, 1])["resid_post", 1]
        except Exception as e:  # noqa: BLE001 - the test reports any failure
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for (k, i), got in results.items():
        torch.testing.assert_close(got, want[(k + i) % 3], rtol=0, atol=0)



def test_a_sweep_and_a_trace_in_two_threads_get_their_own_numbers(llama):
    """The evaluator's clean pass records block inputs with pre-hooks: under the model's lock, like every hook."""
    texts = ["The cat sat on the mat today", "Hello there my friend"]
    want_sweep = sl.skip_sweep(llama, texts, max_tokens=8, progress=False, n_boot=20).to_dataframe()
    want_trace = sl.trace(llama, "Python is a language")["resid_post", 1]
    errors, got = [], {}

    def sweep():
        try:
            got["sweep"] = sl.skip_sweep(llama, texts, max_tokens=8, progress=False, n_boot=20).to_dataframe()
        except Exception as e:  # noqa: BLE001 - the test reports any failure
            errors.append(e)

    def traces():
        try:
            got["trace"] = [sl.trace(llama, "Python is a language")["resid_post", 1] for _ in range(5)]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=sweep), threading.Thread(target=traces)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    pd.testing.assert_frame_equal(got["sweep"], want_sweep)
    for t in got["trace"]:
        torch.testing.assert_close(t, want_trace, rtol=0, atol=0)



def test_attached_holds_the_models_lock_even_with_no_hook(llama):
    """A caller that runs the model's modules itself passes the model: its lock is held with no hook attached."""
    from streamlens.model import hooks

    seen, lock = [], hooks.model_lock(llama.bridge)

    def probe():
        got = lock.acquire(blocking=False)
        if got:
            lock.release()
        seen.append(got)

    with hooks.attached([], model=llama.bridge):
        t = threading.Thread(target=probe)
        t.start()
        t.join()
    t = threading.Thread(target=probe)
    t.start()
    t.join()
    assert seen == [False, True]


# ------------------------------------------------------------------------- verdicts that test their claims
def test_claims_use_scale_free_statistics_and_state_what_they_measured(llama):
    d = sl.dynamics(llama, TEXTS, max_tokens=8, progress=False, compare_init=True, drop_residual=[1])
    c = d.claims().set_index("claim")
    assert "measured" in c.columns and c["measured"].str.len().min() > 40
    reach = c.loc[[k for k in c.index if "reaches early layers" in k][0]]
    t = d.variant("trained")
    # ‖g‖·‖x‖ (the gradient per unit of stream) at layer 0 over the last layer: the 1/‖x‖ of the norms cancels
    want = float(t["grad_stream_scaled"].iloc[0] / t["grad_stream_scaled"].iloc[-1])
    assert abs(reach["value"] - want) <= 1e-12
    collapse = [k for k in c.index if "collapses" in k]
    assert len(collapse) == 1 and "initialisation" in collapse[0]
    i, idrop = d.variant("init"), d.variant("init_dropped")
    want = float(idrop["grad_stream_scaled"].iloc[0] / i["grad_stream_scaled"].iloc[0])
    assert abs(c.loc[collapse[0], "value"] - want) <= 1e-12
    # without an initialised copy the collapse claim is not decided on the trained model
    d2 = sl.dynamics(llama, TEXTS, max_tokens=8, progress=False, drop_residual=[1])
    row = d2.claims().set_index("claim").loc[collapse[0]]
    assert row["supported"] is None and "compare_init" in row["measured"]


# ------------------------------------------------------------------------- reports never lose data
def test_report_never_overwrites_a_file_it_did_not_create(llama, tmp_path):
    from streamlens.report.build import build_report

    mine = tmp_path / "skip_sweep.jsonl"
    mine.write_text("my precious rows\n")
    with pytest.raises(StreamlensError, match="skip_sweep.jsonl"):
        build_report(llama, TEXTS, tmp_path / "report.html", max_tokens=8, progress=False, gradients=False)
    assert mine.read_text() == "my precious rows\n" and not (tmp_path / "report.html").exists()
    res = build_report(llama, TEXTS, tmp_path / "report.html", max_tokens=8, progress=False, gradients=False, force=True)
    assert mine.read_text() != "my precious rows\n" and res.report.exists()


def test_report_cli_writes_a_folder_of_its_own_and_says_where(tiny_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dynamics.csv").write_text("mine\n")
    data = tmp_path / "t.txt"
    data.write_text("\n".join(TEXTS))
    assert main(["report", str(tiny_dirs("llama")), "--data", str(data), "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "streamlens-report"
    assert (folder / "report.html").exists() and str(folder.name) in out
    assert (tmp_path / "dynamics.csv").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dynamics.csv", "streamlens-report", "t.txt"]
    # a second run into the same folder is refused without --force, and allowed with it
    assert main(["report", str(tiny_dirs("llama")), "--data", str(data), "--max-tokens", "8"]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["report", str(tiny_dirs("llama")), "--data", str(data), "--max-tokens", "8", "--force"]) == 0


# ------------------------------------------------------------------------- the CLI: one line, exit 1
def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_cli_failures_are_one_line(tiny_dirs, tmp_path, capsys, monkeypatch):
    model = str(tiny_dirs("llama"))
    capsys.readouterr()  # building the tiny model may print progress bars
    _one_line_error(capsys, ["attribute", model, "--prompt", "The cat", "--target", ""], "target")
    if not torch.cuda.is_available():
        _one_line_error(capsys, ["trace", model, "--device", "cuda"], "cuda")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "trunc')
    _one_line_error(capsys, ["dynamics", model, "--data", str(bad)], "bad.jsonl", "line 2")
    _one_line_error(capsys, ["dynamics", model, "--data", "notes.csv"], "notes.csv")  # a file, never a text
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    _one_line_error(capsys, ["sweep", model, "--data", str(binary)], "bin.txt")
    rows = tmp_path / "rows.jsonl"  # a resume file with a truncated last line
    rows.write_text('{"unit": "block.0", "kl": 0.1}\n{"unit": "blo')
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(TEXTS))
    _one_line_error(capsys, ["sweep", model, "--data", str(texts), "--out", str(rows), "--resume", "--max-tokens", "8"])
    corrupted = tmp_path / "model"
    corrupted.mkdir()
    (corrupted / "config.json").write_text("{not json")
    _one_line_error(capsys, ["trace", str(corrupted)], "model")

    # anything unexpected is one line too, and --debug gives the traceback
    def boom(*a, **k):
        raise KeyError("deep")

    import streamlens.stream.trace as trace_mod

    monkeypatch.setattr(trace_mod, "trace", boom)
    _one_line_error(capsys, ["trace", model], "KeyError", "--debug")
    with pytest.raises(KeyError):
        main(["trace", model, "--debug"])


def test_dynamics_cli_has_the_library_options_and_prints_claims(tiny_dirs, tmp_path, capsys):
    data = tmp_path / "t.txt"
    data.write_text("\n".join(TEXTS))
    out = tmp_path / "d.json"
    assert main(["dynamics", str(tiny_dirs("llama")), "--data", str(data), "--max-tokens", "8", "--compare-init",
                 "--drop-residual", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "gradient highway" in printed and "collapses" in printed
    saved = json.loads(out.read_text())
    assert {c["claim"] for c in saved["claims"]} >= {"the stream grows with depth"}
    assert saved["settings"]["compare_init"] is True and saved["settings"]["drop_residual"] == [1]
    assert saved["settings"]["max_tokens"] == 8 and saved["settings"]["prepend_bos"] is True
    assert set(pd.DataFrame(saved["layers"])["variant"]) == {"trained", "init", "dropped", "init_dropped"}


# ------------------------------------------------------------------------- smaller gaps
def test_head_heatmap_says_mlps_are_left_out(llama):
    dec = sl.decompose(llama, "The cat sat", " the", unit="head", progress=False)
    assert "MLP" in dec.plot().layout.title.text


def test_gradient_split_renders_briefly(llama):
    g = sl.gradient_split(llama, TEXTS, max_tokens=8)
    assert len(repr(g)) < 300 and len(g._repr_html_()) < 20_000


def test_ci_installs_chromium_for_the_render_check():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "apt-get install -y chromium" in ci and "apt-get update" in ci


def test_skip_metrics_refuse_non_finite_ablated_logits(llama):
    """A removal whose logits hold NaN gives an error, never top1 = 1.0 beside kl = nan."""
    from streamlens.skip.metrics import row_metrics

    from streamlens.skip.streaming import clean_pass

    ev = sl.LayerSkipEvaluator(llama, TEXTS, max_tokens=8, progress=False, n_boot=10)
    lo, batch, sel = ev.data_batches[0]  # the evaluator streams: one batch's clean pass, made here
    clean = clean_pass(llama, batch, sel, lo, 5)
    lg = clean.logp.exp().log().clone()
    lg[0, 0] = float("nan")
    fine = row_metrics(clean, clean.logp, clean.final, ("kl", "top1"))
    assert float(fine["kl"].abs().max()) <= 1e-6 and float(fine["top1"].min()) == 1.0
    with pytest.raises(StreamlensError, match="non-finite"):
        row_metrics(clean, lg, clean.final, ("kl", "top1"))
