import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import streamlens as sl
from streamlens.report.demo import pydoc_texts
from streamlens.intervene.units import unit_of
from streamlens.testing import induction_batch, induction_scores

TEXTS = [t[:400] for t in pydoc_texts()[:5]]
HF_LAYERS = {"gpt2": "transformer.h", "neox": "gpt_neox.layers", "llama": "model.layers", "gptj": "transformer.h",
             "opt": "model.decoder.layers", "qwen2": "model.layers"}
ALL_METRICS = ("kl", "ce", "top1", "topk", "angle")


def _ev(m, data=TEXTS, **kw):
    kw.setdefault("max_tokens", 24)
    kw.setdefault("batch_size", 2)
    return sl.LayerSkipEvaluator(m, data, progress=False, n_boot=200, **kw)


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama", "bert", "gemma2"])
def test_removing_nothing_is_the_clean_pass(tiny_models, arch):
    ev = _ev(tiny_models(arch))
    for strategy in {"naive", ev.strategy}:
        r = ev.evaluate([], metrics=ALL_METRICS, strategy=strategy)
        assert abs(r["kl"]) <= 1e-6 and abs(r["kl_hi"]) <= 1e-6
        assert abs(r["delta_ce"]) <= 1e-6
        assert abs(r["top1"] - 1.0) <= 1e-9 and abs(r["topk"] - 1.0) <= 1e-9
        assert abs(r["angle"]) <= 1e-6


