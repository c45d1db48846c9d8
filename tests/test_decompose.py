import pytest
import torch

import streamlens as sl
from streamlens.model import hooks
from streamlens.stream.inputs import encode, select_positions
from tests.conftest import PROMPTS

# Every prompt has at least three tokens, so -1, -2 and the absolute position 1 exist in each.
DPROMPTS = ["The cat sat on the mat because it was", "Hello world", "Python is a programming language"]
ARCHS = ("gpt2", "neox", "llama", "gemma", "gemma2", "qwen2", "opt")


def _tok(m, s):
    ids = m.tokenizer(s, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1
    return ids[0]


def _model_logits(m, prompts, position):
    batch = encode(m, prompts)
    idx, _ = select_positions(batch, position)
    with torch.no_grad():
        logits = m.run(batch.input_ids, batch.mask).float()
    return logits[torch.arange(len(batch))[:, None], idx], idx


def _final(m, prompts, position, name):
    # trace every position and gather here (trace(positions=...) trips on GPT-2's (1, pos, d) pos_embed; see report)
    tr = sl.trace(m, prompts)
    idx, _ = select_positions(encode(m, prompts), position)
    return tr[name].float()[torch.arange(len(prompts))[:, None], idx]


def _targets(m):
    g = torch.Generator().manual_seed(1)
    return {"token": (" the", None), "diff": (" the", " a"), "direction": (torch.randn(m.arch.d_model, generator=g), None)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["token", "diff", "direction"])
def test_contributions_sum_to_the_models_own_value(tiny_models, arch, kind):
    """Padded batch, last and inner positions: Σ contributions == the model's logit / logit diff / u · ln_final(x)."""
    m = tiny_models(arch)
    target, contrast = _targets(m)[kind]
    position = [-1, 1]
    dec = sl.decompose(m, DPROMPTS, target, contrast=contrast, position=position, progress=False)
    assert dec.check() <= 1e-5
    logits, idx = _model_logits(m, DPROMPTS, position)
    assert torch.equal(dec.positions, idx)
    if kind == "direction":
        want = _final(m, DPROMPTS, position, "final_out") @ target
    else:
        want = logits[..., _tok(m, target)] - (0 if contrast is None else logits[..., _tok(m, contrast)])
    torch.testing.assert_close(dec.total()[..., 0], want, atol=1e-5, rtol=1e-4)
    # one component per writer: embed (+ pos_embed), attn.l and mlp.l per layer, one bias
    L = m.arch.n_layers
    n_embed = 2 if m.arch.has_pos_embed and m.arch.embed_is_sum else 1
    assert len(dec.labels) == n_embed + 2 * L + 1 and dec.labels[-1] == "bias"
    assert set(dec.kinds) == {"embed", "attn", "mlp", "bias"}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_heads_and_neurons_refine_the_layer_split(tiny_models, arch):
    m = tiny_models(arch)
    layer = sl.decompose(m, DPROMPTS, " the", contrast=" a", progress=False)
    head = sl.decompose(m, DPROMPTS, " the", contrast=" a", unit="head", progress=False)
    assert head.check() <= 1e-5
    A = m.arch
    for l in range(A.n_layers):
        parts = [i for i, (k, ll) in enumerate(zip(head.labels, head.layers)) if ll == l and k.startswith(("head.", "attn_bias."))]
        assert len(parts) == A.n_heads + 1
        torch.testing.assert_close(head.values[parts].sum(0), layer.values[layer.labels.index(f"attn.{l}")], atol=1e-5, rtol=1e-4)
    if A.layout == "sandwich":
        with pytest.raises(sl.StreamlensError, match="sandwich"):
            sl.decompose(m, DPROMPTS, " the", unit="neuron", progress=False)
        return
    neu = sl.decompose(m, DPROMPTS, " the", contrast=" a", unit="neuron", layers=[1], neurons=5, progress=False)
    assert neu.check() <= 1e-5
    picked = [i for i, k in enumerate(neu.kinds) if k == "neuron"]
    assert len(picked) == 5 and all(neu.layers[i] == 1 for i in picked)
    rest = neu.labels.index("mlp_rest.1")
    torch.testing.assert_close(neu.values[picked + [rest]].sum(0), layer.values[layer.labels.index("mlp.1")], atol=1e-5, rtol=1e-4)
    # the chosen neurons are the largest by mean |contribution|: check against all of them
    every = sl.decompose(m, DPROMPTS, " the", contrast=" a", unit="neuron", layers=[1], neurons=A.d_mlp, progress=False)
    idx = [i for i, k in enumerate(every.kinds) if k == "neuron"]
    score = every.values[idx].abs().flatten(1).mean(1)
    want = {every.neurons[idx[j]] for j in score.topk(5).indices.tolist()}
    assert {neu.neurons[i] for i in picked} == want
    # with every neuron chosen, the rest is the down projection's bias alone, read at the frozen final scale
    from streamlens.model.affine import down_projection

    x = _final(m, DPROMPTS, -1, "final_in")
    b_down = down_projection(m, 1)[1].expand_as(x)
    W = m.unembed_weight()[0].float()
    want = m.final_norm.linear_part(b_down, m.final_norm.scale(x)) @ (W[_tok(m, " the")] - W[_tok(m, " a")])
    torch.testing.assert_close(every.values[every.labels.index("mlp_rest.1"), :, :, 0], want, atol=1e-5, rtol=1e-4)


def test_top_k_and_full_vocabulary(tiny_models):
    m = tiny_models("llama")
    logits, _ = _model_logits(m, DPROMPTS, [-1, 0])
    full = sl.decompose(m, DPROMPTS, "vocab", position=[-1, 0], chunk_size=100, progress=False)
    assert full.values.shape[-1] == m.arch.d_vocab and full.check() <= 1e-5
    torch.testing.assert_close(full.total(), logits, atol=1e-5, rtol=1e-4)
    one_chunk = sl.decompose(m, DPROMPTS, "vocab", position=[-1, 0], chunk_size=10_000, progress=False)
    torch.testing.assert_close(full.values, one_chunk.values, atol=1e-6, rtol=1e-5)
    top = sl.decompose(m, DPROMPTS, "top:3", position=[-1, 0], progress=False)
    assert torch.equal(top.target_ids, logits.topk(3, -1).indices)
    got = full.values.gather(-1, top.target_ids[None].expand(len(full.labels), -1, -1, -1))
    torch.testing.assert_close(got, top.values, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_renormed_ablation_of_the_last_write_matches_running_without_it(tiny_models, arch):
    """Removing the last MLP write changes nothing downstream but the final norm: run it and compare."""
    m = tiny_models(arch)
    dec = sl.decompose(m, DPROMPTS, " the", contrast=" a", progress=False)
    L = m.arch.n_layers - 1
    batch = encode(m, DPROMPTS)
    idx, _ = select_positions(batch, -1)
    with torch.no_grad(), hooks.attached([(hooks.block_point(m.bridge, L, "mlp", "out"), torch.zeros_like)]):
        logits = m.run(batch.input_ids, batch.mask).float()[torch.arange(3)[:, None], idx]
    want = logits[..., _tok(m, " the")] - logits[..., _tok(m, " a")]
    c = dec.labels.index(f"mlp.{L}")
    torch.testing.assert_close(dec.ablated_renormed[c, ..., 0], want, atol=1e-5, rtol=1e-4)
    df = dec.to_dataframe()
    row = df[(df.component == f"mlp.{L}")]
    torch.testing.assert_close(torch.tensor(row.direct_effect_renormed.values, dtype=torch.float32),
                               (dec.model_values[..., 0, 0] - want[..., 0]).float(), atol=1e-5, rtol=1e-4)
    assert df[df.kind == "bias"].ablated_logit_renormed.isna().all()


def test_agrees_with_transformer_lens_logit_attrs(tiny_models, tiny_dirs):
    """TransformerLens' compatibility mode folds and centres the weights; after accounting for that the values agree.

    What folding/centring changes, and why each cancels here:
    * fold_ln moves ln_final's gain g into W_U (W_U'[t] = g ⊙ W_U[t]): u · (g ⊙ C x_i / s) is the same number,
      and ln_final's bias moves into b_U, which TL's per-component attributions leave out (our "bias" row).
    * center_writing_weights subtracts each write's mean over d_model: the final LayerNorm's centring C removes
      it anyway, so C x_i is unchanged.
    * center_unembed subtracts the vocabulary mean of W_U'; each attribution loses the mean-token term
      mean_v W_U[v] · ln_final-part(x_i). It cancels in a logit difference; for a single token it is our
      decomposition of the direction u = mean_v W_U[v], so TL == ours(token) − ours(direction mean W_U).
    * fold_value_biases moves value biases into b_O: per-head values change, per-layer attn writes do not.
    """
    from transformer_lens.model_bridge import TransformerBridge

    m = tiny_models("gpt2")
    br = TransformerBridge.boot_transformers(str(tiny_dirs("gpt2")))
    br.enable_compatibility_mode(disable_warnings=True)
    batch = encode(m, DPROMPTS)
    last = batch.lengths - 1
    with torch.no_grad():
        _, cache = br.run_with_cache(batch.input_ids, attention_mask=batch.mask.long())
        stack, labels = cache.decompose_resid(layer=-1, return_labels=True)
    t, c = _tok(m, " the"), _tok(m, " a")
    n = len(DPROMPTS)
    ours_names = {"embed": "embed", "pos_embed": "pos_embed"}
    ours_names.update({f"{l}_{s}_out": f"{s}.{l}" for l in range(m.arch.n_layers) for s in ("attn", "mlp")})
    diff = sl.decompose(m, DPROMPTS, " the", contrast=" a", progress=False)
    tok = sl.decompose(m, DPROMPTS, " the", progress=False)
    mean_dir = sl.decompose(m, DPROMPTS, m.unembed_weight()[0].float().mean(0), progress=False)
    with torch.no_grad():
        tl_diff = cache.logit_attrs(stack, torch.tensor([t] * n), incorrect_tokens=torch.tensor([c] * n))
        tl_tok = cache.logit_attrs(stack, torch.tensor([t] * n))
    rows = torch.arange(n)
    for i, name in enumerate(labels):
        j = diff.labels.index(ours_names[name])
        torch.testing.assert_close(diff.values[j, :, 0, 0], tl_diff[i, rows, last].float(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(tok.values[j, :, 0, 0] - mean_dir.values[j, :, 0, 0], tl_tok[i, rows, last].float(),
                                   atol=1e-5, rtol=1e-4)


def test_dataset_level_batches_means_and_outputs(tiny_models, tmp_path):
    m = tiny_models("gpt2")
    texts = DPROMPTS * 3
    targets = [" the", " a", " is"] * 3
    one = sl.decompose(m, texts, targets, progress=False, batch_size=100)
    many = sl.decompose(m, texts, targets, progress=False, batch_size=2)
    torch.testing.assert_close(one.values, many.values, atol=1e-6, rtol=1e-5)
    assert torch.equal(one.target_ids[:, 0, 0], torch.tensor([_tok(m, t) for t in targets]))
    mean = many.mean()
    c = many.labels.index("attn.1")
    row = mean[mean.component == "attn.1"].iloc[0]
    v = many.values[c, :, 0, 0].double()
    assert abs(row["mean"] - float(v.mean())) <= 1e-6
    assert abs(row["sem"] - float(v.std() / len(v) ** 0.5)) <= 1e-6 and row["n"] == len(texts)
    df = many.to_dataframe()
    assert {"component", "kind", "layer", "head", "position", "prompt", "value", "ablated_logit_renormed",
            "direct_effect_renormed"} <= set(df.columns)
    assert len(df) == len(many.labels) * len(texts)
    assert many.save(tmp_path / "d.csv").exists() and many.save(tmp_path / "d.json").exists()
    assert many.plot().data and "LogitDecomposition" in many._repr_html_()
    heads = sl.decompose(m, PROMPTS[:1], " the", unit="head", progress=False)
    assert heads.plot().data[0].type == "heatmap"


def test_bad_input_is_refused_with_a_clear_error(tiny_models):
    m = tiny_models("gpt2")
    with pytest.raises(sl.StreamlensError, match=r"'hello world' is not a single token: it tokenizes into"):
        sl.decompose(m, DPROMPTS, "hello world", progress=False)
    with pytest.raises(sl.StreamlensError, match=r"shape \(32,\)"):
        sl.decompose(m, DPROMPTS, torch.randn(7), progress=False)
    with pytest.raises(sl.StreamlensError, match="2 entries but there are 3 prompts"):
        sl.decompose(m, DPROMPTS, [" the", " a"], progress=False)
    with pytest.raises(sl.StreamlensError, match="unknown unit 'block'"):
        sl.decompose(m, DPROMPTS, " the", unit="block", progress=False)
    with pytest.raises(sl.StreamlensError, match="top:0"):
        sl.decompose(m, DPROMPTS, "top:0", progress=False)
    with pytest.raises(sl.StreamlensError, match="outside the vocabulary"):
        sl.decompose(m, DPROMPTS, 10**6, progress=False)
    with pytest.raises(sl.StreamlensError, match="position -99 is out of range"):
        sl.decompose(m, DPROMPTS, " the", position=-99, progress=False)
    with pytest.raises(sl.StreamlensError, match="layer 5 is out of range"):
        sl.decompose(m, DPROMPTS, " the", unit="neuron", layers=[5], progress=False)
    with pytest.raises(sl.UnsupportedModelError, match="post-norm"):
        sl.decompose(tiny_models("bert"), DPROMPTS, " the", progress=False)


def test_induction_head_carries_the_correct_token(induction_model):
    """On the repeated half, the layer-1 head with the highest induction score writes most of the correct logit."""
    from streamlens.testing import induction_batch, induction_scores

    m = induction_model
    half = 16
    ids = induction_batch(24, half, seed=7)
    cut = [half + 2 + (i % (half - 3)) for i in range(len(ids))]  # each prompt stops inside the repeated half
    prompts = [ids[i, :c].tolist() for i, c in enumerate(cut)]
    targets = [int(ids[i, c]) for i, c in enumerate(cut)]  # the token induction predicts
    dec = sl.decompose(m, prompts, targets, unit="head", progress=False)
    assert dec.check() <= 1e-5
    scores = induction_scores(m)
    best = int(scores[1].argmax())
    mean = dec.values[:, :, 0, 0].mean(1)
    top = dec.labels[int(mean.argmax())]
    assert top == f"head.1.{best}", (top, scores)
    # "the bulk": the induction heads (induction score > 0.5; this model grows several, all in
    # layer 1) together give more than half of the mean correct-token logit, and the layer-0 heads
    # (the previous-token heads, which act through layer 1's keys, not directly) give next to none.
    induction = [(l, h) for l, h in (scores > 0.5).nonzero().tolist()]
    assert induction and all(l == 1 for l, _ in induction), scores
    logit = float(dec.model_values.mean())
    carried = sum(float(mean[dec.labels.index(f"head.{l}.{h}")]) for l, h in induction)
    assert carried > 0.5 * logit, (carried, logit)
    layer0 = sum(abs(float(mean[dec.labels.index(f"head.0.{h}")])) for h in range(m.arch.n_heads))
    assert layer0 < 0.05 * logit, (layer0, logit)


@pytest.mark.smollm2
def test_smollm2_contributions_sum_to_its_logits(smollm2):
    prompts = ["The capital of France is", "One, two, three,"]
    dec = sl.decompose(smollm2, prompts, "top:2", unit="head", progress=False)
    assert dec.check() <= 1e-4
    logits, _ = _model_logits(smollm2, prompts, -1)
    torch.testing.assert_close(dec.total(), logits.topk(2, -1).values, atol=2e-3, rtol=1e-4)
