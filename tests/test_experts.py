"""Mixture of experts, one expert at a time: exact per-expert contributions and exact expert removal."""

import pytest
import torch

import streamlens as sl
from streamlens.coverage import _hand_drop_expert, _kl
from streamlens.model.experts import call_style, experts_module, moe_layers, n_experts
from streamlens.testing import build_bridged

PROMPTS = ["The cat sat on the mat because it was", "def f(x): return x + 1"]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            folder, _ = build_bridged(arch, tmp_path_factory.mktemp(arch) / arch)
            cache[arch] = (folder, sl.load(str(folder)))
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "OlmoeForCausalLM", "Qwen2MoeForCausalLM", "Llama4ForCausalLM",
                                  "FlexOlmoForCausalLM", "AfmoeForCausalLM"])
def test_experts_add_up_to_the_moe_write(moe, arch):
    _, m = moe(arch)
    by_expert = sl.decompose(m, PROMPTS, "top:3", unit="expert", progress=False)
    by_layer = sl.decompose(m, PROMPTS, "top:3", unit="layer", progress=False)
    assert by_expert.check() <= 1e-5
    for l in moe_layers(m):
        parts = [i for i, c in enumerate(by_expert.components) if c.layer == l and c.kind in ("expert", "mlp")]
        assert len(parts) == n_experts(m, l) + 1  # every expert, plus mlp_rest
        whole = by_layer.values[by_layer.labels.index(f"mlp.{l}")]
        torch.testing.assert_close(by_expert.values[parts].sum(0), whole, rtol=1e-5, atol=1e-6)
        rest = by_expert.values[by_expert.labels.index(f"mlp_rest.{l}")]
        # FlexOlmo and Afmoe write norm(moe(x)): the shares pass through that norm at its frozen scale
        if arch in ("Qwen2MoeForCausalLM", "Llama4ForCausalLM", "AfmoeForCausalLM"):  # the shared expert is the rest
            assert float(rest.abs().max()) > 1e-4
        else:  # no shared expert: the routed experts are the whole write
            assert float(rest.abs().max()) <= 1e-6 * float(whole.abs().max())
    df = by_expert.to_dataframe()
    assert set(df.loc[df.kind == "expert", "expert"].dropna().astype(int)) == set(range(n_experts(m, moe_layers(m)[0])))


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "Qwen2MoeForCausalLM", "Llama4ForCausalLM"])
def test_removing_an_expert_equals_zeroing_its_routing_weight_by_hand(moe, arch):
    folder, m = moe(arch)
    ids = torch.randint(1, 500, (3, 12), generator=torch.Generator().manual_seed(2))
    ev = sl.LayerSkipEvaluator(m, ids, batch_size=3, progress=False, n_boot=20)
    layer = moe_layers(m)[-1]
    for expert in range(n_experts(m, layer)):
        ex = experts_module(m, layer)
        clean, abl = _hand_drop_expert(folder, arch, ids, layer, expert, type(ex), call_style(ex) == "stacked")
        kl = _kl(clean, abl)
        for path in ("prefix", "naive"):
            got = ev.evaluate(f"expert.{layer}.{expert}", metrics=("kl", "top1"), path=path)
            assert abs(got["kl"] - kl) <= 1e-5 * (1 + kl)
            assert abs(got["top1"] - float((clean.argmax(-1) == abl.argmax(-1)).float().mean())) <= 1e-6
    assert kl > 1e-6  # the removal changed something
    both = ev.evaluate([f"expert.{layer}.0", f"expert.{layer}.1"], metrics=("kl",))["kl"]
    assert both > 0
    sweep = ev.sweep("expert")
    stacked = sl.LayerSkipEvaluator(m, ids, batch_size=3, progress=False, n_boot=20, variants_per_pass=3).sweep("expert")
    assert list(stacked.table["kl"]) == list(sweep.table["kl"])  # expert removals are not stacked (they crashed)
    assert list(sweep.table["unit"]) == [f"expert.{l}.{e}" for l in moe_layers(m) for e in range(n_experts(m, l))]


