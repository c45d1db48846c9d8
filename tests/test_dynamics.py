import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import streamlens as sl
from streamlens.depth import gradients
from streamlens.depth.claims import dynamics_file, init_copy
from streamlens.model import hooks
from streamlens.report.demo import pydoc_texts
from streamlens.stream.inputs import encode
from streamlens.testing import save_model, tiny_config
from tests.conftest import PROMPTS

GRAD_ARCHS = ("gpt2", "neox", "llama", "gemma2")


def _independent_grads(m, texts, layer):
    """∂L/∂resid_pre and ∂L/∂resid_post of ``layer`` by making each a leaf in its own forward, with the loss written out."""
    batch = encode(m, texts)
    out = {}
    for side in ("in", "out"):
        leaf = {}

        def fn(t):
            leaf["x"] = t.detach().requires_grad_(True)
            return leaf["x"]

        with torch.enable_grad(), hooks.attached([(hooks.block_point(m.bridge, layer, "block", side), fn)]):
            logits = m.run(batch.input_ids, batch.mask).float()
            loss = torch.zeros(())
            for i, n in enumerate(batch.lengths.tolist()):
                if n > 1:
                    loss = loss + F.cross_entropy(logits[i, : n - 1], batch.input_ids[i, 1:n])
            (out[side],) = torch.autograd.grad(loss, leaf["x"])
    return out["in"], out["out"]


@pytest.mark.parametrize("arch", GRAD_ARCHS)
def test_split_sums_to_independent_full_gradient(tiny_models, arch):
    m = tiny_models(arch)
    split = sl.gradient_split(m, PROMPTS)
    mask = split.mask
    assert split.full.shape == (m.arch.n_layers, *mask.shape, m.arch.d_model)
    for l in range(m.arch.n_layers):
        want_pre, want_post = _independent_grads(m, PROMPTS, l)
        scale = float(want_pre[mask].abs().max())
        assert scale > 0
        tol = dict(atol=1e-5 * scale, rtol=1e-4)
        torch.testing.assert_close(split.full[l][mask], want_pre[mask], **tol)
        torch.testing.assert_close(split.identity[l][mask], want_post[mask], **tol)
        torch.testing.assert_close((split.identity[l] + split.sublayer[l])[mask], want_pre[mask], **tol)
        # the sub-layer path is not trivially zero: the blocks of a random model do transform the gradient
        assert float(split.sublayer[l][mask].norm()) > 1e-3 * float(want_pre[mask].norm())
    assert split.split_error() <= 1e-5


def _zeroed_llama(tmp_path):
    cfg, cls = tiny_config("llama")
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return sl.load(str(save_model(hf, tmp_path / "zeroed")))


def test_zeroed_writes_give_identity_dynamics(tmp_path):
    m = _zeroed_llama(tmp_path)
    d = sl.dynamics(m, PROMPTS, progress=False)
    t = d.to_dataframe()
    assert len(t) == m.arch.n_layers and set(t["variant"]) == {"trained"}
    for col in ("attn_rel_update", "mlp_rel_update", "block_rel_update", "grad_sublayer_norm", "split_error"):
        assert float(t[col].abs().max()) <= 1e-7, col
    for col in ("cos_pre_post", "cos_embed", "resid_norm_growth"):
        assert float((t[col] - 1).abs().max()) <= 1e-5, col
    assert float(t["grad_full_norm"].min()) > 0
    torch.testing.assert_close(torch.tensor(t["grad_identity_norm"].values), torch.tensor(t["grad_full_norm"].values))
    claims = d.claims().set_index("statistic")
    assert claims.loc["median over layers of block_rel_update", "supported"] is True
    assert claims.loc["median over layers of ‖g_post·J_f‖ / ‖g_post‖", "value"] == 0


