"""The streaming evaluator reproduces the evaluator it replaced, number for number; resume; the files it writes."""

import gc
import math
import weakref

import pytest
import torch

import streamlens as sl
from streamlens.report.demo import pydoc_texts
from streamlens.skip import evaluator as evmod
from streamlens.skip import streaming
from streamlens.skip.docsums import DocSums

from reference_skip import OldEvaluator

TEXTS = [t[:400] for t in pydoc_texts()[:5]]
ALL = ("kl", "ce", "top1", "topk", "angle")
SWEEPS = (("block", "skip", None), ("attn", "skip", None), ("mlp", "mean", None), ("head", "mean", None),
          ("span", "drop-residual", 2), ("block", "mean", None))


def _kw(**kw):
    return {"max_tokens": 24, "batch_size": 2, "progress": False, "n_boot": 200, **kw}


def _same_rows(new_table, old, mode, metrics=ALL):
    """Every row of ``new_table`` equals the old evaluator's ``evaluate`` of its unit, bit for bit."""
    for _, r in new_table.iterrows():
        want = old.evaluate(r["unit"], mode, metrics)
        for k, v in want.items():
            assert r[k] == v or (math.isnan(r[k]) and math.isnan(v)), (r["unit"], k, r[k], v)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt", "bert"])
def test_every_sweep_equals_the_old_evaluator(tiny_models, arch):
    m = tiny_models(arch)
    old = OldEvaluator(m, TEXTS, **_kw())
    for vpp in (1, None):  # None: the default on a CPU
        ev = sl.LayerSkipEvaluator(m, TEXTS, variants_per_pass=vpp, **_kw())
        assert ev.strategy == old.strategy
        for unit, mode, width in SWEEPS:
            if arch == "bert" and unit in ("head", "span"):
                continue
            sweep = ev.sweep(unit, mode=mode, width=width, metrics=ALL)
            _same_rows(sweep.to_dataframe(), old, mode)
        assert ev.block_influence() == old.block_influence()
    assert ev.evaluate(["head.1.0", "mlp.0"], "skip", ALL) == old.evaluate(["head.1.0", "mlp.0"], "skip", ALL)


