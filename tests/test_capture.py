import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

import streamlens as sl
from tests.conftest import CORE_ARCHS, MORE_ARCHS, PROMPTS

ALL = CORE_ARCHS + MORE_ARCHS


def _hf_logits(folder, arch, tr):
    cls = AutoModelForMaskedLM if arch == "bert" else AutoModelForCausalLM
    hf = cls.from_pretrained(folder).eval()
    with torch.no_grad():
        return hf(tr.input_ids, attention_mask=tr.mask.long()).logits


@pytest.mark.parametrize("arch", ALL)
def test_closure_logits_and_heads(tiny_models, tiny_dirs, arch):
    m = tiny_models(arch)
    tr = sl.trace(m, PROMPTS, heads=True)
    # closure_error includes the head writes + output bias against the attention write
    tol = 1e-4 if arch == "bert" else 1e-5
    assert tr.closure_error() <= tol
    # the traced logits are the HuggingFace model's own (a fresh, unwrapped copy)
    want = _hf_logits(tiny_dirs(arch), arch, tr)
    torch.testing.assert_close(tr["logits"][tr.mask], want[tr.mask], atol=1e-5, rtol=1e-5)
    L = m.arch.n_layers - 1
    heads = tr["head_out", L]
    assert heads.shape == (*tr.mask.shape, m.arch.n_heads, m.arch.d_model)
    torch.testing.assert_close(heads.sum(-2) + tr["attn_bias_out", L], tr["attn_out", L], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", [a for a in ALL if a != "bert"])
def test_last_resid_reproduces_logits(tiny_models, arch):
    """resid_post of the last layer -> final norm -> unembedding == the model's logits."""
    m = tiny_models(arch)
    tr = sl.trace(m, PROMPTS)
    L = m.arch.n_layers - 1
    w, b = m.unembed_weight()
    got = m.final_norm(tr["resid_post", L]) @ w.float().T + (0 if b is None else b)
    torch.testing.assert_close(got[tr.mask], tr["logits"][tr.mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tr["final_in"], tr["resid_post", L])
    torch.testing.assert_close(m.final_norm(tr["final_in"]), tr["final_out"].float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_padded_batch_equals_each_prompt_alone(tiny_models, arch):
    m = tiny_models(arch)
    batch = sl.trace(m, PROMPTS, heads=True)
    for i, p in enumerate(PROMPTS):
        alone = sl.trace(m, p, heads=True)
        n = alone.mask.shape[1]
        assert bool(batch.mask[i, :n].all()) and not bool(batch.mask[i, n:].any())
        for name in ("resid_pre", "attn_out", "mlp_out", "resid_post", "head_out"):
            for l in batch.layers:
                torch.testing.assert_close(batch[name, l][i, :n], alone[name, l][0], atol=2e-6, rtol=1e-5)
    # padding is excluded from the statistics: the batch summary equals the position-weighted mean
    df = batch.to_dataframe()
    assert int(df["n_positions"].iloc[0]) == int(batch.mask.sum())


def test_names_and_aliases(tiny_models):
    m = tiny_models("gpt2")
    tr = sl.trace(m, PROMPTS[0])
    assert tr["attn_write", 0] is tr["attn_out", 0]
    assert tr["attn_read", 1] is tr["resid_pre", 1]
    assert tr["mlp_read", 1] is tr["resid_mid", 1]
    st = tr.stack("mlp_out")
    assert st.labels == ("mlp_out.0", "mlp_out.1") and st.tensor.shape[0] == 2
    assert st.dims == ("layer", "batch", "sel", "d_model")
    torch.testing.assert_close(tr["resid_pre", 0], tr["embed"] + tr["pos_embed"])
    assert tr["final_scale"].shape[-1] == 1
    neox = sl.trace(tiny_models("neox"), PROMPTS[0])
    with pytest.raises(sl.StreamlensError, match="resid_mid"):
        neox["resid_mid", 0]
    assert neox["mlp_read", 0] is neox["resid_pre", 0]


def test_memory_controls_give_the_same_numbers(tiny_models):
    m = tiny_models("llama")
    full = sl.trace(m, PROMPTS)
    last = sl.trace(m, PROMPTS, positions="last", layers=[1], sublayers="mlp", store_dtype=torch.float16, store_device="cpu")
    lengths = full.mask.sum(1)
    assert last.positions[:, 0].tolist() == (lengths - 1).tolist()
    want = full["mlp_out", 1][torch.arange(3), lengths - 1]
    assert last["mlp_out", 1].dtype == torch.float16
    torch.testing.assert_close(last["mlp_out", 1][:, 0].float(), want, atol=1e-3, rtol=1e-3)
    with pytest.raises(sl.StreamlensError, match="layer 0 was not traced"):
        last["resid_pre", 0]
    with pytest.raises(sl.StreamlensError, match="not captured"):
        last["attn_out", 1]
    with pytest.raises(sl.StreamlensError, match="both sub-layers"):
        last.closure_error()
    inner = sl.trace(m, PROMPTS, positions=[0, -2])
    torch.testing.assert_close(inner["resid_post", 0][:, 0], full["resid_post", 0][:, 0])


def test_selected_positions_with_learned_positional_embeddings(tiny_models):
    """GPT-2's pos_embed output is (1, pos, d): selecting positions in a batch must broadcast it."""
    m = tiny_models("gpt2")
    full = sl.trace(m, PROMPTS)
    last = sl.trace(m, PROMPTS, positions="last")
    lengths = full.mask.sum(1)
    rows = torch.arange(len(PROMPTS))
    for name in ("embed", "pos_embed", "final_out"):
        want = full[name].expand(len(PROMPTS), *full[name].shape[1:])[rows, lengths - 1]
        torch.testing.assert_close(last[name][:, 0], want)
    assert last.closure_error() <= 1e-5


def test_trace_stats_streams_to_the_same_table(tiny_models):
    m = tiny_models("gpt2")
    texts = PROMPTS * 3
    whole = sl.trace(m, texts).to_dataframe()
    streamed = sl.trace_stats(m, texts, batch_size=2, progress=False).to_dataframe()
    assert list(streamed.columns) == list(whole.columns)
    torch.testing.assert_close(torch.tensor(streamed.values, dtype=torch.float64),
                               torch.tensor(whole.values, dtype=torch.float64), atol=1e-6, rtol=1e-6)


def test_summary_plot_save_render(tiny_models, tmp_path):
    tr = sl.trace(tiny_models("gpt2"), PROMPTS)
    df = tr.to_dataframe()
    for col in ("layer", "resid_pre_norm", "attn_write_norm", "mlp_rel_update", "cos_pre_post", "block_rel_update"):
        assert col in df
    assert len(df) == 2 and (df["attn_rel_update"] > 0).all()
    fig = tr.plot()
    assert len(fig.data) >= 5
    assert tr.save(tmp_path / "t.csv").read_text().startswith("layer,")
    assert '"closure_error"' in tr.save(tmp_path / "t.json").read_text()
    tr.save(tmp_path / "t.pt")
    assert "closure error" in tr._repr_html_() and "ResidualTrace" in repr(tr)


def _hooks_attached(model) -> int:
    return sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in model.hf.modules())


def test_hooks_never_leak_even_when_a_hook_raises(tiny_models, monkeypatch):
    m = tiny_models("gpt2")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    before_hooks = _hooks_attached(m)
    with torch.no_grad():
        before = m.run(ids, mask)
    layout = type(m.arch.rule)
    real = layout.named

    def boom(self, raw, sublayers, has_ln2):
        if boom.calls == 1:  # second layer: mid-trace
            raise RuntimeError("boom inside a hook")
        boom.calls += 1
        return real(self, raw, sublayers, has_ln2)

    boom.calls = 0
    monkeypatch.setattr(layout, "named", boom)
    with pytest.raises(RuntimeError, match="boom"):
        sl.trace(m, ids)
    assert _hooks_attached(m) == before_hooks
    with torch.no_grad():
        torch.testing.assert_close(m.run(ids, mask), before, atol=0, rtol=0)
    monkeypatch.undo()
    sl.trace(m, ids)
    assert _hooks_attached(m) == before_hooks


@pytest.mark.parametrize(
    "kwargs, inputs, match",
    [
        ({}, "", "input 0 is empty"),
        ({}, [], "empty list"),
        ({}, ["ok", "   "], "input 1 is empty"),
        ({}, "word " * 300, "longer than the model's context of 128"),
        ({"layers": [5]}, "hi", "layer 5 is out of range for a 2-layer model"),
        ({"positions": [40]}, "hi there", "position 40 is out of range for input 0"),
        ({"positions": "first"}, "hi", "positions must be"),
        ({"sublayers": ("attn", "ffn")}, "hi", "unknown sub-layer 'ffn'"),
        ({}, torch.tensor([[1, 2, 9999]]), "token id 9999 outside the vocabulary"),
        ({}, torch.tensor([[0.5, 1.0]]), "integer tensor"),
        ({}, 3.14, "got float"),
    ],
)
def test_bad_input_is_a_clear_error(tiny_models, kwargs, inputs, match):
    with pytest.raises(sl.StreamlensError, match=match):
        sl.trace(tiny_models("gpt2"), inputs, **kwargs)


def test_unknown_name_is_a_clear_error(tiny_models):
    tr = sl.trace(tiny_models("gpt2"), "hi")
    with pytest.raises(sl.StreamlensError, match="unknown name 'resid_middle'"):
        tr["resid_middle", 0]
    with pytest.raises(sl.StreamlensError, match="layer 7 is out of range"):
        tr["resid_pre", 7]


@pytest.mark.smollm2
def test_smollm2_trace(smollm2):
    a = smollm2.arch
    assert (a.n_layers, a.d_model, a.n_heads, a.n_kv_heads, a.layout, a.norm) == (30, 576, 9, 3, "pre", "rmsnorm")
    tr = sl.trace(smollm2, ["The capital of France is", "def fibonacci(n):"], heads=True, layers=[0, 14, 29])
    assert tr.closure_error() <= 1e-5
    w, b = smollm2.unembed_weight()
    got = smollm2.final_norm(tr["resid_post", 29]) @ w.float().T + (0 if b is None else b)
    torch.testing.assert_close(got[tr.mask], tr["logits"][tr.mask], atol=1e-4, rtol=1e-4)
