"""A block is a set of writers: writers beside the token mixer (Falcon-H1's Mamba mixer beside attention).

Falcon-H1 runs attention and a Mamba-2 mixer in parallel on the same normalised read and adds
``attention_out_multiplier · attn + ssm_out_multiplier · mamba`` to the stream, then the MLP. The tiny
model sets both multipliers (0.5, 0.75) and the input and MLP multipliers away from 1, so a check that
ignores any of them fails. Every removal is compared with a plain PyTorch hook on the HuggingFace model.
"""

import pytest
import torch

import streamlens as sl
from streamlens import coverage

ARCH = "FalconH1ForCausalLM"
PROMPTS = ["The cat sat on the mat because it was", "def f(x): return x"]


@pytest.fixture(scope="module")
def falcon(tmp_path_factory):
    import transformers

    folder, n = coverage.build(ARCH, tmp_path_factory.mktemp("falcon_h1") / ARCH)
    assert n <= coverage.MAX_PARAMS
    hf = getattr(transformers, ARCH).from_pretrained(folder).eval()
    assert (hf.config.attention_out_multiplier, hf.config.ssm_out_multiplier) == (0.5, 0.75)
    return sl.load(str(folder)), hf


def _kl(p, q):
    lp, lq = p.float().log_softmax(-1), q.float().log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def _hand(hf, ids, module, replace):
    """Clean and ablated HF logits, ``module``'s output replaced by ``replace(output)`` in a plain forward hook."""
    def hook(mod, args, out):
        if isinstance(out, tuple):
            return (replace(out[0]), *out[1:])
        return replace(out)

    with torch.no_grad():
        clean = hf(ids, use_cache=False).logits
        h = module.register_forward_hook(hook)
        try:
            abl = hf(ids, use_cache=False).logits
        finally:
            h.remove()
    return clean, abl


def _outputs(hf, ids, module):
    seen = []
    h = module.register_forward_hook(lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach()))
    try:
        with torch.no_grad():
            hf(ids, use_cache=False)
    finally:
        h.remove()
    return seen[0]


def test_attention_and_mamba_are_two_writers_sharing_one_read(falcon):
    m, _ = falcon
    a = m.arch
    assert a.layout == "pre" and a.co_writers == ("mamba",) and a.writers[0] == ("attn", "mamba", "mlp")
    assert dict(a.writer_scales) == {"attn": 0.5, "mamba": 0.75}  # the config's values, measured
    tr = sl.trace(m, PROMPTS, heads=True)
    assert tr.closure_error() <= coverage.CLOSURE_TOL
    for l in range(a.n_layers):
        # resid_mid = resid_pre + attn_out + mamba_out, both reading the same normalised stream
        want = tr["resid_pre", l] + tr["attn_out", l] + tr["mamba_out", l]
        torch.testing.assert_close(tr["resid_mid", l], want, rtol=1e-5, atol=1e-6)
        # both read the same normalised stream; attention's own input is it times attention_in_multiplier (1.5)
        torch.testing.assert_close(tr["attn_read_normed", l], 1.5 * tr["mamba_read_normed", l], rtol=1e-6, atol=1e-7)
        assert tr["mamba_read", l] is tr["attn_read", l] is tr["resid_pre", l]
        assert float(tr["mamba_out", l].norm()) > 1e-3 and float(tr["attn_out", l].norm()) > 1e-3
        # the per-head split carries the attention multiplier
        heads = tr["head_out", l].sum(-2) + tr["attn_bias_out", l]
        torch.testing.assert_close(heads, tr["attn_out", l], rtol=1e-5, atol=1e-6)
    df = tr.to_dataframe()
    assert {"mamba_rel_update", "attn_rel_update", "mlp_rel_update"} <= set(df.columns)
    with pytest.raises(sl.StreamlensError, match="unknown name 'ssm_out'"):
        tr["ssm_out", 0]


def test_the_decomposition_has_one_component_per_writer(falcon):
    m, _ = falcon
    dec = sl.decompose(m, PROMPTS, "top:3", progress=False)
    assert dec.check() <= coverage.DECOMPOSE_TOL
    assert dec.labels[1:4] == ("attn.0", "mamba.0", "mlp.0")
    heads = sl.decompose(m, PROMPTS, "top:3", unit="head", progress=False)
    assert heads.check() <= coverage.DECOMPOSE_TOL and "mamba.1" in heads.labels and "head.1.3" in heads.labels
    neurons = sl.decompose(m, PROMPTS, "top:3", unit="neuron", neurons=4, progress=False)
    assert neurons.check() <= coverage.DECOMPOSE_TOL  # the MLP's down multiplier (0.8) is in the neuron split
    lens = sl.logit_lens(m, PROMPTS, positions="last", progress=False).to_dataframe()
    assert float(lens[lens.point == f"resid_post.{m.arch.n_layers - 1}"]["kl"].abs().max()) <= 1e-5