def test_expert_errors(moe, tiny_models):
    _, m = moe("MixtralForCausalLM")
    ev = sl.LayerSkipEvaluator(m, PROMPTS, progress=False, n_boot=10)
    with pytest.raises(sl.StreamlensError, match=r"expert 9 does not exist: block 1 has 4 routed experts \(0..3\)"):
        ev.evaluate("expert.1.9")
    with pytest.raises(sl.StreamlensError, match="an expert has no skip connection of its own: .* not 'drop-residual'"):
        ev.evaluate("expert.1.0", "drop-residual")
    with pytest.raises(sl.StreamlensError, match=r"expert\.0\.0: screening estimates writes into the stream"):
        ev.sweep("expert", screen=2)
    llama = tiny_models("llama")
    with pytest.raises(sl.StreamlensError, match="has no mixture-of-experts blocks"):
        sl.decompose(llama, PROMPTS, "top:1", unit="expert", progress=False)
    with pytest.raises(sl.StreamlensError, match="block 0 has no mixture of experts"):
        sl.LayerSkipEvaluator(llama, PROMPTS, progress=False, n_boot=10).evaluate("expert.0.0")


def test_llama4_experts_are_called_stacked():
    """Llama 4's experts module takes every expert's copy of the tokens at once (router score already applied)."""
    from streamlens.coverage import build

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        m = sl.load(str(build("Llama4ForCausalLM", f"{d}/l4")[0]))
        assert moe_layers(m) == (0, 1) and call_style(experts_module(m, 0)) == "stacked" and n_experts(m, 0) == 4


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "Llama4ForCausalLM"])
def test_an_expert_in_mean_mode_is_its_mean_share(moe, arch):
    """``mean``: the expert's share of the experts' output replaced by its mean share over the data, by hand on HF."""
    import transformers

    folder, m = moe(arch)
    ids = torch.randint(1, 500, (3, 12), generator=torch.Generator().manual_seed(3))
    layer, expert = moe_layers(m)[-1], 1
    ev = sl.LayerSkipEvaluator(m, ids, batch_size=3, progress=False, n_boot=10)
    hf = getattr(transformers, arch).from_pretrained(folder).eval()
    from streamlens.coverage import _decoder_layers

    cls = type(experts_module(m, layer))
    ex = next(mod for mod in _decoder_layers(hf)[layer].modules() if type(mod) is cls)
    stacked = call_style(ex) == "stacked"
    seen = {}

    def share(mod, args, out):  # expert `expert`'s share of this call, (tokens, d)
        if stacked:
            return out.view(mod.num_experts, -1, out.shape[-1])[expert]
        hidden, idx, w = args[:3]
        return mod.forward(hidden, idx, w * (idx == expert).to(w.dtype))

    h = ex.register_forward_hook(lambda mod, args, out: seen.__setitem__("share", share(mod, args, out).detach()))
    with torch.no_grad():
        clean = hf(ids, use_cache=False).logits
    h.remove()
    mean = seen["share"].reshape(3, 12, -1).mean(0)  # (pos, d): over the documents at each position

    def replace(mod, args, out):
        out = out.clone()
        if stacked:
            out.view(mod.num_experts, -1, out.shape[-1])[expert] = mean.repeat(3, 1)
            return out
        return out - share(mod, args, out) + mean.repeat(3, 1)

    h = ex.register_forward_hook(replace)
    with torch.no_grad():
        abl = hf(ids, use_cache=False).logits
    h.remove()
    kl = _kl(clean.float(), abl.float())
    assert kl > 1e-7
    got = ev.evaluate(f"expert.{layer}.{expert}", "mean", metrics=("kl",))["kl"]
    assert abs(got - kl) <= 1e-5 * (1 + kl)
    assert ev.evaluate(f"expert.{layer}.{expert}", "skip", metrics=("kl",))["kl"] != got