def _hand_skip(folder, arch, ids, layer, drop_residual=False):
    """Clean and ablated logits of a fresh HF model, block ``layer`` removed with a plain forward hook."""
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    block = hf.get_submodule(HF_LAYERS[arch])[layer]

    def hook(module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        y = out[0] if isinstance(out, tuple) else out
        new = y - x if drop_residual else x
        return (new, *out[1:]) if isinstance(out, tuple) else new

    with torch.no_grad():
        clean = hf(ids).logits
        h = block.register_forward_hook(hook, with_kwargs=True)
        try:
            ablated = hf(ids).logits
        finally:
            h.remove()
    return clean, ablated


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama", "gptj", "opt", "qwen2"])
def test_block_skip_equals_a_hand_built_hook(tiny_models, tiny_dirs, arch):
    ids = torch.randint(1, 500, (3, 12), generator=torch.Generator().manual_seed(1))
    ev = _ev(tiny_models(arch), ids)
    for layer, drop in ((0, False), (1, False), (0, True)):
        clean, abl = _hand_skip(tiny_dirs(arch), arch, ids, layer, drop)
        lp, lq = clean.log_softmax(-1), abl.log_softmax(-1)
        kl = (lp.exp() * (lp - lq)).sum(-1).mean()
        t = ids[:, 1:]
        dce = (lp[:, :-1].gather(-1, t[..., None]) - lq[:, :-1].gather(-1, t[..., None])).mean()
        top1 = (clean.argmax(-1) == abl.argmax(-1)).float().mean()
        got = ev.evaluate(f"block.{layer}", "drop-residual" if drop else "skip")
        assert abs(got["kl"] - float(kl)) <= 1e-5 * (1 + float(kl))
        assert abs(got["delta_ce"] - float(dce)) <= 1e-5
        assert abs(got["top1"] - float(top1)) <= 1e-6
        assert got["kl_lo"] <= got["kl"] <= got["kl_hi"]
    assert float(kl) > 1e-4  # the removal changed something, so the comparison has teeth


def test_post_norm_drop_residual_equals_a_hand_built_hook(tiny_models, tiny_dirs):
    """BERT: drop-residual removes the skip connections inside both norms: ln2(mlp(ln1(attn(x))))."""
    from transformers import AutoModelForMaskedLM

    ids = torch.randint(1, 500, (3, 12), generator=torch.Generator().manual_seed(2))
    ev = _ev(tiny_models("bert"), ids)
    hf = AutoModelForMaskedLM.from_pretrained(tiny_dirs("bert")).eval()
    layer = hf.bert.encoder.layer[1]
    held = {}

    def keep(name):
        def pre(module, args, kwargs):
            held[name] = args[0] if args else kwargs["hidden_states"]
        return pre

    def minus(name):
        def pre(module, args):  # the norm's input is (sub-layer write + residual): drop the residual
            return (args[0] - held[name],)
        return pre

    def keep_out(module, args, out):
        held["h"] = out[0] if isinstance(out, tuple) else out

    with torch.no_grad():
        clean = hf(ids).logits
        hs = [layer.register_forward_pre_hook(keep("x"), with_kwargs=True),
              layer.attention.output.LayerNorm.register_forward_pre_hook(minus("x")),
              layer.attention.register_forward_hook(keep_out),
              layer.output.LayerNorm.register_forward_pre_hook(minus("h"))]
        try:
            abl = hf(ids).logits
        finally:
            for h in hs:
                h.remove()
    lp, lq = clean.log_softmax(-1), abl.log_softmax(-1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    got = ev.evaluate("block.1", "drop-residual", metrics=("kl", "top1"))
    assert kl > 1e-3 and abs(got["kl"] - kl) <= 1e-5 * (1 + kl)
    assert abs(got["top1"] - float((clean.argmax(-1) == abl.argmax(-1)).float().mean())) <= 1e-6


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox", "gemma2", "opt"])
def test_prefix_reuse_equals_the_naive_path(tiny_models, arch):
    m = tiny_models(arch)
    fast, slow = _ev(m), _ev(m, strategy="naive")
    assert fast.strategy == "prefix" and fast.strategy_reason == ""
    calls = []
    for unit, mode, width in (("block", "skip", None), ("attn", "skip", None), ("mlp", "mean", None),
                              ("head", "mean", None), ("span", "drop-residual", 2), ("block", "mean", None)):
        a = fast.sweep(unit, mode=mode, width=width, metrics=ALL_METRICS).to_dataframe()
        b = slow.sweep(unit, mode=mode, width=width, metrics=ALL_METRICS).to_dataframe()
        assert list(a["unit"]) == list(b["unit"])
        for col in a.columns:
            if a[col].dtype.kind == "f":
                torch.testing.assert_close(torch.tensor(a[col].values), torch.tensor(b[col].values), atol=1e-5, rtol=1e-4)
        calls.append(float(a["kl"].max()))
    assert max(calls) > 1e-4


def test_bert_falls_back_to_the_naive_path_with_a_reason(tiny_models):
    ev = _ev(tiny_models("bert"))
    assert ev.strategy == "naive" and "full forward per unit" in ev.strategy_reason
    with pytest.raises(sl.StreamlensError, match="prefix reuse"):
        ev.evaluate("block.0", strategy="prefix")
    df = ev.sweep("attn").to_dataframe()
    assert list(df["unit"]) == ["attn.0", "attn.1"] and (df["kl"] >= 0).all()


def test_mean_of_a_single_document_changes_nothing(tiny_models):
    """With one document, the per-position mean write *is* the write: mean-ablation is the identity."""
    m = tiny_models("llama")
    ev = _ev(m, TEXTS[:1])
    for unit in ("block.1", "attn.0", "mlp.1", "head.1.2", "span.0:2"):
        r = ev.evaluate(unit, "mean")
        assert abs(r["kl"]) <= 1e-6 and abs(r["top1"] - 1) <= 1e-9
    assert ev.evaluate("block.1", "skip")["kl"] > 1e-5


def test_span_table_and_block_influence(tiny_models):
    ev = _ev(tiny_models("gpt2"))
    blocks = ev.sweep("block")
    df = blocks.to_dataframe()
    for col in ("unit", "layer", "kl", "kl_lo", "kl_hi", "delta_ce", "delta_ce_lo", "top1", "block_influence"):
        assert col in df.columns
    assert set(blocks.spearman) == {"kl", "delta_ce", "top1"}
    spans = ev.sweep("span", width=[1, 2]).to_dataframe()
    assert list(zip(spans["start"], spans["width"])) == [(0, 1), (1, 1), (0, 2)]
    torch.testing.assert_close(torch.tensor(spans["kl"].values[:2]), torch.tensor(df["kl"].values))
    both = ev.evaluate(["block.0", "block.1"])
    assert abs(both["kl"] - spans["kl"].values[2]) <= 1e-9
    # block influence is 1 - cos(resid_pre, resid_post) of the clean pass, averaged over the positions
    ids = torch.randint(1, 500, (3, 10), generator=torch.Generator().manual_seed(2))
    tr, bi = sl.trace(ev.model, ids), sl.LayerSkipEvaluator(ev.model, ids, progress=False).block_influence()
    for l in range(2):
        want = 1 - torch.cosine_similarity(tr["resid_pre", l].double(), tr["resid_post", l].double(), dim=-1).mean()
        assert abs(bi[l] - float(want)) <= 1e-6


def test_pruning_curve(tiny_models):
    ev = _ev(tiny_models("llama"))
    single = ev.sweep("head").to_dataframe()
    curve = ev.prune(2, unit="head")
    df = curve.to_dataframe()
    assert list(df["step"]) == [0, 1, 2] and abs(df["kl"].iloc[0]) <= 1e-6
    assert df["unit"].iloc[1] == single.loc[single["kl"].idxmin(), "unit"]
    assert df["removed"].iloc[2].startswith(df["unit"].iloc[1] + "+") or df["removed"].iloc[2].endswith("+" + df["unit"].iloc[1])
    assert curve.plot() is not None


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_interrupted_sweep_resumes_to_the_same_table(tiny_models, tmp_path, suffix):
    ev = _ev(tiny_models("gpt2"))
    full = ev.sweep("head", metrics=("kl", "ce", "top1", "angle")).to_dataframe()
    out = tmp_path / f"heads{suffix}"
    seen = []

    def stop_after_two(row):
        seen.append(row["unit"])
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ev.sweep("head", metrics=("kl", "ce", "top1", "angle"), out=out, callback=stop_after_two)
    assert len(seen) == 2
    with pytest.raises(sl.StreamlensError, match="resume=True"):
        ev.sweep("head", metrics=("kl", "ce", "top1", "angle"), out=out)
    new = []
    resumed = ev.sweep("head", metrics=("kl", "ce", "top1", "angle"), out=out, resume=True,
                       callback=lambda r: new.append(r["unit"])).to_dataframe()
    assert len(new) == len(full) - 2 and not set(new) & set(seen)
    assert list(resumed.columns) == list(full.columns)
    for col in full.columns:
        assert list(resumed[col]) == list(full[col]), col
    with pytest.raises(sl.StreamlensError, match="mode"):
        ev.sweep("head", mode="mean", metrics=("kl", "ce", "top1", "angle"), out=out, resume=True)


def test_induction_circuit_is_what_removal_damages(induction_model):
    """The known mechanism, as this model implements it.

    The trained model grows one previous-token head in layer 0 and *several* induction heads in
    layer 1 (every layer-1 head scores > 0.5). The induction heads back each other up, so removing
    any one of them costs little; removing them together destroys the repeated half. The
    previous-token head has no backup: it is the most damaging single head.
    """
    from streamlens.testing import previous_token_scores

    m, half = induction_model, 16
    ids = induction_batch(24, half, seed=5)
    ind, prev = induction_scores(m), previous_token_scores(m)
    induction = [f"head.{l}.{h}" for l, h in (ind > 0.5).nonzero().tolist()]
    prev_head = int(prev[0].argmax())
    assert induction and all(u.startswith("head.1.") for u in induction), ind
    others = [f"head.0.{h}" for h in range(m.arch.n_heads) if h != prev_head]
    ev = sl.LayerSkipEvaluator(m, ids, positions=slice(half, None), progress=False, n_boot=200)
    singles = ev.sweep("head", metrics=("kl", "ce", "top1")).to_dataframe().set_index("unit")
    assert singles["kl"].idxmax() == f"head.0.{prev_head}"
    assert singles["delta_ce"].idxmax() == f"head.0.{prev_head}"
    together = ev.evaluate(induction, metrics=("kl", "top1"))
    control = ev.evaluate(others[: len(induction)], metrics=("kl", "top1"))
    assert together["top1"] < 0.3 and control["top1"] > 0.7, (together, control)
    assert together["kl_lo"] > 5 * control["kl_hi"], (together, control)
    # no single induction head comes close to the whole set
    assert singles.loc[induction, "kl_hi"].max() < 0.2 * together["kl_lo"]


def test_outputs_and_rendering(tiny_models, tmp_path):
    sweep = sl.skip_sweep(tiny_models("gpt2"), TEXTS, unit="attn", max_tokens=16, progress=False, n_boot=50)
    assert "SkipSweep" in sweep._repr_html_() and "attn.1" in sweep._repr_html_()
    fig = sweep.plot("delta_ce")
    assert len(fig.data) == 1
    sweep.save(tmp_path / "s.csv")
    sweep.save(tmp_path / "s.jsonl")
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 2
    spans = sl.skip_sweep(tiny_models("gpt2"), TEXTS, unit="span", width=[1, 2], max_tokens=16, progress=False, n_boot=50)
    assert spans.plot().data[0].type == "heatmap"


def test_errors(tiny_models, tmp_path):
    m = tiny_models("gpt2")
    ev = _ev(m)
    with pytest.raises(sl.StreamlensError, match="empty list"):
        _ev(m, [])
    with pytest.raises(sl.StreamlensError, match="layer 7 is out of range"):
        ev.evaluate("block.7")
    with pytest.raises(sl.StreamlensError, match="head 9 does not exist"):
        ev.evaluate("head.1.9")
    with pytest.raises(sl.StreamlensError, match="'blocks.1'"):
        ev.evaluate("blocks.1")
    with pytest.raises(sl.StreamlensError, match="width 3 is wider than the 2-layer model"):
        ev.sweep("span", width=3)
    with pytest.raises(sl.StreamlensError, match="unknown unit 'layer'"):
        ev.sweep("layer") if False else unit_of(m, "layer", 0)
    with pytest.raises(sl.StreamlensError, match="not 'attn.0'"):
        ev.evaluate("attn.0", "drop-residual")
    with pytest.raises(sl.StreamlensError, match="unknown mode 'zero'"):
        ev.evaluate("attn.0", "zero")
    with pytest.raises(sl.StreamlensError, match="unknown metric 'acc'"):
        ev.evaluate("attn.0", metrics=("acc",))
    with pytest.raises(sl.StreamlensError, match="must end in .jsonl or .csv"):
        ev.sweep("block", out=tmp_path / "x.txt")
    with pytest.raises(sl.StreamlensError, match="count=5"):
        ev.prune(5)


def test_load_texts(tmp_path):
    assert sl.load_texts(["a b", "c"]) == ["a b", "c"]
    (tmp_path / "d.txt").write_text("first doc\n\nsecond doc\n")
    assert sl.load_texts(tmp_path / "d.txt") == ["first doc", "second doc"]
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"body": "two", "text": "2"}) + "\n")
    assert sl.load_texts(str(tmp_path / "d.jsonl")) == ["one", "2"]
    assert sl.load_texts(tmp_path / "d.jsonl", field="text") == ["one", "2"]
    with pytest.raises(sl.StreamlensError, match="line 1 has no field 'body'"):
        sl.load_texts(tmp_path / "d.jsonl", field="body")
    with pytest.raises(sl.StreamlensError, match="does not exist"):
        sl.load_texts(tmp_path / "missing.txt")
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(sl.StreamlensError, match="holds no documents"):
        sl.load_texts(tmp_path / "e.txt")
    with pytest.raises(sl.StreamlensError, match="document 1 is empty"):
        sl.load_texts(["x", "  "])
    with pytest.raises(sl.StreamlensError, match="empty list"):
        sl.load_texts([])


@pytest.mark.smollm2
def test_smollm2_block_sweep_is_stable(smollm2):
    texts = pydoc_texts()[:2]
    sweep = sl.skip_sweep(smollm2, texts, unit="block", max_tokens=24, progress=False, n_boot=100)
    a = sweep.to_dataframe().set_index("unit")
    assert len(a) == smollm2.arch.n_layers and sweep.strategy == "prefix"
    assert (a["kl"] >= 0).all() and a["kl"].max() > 0.01 and -1 <= sweep.spearman["kl"] <= 1
    again = sl.LayerSkipEvaluator(smollm2, texts, max_tokens=24, progress=False, n_boot=100)  # a second run
    for unit in ("block.0", "block.14", "block.29"):
        r = again.evaluate(unit)
        for col in ("kl", "kl_lo", "kl_hi", "delta_ce", "top1"):
            assert abs(r[col] - a.loc[unit, col]) <= 1e-6 * (1 + abs(r[col])), (unit, col)