@pytest.mark.parametrize("mode", ["skip", "mean"])
@pytest.mark.parametrize("writer", ["mamba", "attn"])
def test_each_writer_is_removed_exactly(falcon, writer, mode):
    m, hf = falcon
    ids = torch.randint(1, m.arch.d_vocab, (3, 12), generator=torch.Generator().manual_seed(1))
    ev = sl.LayerSkipEvaluator(m, ids, batch_size=3, n_boot=10, progress=False)
    layer = 1
    module = getattr(hf.model.layers[layer], {"attn": "self_attn", "mamba": "mamba"}[writer])
    if mode == "skip":
        replace = torch.zeros_like
    else:  # the raw output's mean over the documents at each position (the multiplier applies after it)
        mean = _outputs(hf, ids, module).mean(0)
        replace = lambda out: mean.expand_as(out).to(out.dtype)  # noqa: E731
    clean, abl = _hand(hf, ids, module, replace)
    kl = _kl(clean, abl)
    assert kl > 1e-6  # the removal changes something
    got = ev.evaluate(f"{writer}.{layer}", mode, metrics=("kl",))["kl"]
    assert abs(got - kl) <= coverage.SKIP_KL_TOL * (1 + kl)


def test_blocks_and_the_whole_sweep_over_a_writer(falcon):
    m, hf = falcon
    ids = torch.randint(1, m.arch.d_vocab, (3, 12), generator=torch.Generator().manual_seed(2))
    ev = sl.LayerSkipEvaluator(m, ids, batch_size=3, n_boot=10, progress=False)
    sweep = ev.sweep("mamba", mode="mean", metrics=("kl",))
    assert list(sweep.table["unit"]) == ["mamba.0", "mamba.1"]
    stacked = sl.LayerSkipEvaluator(m, ids, batch_size=3, n_boot=10, progress=False, variants_per_pass=4)
    assert list(stacked.sweep("mamba", mode="mean", metrics=("kl",)).table["kl"]) == list(sweep.table["kl"])
    both = ev.evaluate(["attn.0", "mamba.0"], "skip", metrics=("kl",))["kl"]
    layer0 = hf.model.layers[0]
    clean = clean_logits(hf, ids)
    h = layer0.mamba.register_forward_hook(lambda mod, a, out: torch.zeros_like(out))
    try:
        _, abl = _hand(hf, ids, layer0.self_attn, torch.zeros_like)
    finally:
        h.remove()
    assert abs(both - _kl(clean, abl)) <= coverage.SKIP_KL_TOL * (1 + _kl(clean, abl))

    def drop(mod, args, kwargs, out):  # drop-residual: the block writes f(x) = out - x
        x = args[0] if args else kwargs["hidden_states"]
        return (out[0] - x, *out[1:]) if isinstance(out, tuple) else out - x

    h = layer0.register_forward_hook(drop, with_kwargs=True)
    try:
        with torch.no_grad():
            want = hf(ids, use_cache=False).logits
    finally:
        h.remove()
    got = ev.evaluate("block.0", "drop-residual", metrics=("kl",))["kl"]
    assert abs(got - _kl(clean, want)) <= coverage.SKIP_KL_TOL * (1 + got)


def test_a_model_without_the_writer_says_so(tiny_models):
    llama = tiny_models("llama")
    with pytest.raises(sl.StreamlensError, match=r"block 0 has no 'mamba' writer: its writers are \['attn', 'mlp'\]"):
        sl.LayerSkipEvaluator(llama, ["a b c d"], progress=False).evaluate("mamba.0")


def clean_logits(hf, ids):
    with torch.no_grad():
        return hf(ids, use_cache=False).logits


def test_dynamics_see_every_writer(falcon):
    m, _ = falcon
    dyn = sl.dynamics(m, PROMPTS, max_tokens=8, progress=False)
    df = dyn.to_dataframe()
    assert "mamba_rel_update" in df.columns and df["mamba_rel_update"].notna().all()


# ---------------------------------------------------------------------------- Gemma 4: a writer after the MLP, a stream scale
@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    import transformers

    folder, n = coverage.build("Gemma4ForCausalLM", tmp_path_factory.mktemp("gemma4") / "Gemma4ForCausalLM")
    assert n <= coverage.MAX_PARAMS
    hf = transformers.Gemma4ForCausalLM.from_pretrained(folder).eval()
    assert [float(layer.layer_scalar) for layer in hf.model.layers] == [0.75, 1.25]  # away from 1 (testing.py)
    return sl.load(str(folder)), hf