def test_chunked_metrics_equal_whole_batch_metrics(tiny_models, monkeypatch):
    """The metrics are computed a few rows at a time, in place; chunks of 1 and 3 rows (and a SmolLM2-sized
    vocabulary) give the old whole-batch numbers bit for bit, with NaN and inf still refused."""
    import reference_skip
    from streamlens.skip import metrics as mmod
    from streamlens.skip.streaming import CleanBatch

    m = tiny_models("llama")
    old = OldEvaluator(m, TEXTS, **_kw())
    for rows in (1, 3):
        monkeypatch.setattr(mmod, "CHUNK_BYTES", rows * 4 * m.arch.d_vocab)
        assert len(mmod.row_chunks(7, m.arch.d_vocab)) == -(-7 // rows)
        ev = sl.LayerSkipEvaluator(m, TEXTS, **_kw())
        _same_rows(ev.sweep("block", metrics=ALL).to_dataframe(), old, "skip")
    monkeypatch.undo()
    g = torch.Generator().manual_seed(0)
    n, vocab = 101, 49152
    logp = torch.log_softmax(3 * torch.randn(n, vocab, generator=g), -1)
    target = torch.randint(0, vocab, (n,), generator=g)
    has = torch.rand(n, generator=g) > 0.2
    fin = torch.randn(n, 8, generator=g)
    c = CleanBatch(None, None, None, has, torch.where(has, target, 0), logp, logp.argmax(-1), logp.topk(5, -1).indices,
                   fin, None, None)
    lg = 3 * torch.randn(n, vocab, generator=g)
    cols = mmod.metric_names(ALL)
    got, want = mmod.row_metrics(c, lg, fin + 0.1, cols), reference_skip.row_metrics(c, lg, fin + 0.1, cols)
    assert len(mmod.row_chunks(n, vocab)) > 1 and set(got) == set(want) == set(cols)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    for bad in (float("nan"), float("inf"), -float("inf")):
        for names in (cols, ("top1",), ("delta_ce",)):
            worse = lg.clone()
            worse[5, 7] = bad
            with pytest.raises(sl.StreamlensError, match="non-finite"):
                mmod.row_metrics(c, worse, fin, names)


@pytest.mark.parametrize("positions", ["last", slice(5, None), [0, -2], "mask"])
def test_positions_and_batch_sizes_equal_the_old_evaluator(tiny_models, positions):
    m = tiny_models("llama")
    if positions == "mask":
        positions = torch.rand(len(TEXTS), 24, generator=torch.Generator().manual_seed(3)) > 0.5
    for bs in (1, 3):
        old = OldEvaluator(m, TEXTS, **_kw(positions=positions, batch_size=bs))
        ev = sl.LayerSkipEvaluator(m, TEXTS, **_kw(positions=positions, batch_size=bs))
        _same_rows(ev.sweep("block", metrics=ALL).to_dataframe(), old, "skip")
    assert ev.prune(2, unit="attn").to_dataframe()["removed"].iloc[2].count("+") == 1


@pytest.mark.parametrize("arch", ["neox", "opt", "gemma2"])
def test_stacked_variants_equal_one_variant_per_pass(tiny_models, arch):
    m = tiny_models(arch)
    one = sl.LayerSkipEvaluator(m, TEXTS, variants_per_pass=1, **_kw())
    budget = sl.LayerSkipEvaluator(m, TEXTS, memory_budget="64MB", **_kw())
    tiny = sl.LayerSkipEvaluator(m, TEXTS, memory_budget=1, **_kw())  # one variant per pass from the budget
    for unit, mode, width in SWEEPS:
        a = one.sweep(unit, mode=mode, width=width, metrics=ALL).to_dataframe()
        for other in (budget, tiny):
            b = other.sweep(unit, mode=mode, width=width, metrics=ALL).to_dataframe()
            for col in a.columns:
                if a[col].dtype.kind == "f":
                    torch.testing.assert_close(torch.tensor(b[col].values), torch.tensor(a[col].values), atol=1e-6,
                                               rtol=1e-6)
    assert float(a["kl"].max()) > 1e-4
    with pytest.raises(sl.StreamlensError, match="memory_budget"):
        sl.LayerSkipEvaluator(m, TEXTS, memory_budget="lots", **_kw())
    with pytest.raises(sl.StreamlensError, match="variants_per_pass"):
        sl.LayerSkipEvaluator(m, TEXTS, variants_per_pass=0, **_kw()).evaluate("block.0")


def test_one_batch_in_memory_at_a_time(tiny_models, monkeypatch):
    """Streaming: when a batch's clean pass starts, no earlier batch's clean state is alive."""
    alive: list = []
    real = streaming.clean_pass

    def tracked(*a, **k):
        gc.collect()
        assert not [r for r in alive if r() is not None], "an earlier batch is still held"
        c = real(*a, **k)
        alive.append(weakref.ref(c))
        return c

    monkeypatch.setattr(streaming, "clean_pass", tracked)
    ev = sl.LayerSkipEvaluator(tiny_models("gpt2"), TEXTS, **_kw(batch_size=1))
    ev.sweep("head")
    assert len(alive) == len(TEXTS)  # one per batch: the construction's prefix check made the first batch's
    assert not hasattr(ev, "batches")


@pytest.mark.parametrize("stop_after", [0, 1, 3, 5])
def test_interrupted_at_any_point_resumes_to_the_same_table(tiny_models, tmp_path, monkeypatch, stop_after):
    m = tiny_models("gpt2")
    ev = sl.LayerSkipEvaluator(m, TEXTS, **_kw())
    full = ev.sweep("block", mode="mean", metrics=ALL).to_dataframe()
    out = tmp_path / "blocks.csv"
    real, calls = DocSums.write_unit, []

    def dying(self, *a):
        if len(calls) == stop_after:
            raise KeyboardInterrupt
        calls.append(a[1])
        real(self, *a)

    monkeypatch.setattr(DocSums, "write_unit", dying)
    with pytest.raises(KeyboardInterrupt):
        ev.sweep("block", mode="mean", metrics=ALL, out=out)
    monkeypatch.setattr(DocSums, "write_unit", real)
    state = tmp_path / "blocks.csv.docsums-0of1.jsonl"
    assert len(state.read_text().splitlines()) > stop_after
    with pytest.raises(sl.StreamlensError, match="resume=True"):
        ev.sweep("block", mode="mean", metrics=ALL, out=out)
    measured = []
    real_measure = evmod.LayerSkipEvaluator._measure

    def counting(self, c, units, *a):
        measured.extend((int(c.doc.min()), u.label) for u in units)
        return real_measure(self, c, units, *a)

    monkeypatch.setattr(evmod.LayerSkipEvaluator, "_measure", counting)
    fresh = sl.LayerSkipEvaluator(m, TEXTS, **_kw())
    resumed = fresh.sweep("block", mode="mean", metrics=ALL, out=out, resume=True).to_dataframe()
    assert len(measured) == 3 * len(m.bridge.blocks) - stop_after  # 3 batches x 2 blocks, minus what was written
    for col in full.columns:
        assert list(resumed[col]) == list(full[col]), col


def test_cut_off_last_line_is_dropped_and_redone(tiny_models, tmp_path):
    ev = sl.LayerSkipEvaluator(tiny_models("gpt2"), TEXTS, **_kw())
    full = ev.sweep("attn").to_dataframe()
    out = tmp_path / "a.jsonl"
    ev.sweep("attn", out=out)
    out.unlink()
    state = tmp_path / "a.jsonl.docsums-0of1.jsonl"
    text = state.read_text()
    state.write_text(text[: len(text) - 20])  # a kill in the middle of the last write
    with pytest.warns(UserWarning, match="cut off"):
        again = ev.sweep("attn", out=out, resume=True).to_dataframe()
    for col in full.columns:
        assert list(again[col]) == list(full[col]), col


@pytest.mark.parametrize("change,what", [({"max_tokens": 20}, "max_tokens"), ({"positions": "last"}, "positions"),
                                         ({"topk": 3}, "topk"), ({"data": TEXTS[:4]}, "data"),
                                         ({"mode": "mean"}, "mode"), ({"metrics": ("kl", "top1")}, "metrics"),
                                         ({"model": "llama"}, "model"), ({"batch_size": 3}, "batch_size")])
def test_resume_with_other_settings_is_refused(tiny_models, tmp_path, change, what):
    out = tmp_path / "s.jsonl"
    sl.skip_sweep(tiny_models("gpt2"), TEXTS, unit="attn", out=out, **_kw())
    out.unlink()  # only the document sums are left
    kw = _kw(**{k: v for k, v in change.items() if k not in ("data", "mode", "metrics", "model")})
    data = change.get("data", TEXTS)
    model = tiny_models(change.get("model", "gpt2"))
    with pytest.raises(sl.StreamlensError, match=f"cannot resume from .*{what}: .* in the file, .* now"):
        sl.skip_sweep(model, data, unit="attn", out=out, resume=True, mode=change.get("mode", "skip"),
                      metrics=change.get("metrics", ("kl", "ce", "top1")), **kw)


def test_damaged_files_are_one_line_errors(tiny_models, tmp_path):
    ev = sl.LayerSkipEvaluator(tiny_models("gpt2"), TEXTS, **_kw())
    good = {}
    for suffix in (".jsonl", ".csv"):
        out = tmp_path / f"g{suffix}"
        ev.sweep("block", out=out)
        good[suffix] = out.read_text()
    cases = {
        ".jsonl": [(lambda t: t + t.splitlines()[0] + "\n", "line 3: duplicate row for unit 'block.0'"),
                   (lambda t: t[:-5], "line 2 is cut off"),
                   (lambda t: t.replace('"kl": ', '"kl": "x', 1).replace(', "kl_lo"', '", "kl_lo"', 1),
                    "line 1: kl is not a number")],
        ".csv": [(lambda t: t + t.splitlines()[1] + "\n", "line 4: duplicate row for unit 'block.0'"),
                 (lambda t: t[:-5], "line 3 is cut off"),
                 (lambda t: t.splitlines()[0][:30], "line 1: the header is cut off"),
                 (lambda t: t.replace("\nblock.0,0,", "\nblock.0,zero,"), "line 2: layer is not a number")],
    }
    for suffix, damages in cases.items():
        for damage, msg in damages:
            out = tmp_path / f"d{suffix}"
            out.write_text(damage(good[suffix]))
            with pytest.raises(sl.StreamlensError, match=msg) as e:
                ev.sweep("block", out=out, resume=True)
            assert "\n" not in str(e.value) and out.name in str(e.value)
            out.unlink()
            for f in tmp_path.glob("d*.docsums-*"):
                f.unlink()
    state = tmp_path / "g.jsonl.docsums-0of1.jsonl"
    lines = state.read_text().splitlines()
    state.write_text("\n".join(lines + [lines[2]]) + "\n")
    (tmp_path / "g.jsonl").unlink()
    with pytest.raises(sl.StreamlensError, match=f"line {len(lines) + 1}: duplicate"):
        ev.sweep("block", out=tmp_path / "g.jsonl", resume=True)


def test_low_precision_and_device_map(tiny_dirs, tiny_models):
    """bfloat16: the replay repeats the model's own arithmetic (removing nothing changes nothing) and the
    metrics are float32/float64; device_map passes through to the bridge and changes no number."""
    folder = str(tiny_dirs("llama"))
    bf = sl.load(folder, dtype="bfloat16")
    assert bf.dtype == torch.bfloat16
    ev = sl.LayerSkipEvaluator(bf, TEXTS, **_kw())
    assert ev.strategy == "prefix"
    nothing = ev.evaluate([], metrics=ALL)
    assert abs(nothing["kl"]) <= 1e-6 and nothing["top1"] == 1.0 and abs(nothing["angle"]) <= 1e-6
    df = ev.sweep("head", mode="mean", metrics=ALL).to_dataframe()
    assert df["kl"].notna().all() and (df["kl"] >= 0).all() and df["kl"].max() > 1e-5
    mapped = sl.load(folder, device_map={"": "cpu"})
    a = sl.LayerSkipEvaluator(mapped, TEXTS, **_kw()).sweep("block", metrics=ALL).to_dataframe()
    b = sl.LayerSkipEvaluator(tiny_models("llama"), TEXTS, **_kw()).sweep("block", metrics=ALL).to_dataframe()
    for col in a.columns:
        assert list(a[col]) == list(b[col]), col
    with pytest.raises(sl.StreamlensError, match="exclusive"):
        sl.load(folder, device="cpu", device_map="auto")


def test_pruning_curve_equals_the_old_evaluator(tiny_models):
    """The greedy curve, each step one streaming pass over every candidate, against the old evaluator's
    one-unit-at-a-time evaluation driving the same greedy search."""
    from types import SimpleNamespace

    from streamlens.intervene.units import all_units
    from streamlens.skip.sweeps import greedy_prune

    m = tiny_models("llama")
    old = OldEvaluator(m, TEXTS, **_kw())
    drive = SimpleNamespace(progress=False, evaluate=old.evaluate,
                            evaluate_many=lambda us, mode, names: [old.evaluate(u, mode, names) for u in us])
    want = greedy_prune(drive, all_units(m, "head"), 3, "mean", ["kl", "delta_ce", "top1"], "kl", True)
    got = sl.LayerSkipEvaluator(m, TEXTS, **_kw()).prune(3, unit="head", mode="mean").to_dataframe()
    assert list(got["removed"]) == [r["removed"] for r in want]
    for col in ("kl", "kl_lo", "kl_hi", "delta_ce", "top1_hi"):
        assert list(got[col]) == [r[col] for r in want], col


def test_one_batch_clean_pass_is_reused_until_the_weights_change(tiny_models, monkeypatch):
    """The construction's prefix check is the first batch's clean pass; on data of one batch repeated
    evaluate() calls run the clean model once, and an in-place change of the weights makes a new one."""
    m = tiny_models("llama")
    calls = []
    real = streaming.clean_pass
    monkeypatch.setattr(streaming, "clean_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    ev = sl.LayerSkipEvaluator(m, TEXTS[:2], **_kw())
    first = [ev.evaluate(u, metrics=ALL) for u in ("block.1", "mlp.0", [])]
    assert len(calls) == 1 and first[2]["kl"] == 0.0
    w = next(m.bridge.blocks[1].mlp.parameters())
    orig = w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(1.5)
        again = ev.evaluate("block.1", metrics=ALL)
        assert len(calls) == 2
        fresh = sl.LayerSkipEvaluator(m, TEXTS[:2], **_kw()).evaluate("block.1", metrics=ALL)
        assert again == fresh and again != first[0]
    finally:
        with torch.no_grad():
            w.copy_(orig)
    assert ev.evaluate("block.1", metrics=ALL) == first[0]


def test_prefix_check_catches_a_block_input_changed_after_it_was_cached(tiny_models):
    from streamlens.skip.streaming import check_prefix, clean_pass

    m = tiny_models("llama")
    lo, batch, sel = sl.LayerSkipEvaluator(m, TEXTS[:2], **_kw()).data_batches[0]
    c = clean_pass(m, batch, sel, lo, 5)
    assert check_prefix(m, c) == ""
    c.resid[2].add_(1.0)  # what a block that edits its input in place would leave in the cache
    assert "replaying block 1 " in check_prefix(m, c)