def test_padding_excluded(tiny_models):
    m = tiny_models("llama")
    batched = sl.dynamics(m, PROMPTS, batch_size=3, progress=False).to_dataframe()
    alone = sl.dynamics(m, PROMPTS, batch_size=1, progress=False).to_dataframe()
    lengths = [len(m.tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert (batched["n_positions"] == sum(lengths)).all()
    assert (batched["n_grad_positions"] == sum(n - 1 for n in lengths)).all()
    num = batched.select_dtypes("number").columns.drop("split_error")
    torch.testing.assert_close(torch.tensor(batched[num].values), torch.tensor(alone[num].values), atol=1e-6, rtol=1e-5)
    # per position too: a document's gradients do not depend on what it is batched with
    split = sl.gradient_split(m, PROMPTS)
    for i, p in enumerate(PROMPTS):
        one = sl.gradient_split(m, [p])
        n = lengths[i]
        torch.testing.assert_close(split.full[:, i, :n], one.full[:, 0], atol=1e-6, rtol=1e-5)


def test_drop_residual_changes_gradients(tiny_models):
    m = tiny_models("llama")
    base = sl.gradient_split(m, PROMPTS)
    dropped = sl.gradient_split(m, PROMPTS, drop_residual=[1])
    mask = base.mask
    assert dropped.split_error() <= 1e-5
    assert float(dropped.identity[1].abs().max()) == 0  # no skip path at the dropped layer
    torch.testing.assert_close(dropped.sublayer[1][mask], dropped.full[1][mask])
    # everything below the dropped skip changes
    diff = (dropped.full[0] - base.full[0])[mask].norm() / base.full[0][mask].norm()
    assert float(diff) > 0.1
    d = sl.dynamics(m, PROMPTS, drop_residual=[1], progress=False)
    t = d.to_dataframe()
    assert d.variants == ("trained", "dropped") and d.dropped_layers == (1,)
    dr, tr = d.variant("dropped"), d.variant("trained")
    assert dr["dropped"].tolist() == [False, True]
    # below the dropped layer the forward pass is unchanged, at it resid_post = f(resid_pre)
    torch.testing.assert_close(dr.loc[0, "resid_post_norm"], tr.loc[0, "resid_post_norm"])
    assert abs(dr.loc[1, "resid_post_norm"] - tr.loc[1, "resid_post_norm"]) > 1e-3
    assert len(t) == 2 * m.arch.n_layers


def _hook_count(m):
    return sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in m.hf.modules())


def test_hooks_and_grad_flags_restored(tiny_models, monkeypatch):
    m = tiny_models("gpt2")
    params = list(m.hf.parameters())
    params[0].requires_grad_(False)
    flags = [p.requires_grad for p in params]
    before = _hook_count(m)
    try:
        sl.dynamics(m, PROMPTS, drop_residual=[0], progress=False)
        assert _hook_count(m) == before
        assert [p.requires_grad for p in params] == flags and all(p.grad is None for p in params)

        def boom(*a, **k):
            raise RuntimeError("boom")

        monkeypatch.setattr(gradients, "loss_and_mask", boom)
        with pytest.raises(RuntimeError, match="boom"):
            sl.dynamics(m, PROMPTS, drop_residual=[0], progress=False)
        assert _hook_count(m) == before
        assert [p.requires_grad for p in params] == flags and all(p.grad is None for p in params)
    finally:
        params[0].requires_grad_(True)


def test_refusals(tiny_models):
    bert, llama = tiny_models("bert"), tiny_models("llama")
    with pytest.raises(sl.StreamlensError, match="post-norm"):
        sl.dynamics(bert, PROMPTS, progress=False)
    with pytest.raises(sl.StreamlensError, match=r"drop_residual=\[1\].*post-norm"):
        sl.dynamics(bert, PROMPTS, gradients=False, drop_residual=[1], progress=False)
    fwd = sl.dynamics(bert, PROMPTS, gradients=False, progress=False)
    assert "grad_full_norm" not in fwd.to_dataframe() and fwd.claims()["supported"].isna().sum() >= 3
    with pytest.raises(sl.StreamlensError, match="layer 7 is out of range for a 2-layer model"):
        sl.dynamics(llama, PROMPTS, drop_residual=[7], progress=False)
    with pytest.raises(sl.StreamlensError, match="target must be None .* got 100000"):
        sl.dynamics(llama, PROMPTS, target=100000, progress=False)
    with pytest.raises(sl.StreamlensError, match="empty"):
        sl.dynamics(llama, [], progress=False)
    with pytest.raises(sl.StreamlensError, match="two or more tokens"):
        sl.dynamics(llama, [[5]], progress=False)
    with pytest.raises(sl.StreamlensError, match="variant 'init' was not measured"):
        sl.dynamics(llama, PROMPTS, gradients=False, progress=False).variant("init")


def test_target_logit(tiny_models):
    m = tiny_models("neox")
    split = sl.gradient_split(m, PROMPTS, target=7)
    assert split.split_error() <= 1e-5 and bool((split.mask == encode(m, PROMPTS).mask).all())
    # the last position's logit depends on every earlier position, so no counted position has a zero gradient
    assert float(split.full[0][split.mask].norm(dim=-1).min()) > 0


def test_init_copy_is_seeded_and_fresh(tiny_models):
    m = tiny_models("llama")
    state = torch.random.get_rng_state()
    a, b, c = init_copy(m, seed=1), init_copy(m, seed=1), init_copy(m, seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc, wm = (x.hf.get_input_embeddings().weight for x in (a, b, c, m))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc) and not torch.equal(wa, wm)
    assert a.arch.n_layers == m.arch.n_layers and a.arch.layout == m.arch.layout
    d = sl.dynamics(m, PROMPTS, compare_init=True, progress=False)
    assert d.variants == ("trained", "init")
    t = d.to_dataframe()
    assert list(t.groupby("variant").size()) == [m.arch.n_layers] * 2


def test_result_save_plot_html_and_file(tiny_models, tmp_path):
    m = tiny_models("gpt2")
    data = tmp_path / "texts.jsonl"
    data.write_text("\n".join(json.dumps({"text": p}) for p in PROMPTS))
    d = dynamics_file(m, data, out=tmp_path / "d.json", compare_init=True, drop_residual=[1], progress=False)
    saved = json.loads((tmp_path / "d.json").read_text())
    assert len(saved["layers"]) == 4 * m.arch.n_layers and saved["dropped_layers"] == [1]
    assert d.variants == ("trained", "init", "dropped", "init_dropped")
    assert [c["claim"] for c in saved["claims"]] == d.claims()["claim"].tolist()
    back = pd.read_csv(d.save(tmp_path / "d.csv"))
    torch.testing.assert_close(torch.tensor(back["grad_full_norm"].values), torch.tensor(d.table["grad_full_norm"].values))
    fig = d.plot()
    assert {tr.name for tr in fig.data} >= {"grad_full_norm (init)", "block_rel_update (dropped)"}
    assert "Dynamics" in d._repr_html_() and "gradient highway" in d._repr_html_()
    claims = d.claims()
    assert claims["supported"].map(lambda v: v in (True, False)).all()  # every variant present: every verdict computed
    with pytest.raises(sl.StreamlensError, match="does not exist"):
        dynamics_file(m, tmp_path / "missing.txt")


@pytest.mark.smollm2
def test_smollm2_reproducible(smollm2):
    texts = pydoc_texts()[:2]
    a = sl.dynamics(smollm2, texts, max_tokens=16, progress=False)
    b = sl.dynamics(smollm2, texts, max_tokens=16, progress=False)
    pd.testing.assert_frame_equal(a.to_dataframe(), b.to_dataframe(), check_exact=True)
    t = a.to_dataframe()
    assert len(t) == 30 and float(t["split_error"].max()) <= 1e-4
    assert t.notna().all().all() and (t["grad_full_norm"] > 0).all()