def test_gemma4_per_layer_input_write_and_stream_scale(gemma4):
    m, _ = gemma4
    a = m.arch
    assert a.layout == "sandwich_ple" and a.writers[0] == ("attn", "mlp", "ple") and a.stream_scales == (0.75, 1.25)
    assert (a.reach(None), a.reach(0), a.reach(1)) == (0.75 * 1.25, 0.75 * 1.25, 1.25)
    tr = sl.trace(m, PROMPTS, heads=True)
    assert tr.closure_error() <= coverage.CLOSURE_TOL
    for l, s in enumerate(a.stream_scales):
        torch.testing.assert_close(tr["ple_read", l], tr["resid_mid", l] + tr["mlp_out", l], rtol=1e-5, atol=1e-6)
        want = s * (tr["ple_read", l] + tr["ple_out", l])
        torch.testing.assert_close(tr["resid_post", l], want, rtol=1e-5, atol=1e-6)
        assert float(tr["ple_out", l].norm()) > 1e-3


def test_gemma4_decomposition_folds_in_the_later_scales(gemma4):
    m, _ = gemma4
    dec = sl.decompose(m, PROMPTS, "top:3", progress=False)
    assert dec.check() <= coverage.DECOMPOSE_TOL
    assert dec.labels[:5] == ("embed", "attn.0", "mlp.0", "ple.0", "attn.1")
    heads = sl.decompose(m, PROMPTS, "top:3", unit="head", progress=False)
    assert heads.check() <= coverage.DECOMPOSE_TOL
    # each share is the write times the product of its own and every later block's scale: from the trace by hand
    tr = sl.trace(m, PROMPTS, positions="last")
    fin = tr["final_in"].float()
    parts = [tr["resid_pre", 0].float() * 0.75 * 1.25]
    for l, reach in ((0, 0.75 * 1.25), (1, 1.25)):
        parts += [tr[f"{w}_out", l].float() * reach for w in ("attn", "mlp", "ple")]
    torch.testing.assert_close(sum(parts), fin, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["skip", "mean"])
def test_gemma4_the_per_layer_input_write_is_removed_exactly(gemma4, mode):
    m, hf = gemma4
    ids = torch.randint(1, m.arch.d_vocab, (3, 12), generator=torch.Generator().manual_seed(1))
    ev = sl.LayerSkipEvaluator(m, ids, batch_size=3, n_boot=10, progress=False)
    module = hf.model.layers[0].post_per_layer_input_norm
    if mode == "skip":
        replace = torch.zeros_like
    else:
        mean = _outputs(hf, ids, module).mean(0)
        replace = lambda out: mean.expand_as(out).to(out.dtype)  # noqa: E731
    clean, abl = _hand(hf, ids, module, replace)
    kl = _kl(clean, abl)
    assert kl > 1e-6
    got = ev.evaluate("ple.0", mode, metrics=("kl",))["kl"]
    assert abs(got - kl) <= coverage.SKIP_KL_TOL * (1 + kl)
    assert list(ev.sweep("ple", metrics=("kl",)).table["unit"]) == ["ple.0", "ple.1"]


def test_verbs_that_follow_attention_and_mlp_only_say_so(falcon, gemma4):
    with pytest.raises(sl.UnsupportedModelError, match=r"information_flow: .* also write through mamba"):
        sl.information_flow(falcon[0], "The cat sat", "top:1")
    with pytest.raises(sl.UnsupportedModelError, match=r"value_paths: .* ple; each block scales the whole stream"):
        sl.value_paths(gemma4[0], ["The cat sat"], "top:1")


# ---------------------------------------------------------------------------- a block the bridge wraps whole
@pytest.mark.parametrize("mode", ["skip", "mean"])
def test_recurrent_gemma_is_read_through_its_huggingface_sub_modules(tmp_path, mode):
    """The bridge wraps RecurrentGemma's blocks whole (no sub-layer hooks): its temporal block (recurrent or
    attention), MLP and their norms are hooked on the HuggingFace modules themselves. Its readout soft-caps the
    logits under another config name (``logits_soft_cap``)."""
    import transformers

    folder, _ = coverage.build("RecurrentGemmaForCausalLM", tmp_path / "rg")
    m = sl.load(str(folder))
    assert m.arch.layout == "pre" and m.arch.writers == (("attn", "mlp"), ("attn", "mlp"))
    assert m.arch.logit_softcap == 1.0 and m.arch.norm == "rmsnorm_offset"
    tr = sl.trace(m, PROMPTS)
    assert tr.closure_error() <= coverage.CLOSURE_TOL
    assert sl.decompose(m, PROMPTS, "top:3", progress=False).check() <= coverage.DECOMPOSE_TOL
    hf = transformers.RecurrentGemmaForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(1, m.arch.d_vocab, (3, 12), generator=torch.Generator().manual_seed(1))
    ev = sl.LayerSkipEvaluator(m, ids, batch_size=3, n_boot=10, progress=False)
    for layer, (name, part) in ((0, ("attn", "temporal_block")), (1, ("attn", "temporal_block")), (1, ("mlp", "mlp_block"))):
        module = getattr(hf.model.layers[layer], part)
        if mode == "skip":
            replace = torch.zeros_like
        else:
            mean = _outputs(hf, ids, module).mean(0)
            replace = lambda out, mean=mean: mean.expand_as(out).to(out.dtype)  # noqa: E731
        clean, abl = _hand(hf, ids, module, replace)
        kl = _kl(clean, abl)
        assert kl > 1e-6
        got = ev.evaluate(f"{name}.{layer}", mode, metrics=("kl",))["kl"]
        assert abs(got - kl) <= coverage.SKIP_KL_TOL * (1 + kl), (layer, part)


def test_zamba2_hybrid_block_reads_the_shared_transformer_but_writes_only_mamba(tmp_path):
    """Zamba 2's hybrid block: ``out = x + mamba(norm(x + linear(shared_transformer(x, embeddings))))``; the bridge
    wraps it whole, so its Mamba mixer and norm are hooked on the HuggingFace modules."""
    import transformers

    from streamlens.coverage import _decoder_layers, _hand_skip

    folder, _ = coverage.build("Zamba2ForCausalLM", tmp_path / "zamba2")
    m = sl.load(str(folder))
    assert m.arch.block_layouts == ("single", "single_shared", "single", "single")
    assert m.arch.writers[1] == ("mixer",)
    tr = sl.trace(m, PROMPTS)
    assert tr.closure_error() <= coverage.CLOSURE_TOL
    gap = (tr["attn_read", 1] - tr["resid_pre", 1]).float().norm() / tr["resid_pre", 1].float().norm()
    assert float(gap) > 1e-3  # the mixer reads the stream plus the shared transformer's output
    assert sl.decompose(m, PROMPTS, "top:3", progress=False).check() <= coverage.DECOMPOSE_TOL
    ids = torch.randint(1, m.arch.d_vocab, (3, 12), generator=torch.Generator().manual_seed(1))
    ev = sl.LayerSkipEvaluator(m, ids, batch_size=3, n_boot=10, progress=False)
    clean, abl = _hand_skip(folder, "Zamba2ForCausalLM", ids, 1)
    kl = _kl(clean, abl)
    assert kl > 1e-6 and abs(ev.evaluate("block.1", metrics=("kl",))["kl"] - kl) <= coverage.SKIP_KL_TOL * (1 + kl)
    hf = transformers.Zamba2ForCausalLM.from_pretrained(folder).eval()
    clean, abl = _hand(hf, ids, _decoder_layers(hf)[1].mamba_decoder.mamba, torch.zeros_like)
    kl = _kl(clean, abl)
    assert kl > 1e-6 and abs(ev.evaluate("mixer.1", metrics=("kl",))["kl"] - kl) <= coverage.SKIP_KL_TOL * (1 + kl)


def test_gemma4_layers_with_their_own_head_width_refuse_the_head_split_by_name(tmp_path, monkeypatch):
    """Gemma 4's global-attention layers may have a head width of their own (``global_head_dim``): their per-head
    split is refused, naming the layer and the widths; everything else still works."""
    from streamlens import testing

    # layer 1 (full attention) has 4 heads of 16, the model's head width is 8
    monkeypatch.setitem(testing._EXTRA, "Gemma4ForCausalLM", dict(global_head_dim=16))
    config, cls = testing.bridged_config("Gemma4ForCausalLM")
    torch.manual_seed(0)
    model = cls(config).eval()
    assert sum(p.numel() for p in model.parameters()) <= coverage.MAX_PARAMS
    assert model.model.layers[1].self_attn.o_proj.in_features == 64
    m = sl.load(str(testing.save_model(model, tmp_path / "gemma4_wide")))
    assert sl.trace(m, PROMPTS).closure_error() <= coverage.CLOSURE_TOL
    with pytest.raises(sl.UnsupportedModelError, match=r"layer 1's attention output projection takes 64 inputs, "
                                                       r"not 4 heads × 8"):
        sl.trace(m, PROMPTS, heads=True)
