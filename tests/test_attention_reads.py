"""Attention reads across positions: per-source writes, value paths, targeted removals, the flow graph."""

import pytest
import torch

import streamlens as sl
from streamlens.model import hooks
from streamlens.testing import induction_batch, induction_scores, previous_token_scores

# Every prompt has at least three tokens; lengths differ, so the batch is padded.
PROMPTS = ["The cat sat on the mat because it was", "Hello world", "Python is a programming language"]
ARCHS = ("gpt2", "neox", "llama", "gemma2", "qwen2", "opt", "gptj")


def _per_head(dec, L, H):
    """Per-head sums of a unit='source' decomposition, (L, H, prompt, sel, target)."""
    idx = {}
    for c, (kind, l, h) in enumerate(zip(dec.kinds, dec.layers, dec.heads)):
        if kind == "source":
            idx.setdefault((l, h), []).append(c)
    return torch.stack([torch.stack([dec.values[idx[(l, h)]].sum(0) for h in range(H)]) for l in range(L)])


@pytest.mark.parametrize("arch", ARCHS)
def test_trace_source_writes_sum_to_head_writes(tiny_models, arch):
    m = tiny_models(arch)
    tr = sl.trace(m, PROMPTS, positions=[-1, 0], sources=True)
    assert tr.closure_error() <= 1e-5  # includes head_source_out.sum(source) == head_out
    a = m.arch
    for l in range(a.n_layers):
        src, pat = tr["head_source_out", l], tr["pattern", l]
        assert src.shape == (3, 2, a.n_heads, tr.input_ids.shape[1], a.d_model)
        torch.testing.assert_close(src.sum(-2), tr["head_out", l], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(pat.sum(-1), torch.ones(3, 2, a.n_heads), atol=1e-5, rtol=0)
        after = torch.arange(pat.shape[-1])[None, None, :] > tr.positions[..., None]  # (b, sel, source)
        assert float(pat.permute(0, 1, 3, 2)[after].abs().max()) == 0.0  # causal: nothing read after the query
    assert tr.stack("pattern").dims == ("layer", "batch", "sel", "head", "source")


@pytest.mark.parametrize("arch", ARCHS)
def test_source_unit_sums_to_each_head_in_a_padded_batch(tiny_models, arch):
    m = tiny_models(arch)
    a = m.arch
    # batch_size=2: two batches of different padded lengths, so the source components are padded too
    src = sl.decompose(m, PROMPTS, " the", contrast=" a", unit="source", positions=[-1, -2], batch_size=2, progress=False)
    head = sl.decompose(m, PROMPTS, " the", contrast=" a", unit="head", positions=[-1, -2], progress=False)
    assert src.check() <= 1e-5
    want = torch.stack([torch.stack([head.values[head.labels.index(f"head.{l}.{h}")] for h in range(a.n_heads)])
                        for l in range(a.n_layers)])
    torch.testing.assert_close(_per_head(src, a.n_layers, a.n_heads), want, atol=1e-6, rtol=1e-5)
    df = src.to_dataframe()
    s = df[df.kind == "source"]
    lengths = [len(t) for t in src.str_tokens]
    assert (s["source"] <= s["position"]).all()
    assert len(s) == a.n_layers * a.n_heads * sum(int(p) + 1 for i in range(3) for p in src.positions[i])
    assert all(tok == src.str_tokens[p][k] for p, k, tok in zip(s.prompt, s.source, s.source_token))
    assert max(lengths) == len(set(s.source))
    assert src.plot().data


@pytest.mark.parametrize("arch", ARCHS)
def test_value_paths_sum_to_each_heads_value_read(tiny_models, arch):
    m = tiny_models(arch)
    heads = ["head.1.0", (1, 3), "head.0.2"]
    vp = sl.value_paths(m, PROMPTS, " the", contrast=" a", positions=[-1, -2], heads=heads)
    assert vp.check() <= 1e-5
    dec = sl.decompose(m, PROMPTS, " the", contrast=" a", unit="head", positions=[-1, -2], progress=False)
    want = torch.stack([dec.values[dec.labels.index(f"head.{l}.{h}")] for l, h in vp.heads])
    torch.testing.assert_close(vp.head_values, want, atol=1e-6, rtol=1e-5)
    # coarser writers (attn.l, mlp.l) regroup the same paths
    coarse = sl.value_paths(m, PROMPTS, " the", contrast=" a", positions=[-1, -2], heads=heads, upstream="layer")
    attn0 = [i for i, w in enumerate(vp.writers) if w.startswith(("head.0.", "attn_bias.0"))]
    torch.testing.assert_close(vp.values[:, attn0].sum(1), coarse.values[:, coarse.writers.index("attn.0")],
                               atol=1e-6, rtol=1e-5)
    df = vp.to_dataframe()
    assert not ((df["layer"] == 0) & (df["writer_layer"] == 0)).any()  # a layer-0 head reads no layer-0 write
    assert {"writer", "source", "source_token", "value", "direct_effect_renormed"} <= set(df.columns)
    assert df.loc[df.writer != "value_bias", "direct_effect_renormed"].notna().all()


def test_renormed_path_recomputes_the_value_norm(tiny_models):
    """direct_effect_renormed: the head's contribution minus its contribution with the writer's write at k
    removed from the value input only (norm recomputed, pattern and final norm held), recomputed by hand."""
    from streamlens.stream.attention import value_map

    m = tiny_models("llama")
    vp = sl.value_paths(m, PROMPTS[:1], " the", heads=["head.1.2"])
    tr = sl.trace(m, PROMPTS[:1], heads=True, patterns=True)
    n = vp.writers.index("mlp.0")
    x, w = tr["resid_pre", 1][0], tr["mlp_out", 0][0]  # (P, d)
    ln1 = m.block_norms[(1, "ln1")]
    w_v, b_v = value_map(m, 1)
    kv = 2 // (m.arch.n_heads // m.arch.n_kv_heads)
    dv = (ln1(x) - ln1(x - w)) @ w_v[:, kv]  # (P, d_head): what the value at each source loses
    w_o, _ = m.head_weights(1)
    final = m.final_norm
    xq = tr["final_in"][0, -1]
    r = m.unembed_weight()[0][m.tokenizer(" the", add_special_tokens=False)["input_ids"][0]].float() * final.gain / final.scale(xq)
    A = tr["pattern", 1][0, -1, 2]  # (P,)
    want = A * (dv @ w_o[2] @ r)
    torch.testing.assert_close(vp.renormed[0, n, 0, 0, 0], want, atol=1e-6, rtol=1e-4)


def test_reads_that_do_not_add_up_are_refused(tiny_models):
    m = tiny_models("gpt2")
    # corrupt what the output projection receives: the pattern times the values no longer gives it
    bad = (hooks.block_point(m.bridge, 1, "o", "in"), lambda t: t + 1.0)
    with hooks.attached([bad]), pytest.raises(sl.UnsupportedModelError, match="pattern times the values"):
        sl.trace(m, PROMPTS, patterns=True)
    with pytest.raises(sl.UnsupportedModelError, match="post-norm"):
        sl.decompose(tiny_models("bert"), PROMPTS, " the", unit="source", progress=False)
    with pytest.raises(sl.StreamlensError, match="unit='source' with target='vocab'"):
        sl.decompose(m, PROMPTS, "vocab", unit="source", progress=False)
    with pytest.raises(sl.StreamlensError, match="not upstream of head.1.0"):
        sl.remove_from_input(m, PROMPTS, head="head.1.0", writer="mlp.1")
    with pytest.raises(sl.StreamlensError, match="input must be one of"):
        sl.remove_from_input(m, PROMPTS, head="head.1.0", writer="mlp.0", input="keys")
    with pytest.raises(sl.StreamlensError, match="'mlp.0' is not an attention head"):
        sl.value_paths(m, PROMPTS, " the", heads="mlp.0")
    with pytest.raises(sl.StreamlensError, match="head 9 does not exist"):
        sl.value_paths(m, PROMPTS, " the", heads=(1, 9))
    with pytest.raises(sl.StreamlensError, match="one prompt"):
        sl.information_flow(m, PROMPTS, " the")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_removal_from_one_input_changes_only_that_heads_read(tiny_models, arch):
    m = tiny_models(arch)
    a = m.arch
    pats = []
    grab = (hooks.hook_point(hooks.block_component(m.bridge, 1, "attn"), "pattern"), lambda t: pats.append(t.clone()))
    group = lambda h: [g for g in range(a.n_heads) if g // (a.n_heads // a.n_kv_heads) == h // (a.n_heads // a.n_kv_heads)]  # noqa: E731
    for inp, changed in (("query", [1]), ("key", group(1)), ("value", [])):
        pats.clear()
        with hooks.attached([grab]):
            rem = sl.remove_from_input(m, PROMPTS, head="head.1.1", writer="head.0.2", input=inp, target=" the")
        clean, removed = pats[-2:]  # the clean and the changed run (after the trace of the writer)
        torch.testing.assert_close(clean[:, 1], rem.pattern_clean)
        torch.testing.assert_close(removed[:, 1], rem.pattern_removed)
        for h in range(a.n_heads):
            diff = float((clean[:, h] - removed[:, h]).abs().max())
            assert (diff > 1e-7) == (h in changed), (inp, h, diff)
        assert rem.target_clean.shape == (3, 1, 1)
        assert (inp == "query") <= bool((rem.target_clean != rem.target_removed).any())
    assert "pattern_change" in rem.to_dataframe() and rem.plot().data


@pytest.mark.parametrize("arch", ARCHS)
def test_flow_graph_edges_are_exact(tiny_models, arch):
    m = tiny_models(arch)
    g = sl.information_flow(m, PROMPTS[0], " the", contrast=" a", threshold=0.01, ifr=True)
    assert g.check() <= 1e-5
    df = g.to_dataframe()
    assert set(df.kind) <= {"attn", "mlp", "embed"} and set(df.level) <= {1, 2} and len(df)
    assert ((df.kind != "attn") | (df.source <= df.destination)).all()
    assert (df.loc[df.level == 1, "destination"] == g.position).all()
    att = df[df.kind == "attn"].ifr
    assert ((att >= 0) & (att <= 1)).all()
    fig = g.plot()
    assert len(fig.data) == len(df) + 2 and list(fig.layout.xaxis.ticktext)[0].startswith("0:")


def test_attention_patterns_render_with_token_labels(tiny_models, tmp_path):
    from streamlens.testing import _attention_patterns

    m = tiny_models("llama")
    ap = sl.attention_patterns(m, PROMPTS[:1])
    # the bridge's own hook_pattern, read independently
    want = _attention_patterns(m, m.tokenizer(PROMPTS[:1], return_tensors="pt")["input_ids"])
    for l in range(m.arch.n_layers):
        torch.testing.assert_close(ap[l], want[l])
    df = ap.to_dataframe()
    assert {"layer", "head", "query", "source", "query_token", "source_token", "weight"} <= set(df.columns)
    assert (df["source"] <= df["query"]).all()
    html = ap._repr_html_()
    assert html.count("<table") == m.arch.n_heads and "&#x27;The&#x27;" in html
    fig = ap.plot(1)
    assert len(fig.data) == m.arch.n_heads and fig.layout.updatemenus
    assert ap.save(tmp_path / "p.csv").exists()


# ---------------------------------------------------------------------------- the induction circuit
def _induction_prompts(half=16):
    ids = induction_batch(24, half, seed=7)
    cut = [half + 2 + (i % (half - 3)) for i in range(len(ids))]  # each prompt stops inside the repeated half
    return [ids[i, :c].tolist() for i, c in enumerate(cut)], [int(ids[i, c]) for i, c in enumerate(cut)], \
        [c - half for c in cut]  # the source right after the previous occurrence of the last token


def test_induction_heads_read_the_token_after_the_previous_occurrence(induction_model):
    m = induction_model
    prompts, targets, after = _induction_prompts()
    dec = sl.decompose(m, prompts, targets, unit="source", progress=False)
    assert dec.check() <= 1e-5
    induction = [tuple(x) for x in (induction_scores(m) > 0.5).nonzero().tolist()]
    df = dec.to_dataframe()
    s = df[df.kind == "source"]
    s = s[[(int(l), int(h)) in induction for l, h in zip(s["layer"], s["head"])]]
    there = s[s.source.values == [after[p] for p in s.prompt]]
    frac = float(there.value.sum() / s.value.sum())
    assert frac >= 0.9, frac  # measured 0.99 on the seeded model


def test_induction_value_paths_and_the_key_role_of_the_previous_token_head(induction_model):
    """The exact value paths and the causal removals agree: what the induction heads copy comes through their
    values from layer-0 writes *at the source* (heads attending to their own token, and the embedding); the
    previous-token head's own value path is negligible, and it acts through the induction heads' keys."""
    m = induction_model
    prompts, targets, after = _induction_prompts()
    induction = [tuple(x) for x in (induction_scores(m) > 0.5).nonzero().tolist()]
    prev = int(previous_token_scores(m)[0].argmax())
    vp = sl.value_paths(m, prompts, targets, heads=induction)
    assert vp.check() <= 1e-5
    df = vp.to_dataframe()
    at = df[df.source.values == [after[p] for p in df.prompt]]
    per_writer = at.groupby("writer")["value"].sum().sort_values(ascending=False)
    total = float(df.value.sum())
    assert float(at.value.sum()) >= 0.9 * total
    top_writer = per_writer.index[0]
    assert top_writer.startswith("head.0."), per_writer  # a layer-0 head at that source -> induction head -> target
    assert per_writer[f"head.0.{prev}"] <= 0.05 * float(at.value.sum()), per_writer
    # causal check: the previous-token head removed from one induction head's key input destroys its pattern;
    # from its value input it leaves the pattern as it is and moves the target logit far less
    ids = induction_batch(16, 16, seed=3)
    q = torch.arange(16, 32)
    score = lambda pat: float(pat[:, q, q - 15].mean())  # noqa: E731
    for L, H in induction:
        key = sl.remove_from_input(m, prompts, head=(L, H), writer=f"head.0.{prev}", input="key", target=targets)
        val = sl.remove_from_input(m, prompts, head=(L, H), writer=f"head.0.{prev}", input="value", target=targets)
        full_key = sl.remove_from_input(m, ids, head=(L, H), writer=f"head.0.{prev}", input="key")
        clean, removed = score(full_key.pattern_clean), score(full_key.pattern_removed)
        assert clean >= 0.5 and removed <= 0.5 * clean, (L, H, clean, removed)  # measured 0.91 -> 0.33 for head 1.0
        torch.testing.assert_close(val.pattern_removed, val.pattern_clean)
        key_drop = float((key.target_clean - key.target_removed).mean())  # mean change of the target logit
        val_drop = float((val.target_clean - val.target_removed).mean())
        assert key_drop > 0 and abs(val_drop) <= 0.25 * key_drop, (L, H, key_drop, val_drop)


# ---------------------------------------------------------------------------- SmolLM2
def _plain_torch_sources(folder, ids, layer, head, target):
    """Head ``head`` of ``layer``: A[q, k] (v_k W_O[h]) · r at the last query, recomputed from the HF weights."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    cfg = hf.config
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    dh = cfg.hidden_size // nh
    seen = {}
    pre = lambda name: (lambda mod, args: seen.__setitem__(name, args[0]))  # noqa: E731
    hs = [hf.model.layers[layer].register_forward_pre_hook(pre("x")), hf.model.norm.register_forward_pre_hook(pre("final"))]
    with torch.no_grad():
        hf(ids)
        for h in hs:
            h.remove()
        layer_mod = hf.model.layers[layer]
        ln, at = layer_mod.input_layernorm, layer_mod.self_attn
        rms = lambda x, mod: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon) * mod.weight  # noqa: E731
        x = rms(seen["x"][0], ln)  # (P, d)
        P = x.shape[0]
        q = (x @ at.q_proj.weight.T).reshape(P, nh, dh)
        k = (x @ at.k_proj.weight.T).reshape(P, nkv, dh)
        v = (x @ at.v_proj.weight.T).reshape(P, nkv, dh)
        cos, sin = hf.model.rotary_emb(x[None], torch.arange(P)[None])
        cos, sin = cos[0][:, None], sin[0][:, None]
        half = lambda t: torch.cat([-t[..., dh // 2:], t[..., : dh // 2]], -1)  # noqa: E731
        q, k = q * cos + half(q) * sin, k * cos + half(k) * sin
        kv = head // (nh // nkv)
        scores = (q[:, head] @ k[:, kv].T) / dh**0.5
        scores = scores.masked_fill(torch.ones(P, P, dtype=torch.bool).triu(1), float("-inf"))
        A = scores.softmax(-1)[-1]  # (P,): the last query's row
        w_o = at.o_proj.weight.T.reshape(nh, dh, -1)[head]  # (dh, d)
        fin = seen["final"][0, -1]
        norm = hf.model.norm
        r = hf.lm_head.weight[target] * norm.weight / torch.sqrt(fin.pow(2).mean() + norm.variance_epsilon)
        return A * (v[:, kv] @ w_o @ r)  # (P,)


@pytest.mark.smollm2
def test_smollm2_factual_recall_sources_match_a_plain_torch_recomputation(smollm2):
    from streamlens.model import zoo

    m = smollm2
    prompt = "The capital of France is"
    dec = sl.decompose(m, [prompt], " Paris", unit="source", progress=False)
    assert dec.check() <= 1e-4
    df = dec.to_dataframe()
    s = df[df.kind == "source"]
    per = s.groupby(["layer", "head"])["value"].sum()
    top = list(per.abs().sort_values(ascending=False).index[:4])
    ids = torch.tensor([m.tokenizer(prompt)["input_ids"]])
    assert ids.shape[1] == len(dec.str_tokens[0])
    target = m.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    reads = {}
    for l, h in top:
        rows = s[(s["layer"] == l) & (s["head"] == h)].sort_values("source")
        want = _plain_torch_sources(zoo.materialise("smollm2-135m"), ids, l, h, target)
        torch.testing.assert_close(torch.tensor(rows.value.values), want, atol=2e-4, rtol=1e-3)
        reads[(l, h)] = rows.loc[rows.value.abs().idxmax(), "source_token"]
    # what the top heads read from (measured): the subject token " France" and the last token " is"
    assert set(reads.values()) <= {" France", " is"} and " France" in reads.values(), reads


def test_gemma2_sliding_window_and_soft_cap_are_read_as_computed(tmp_path):
    """A tiny Gemma 2 with a 3-token sliding window on its sliding layers and soft-capped scores: the pattern
    read is the model's own (zero outside the window on sliding layers) and the per-source split stays exact."""
    from streamlens.testing import save_model, tiny_config

    cfg, cls = tiny_config("gemma2")
    cfg.sliding_window = 3
    assert cfg.attn_logit_softcapping and "sliding_attention" in cfg.layer_types
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    assert sum(p.numel() for p in hf.parameters()) < 200_000
    m = sl.load(str(save_model(hf, tmp_path / "gemma2_window")))
    tr = sl.trace(m, PROMPTS, positions=[-1, -2], sources=True)
    assert tr.closure_error() <= 1e-5
    far = torch.arange(tr.input_ids.shape[1])[None, None, :] <= tr.positions[..., None] - 3  # (b, sel, source)
    for l, kind in enumerate(cfg.layer_types):
        outside = float(tr["pattern", l].permute(0, 1, 3, 2)[far].abs().max())
        assert (outside == 0.0) == (kind == "sliding_attention"), (l, kind, outside)
    dec = sl.decompose(m, PROMPTS, " the", unit="source", positions=[-1, -2], progress=False)
    assert dec.check() <= 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_source_ablation_recomputes_the_final_norm(tiny_models, arch):
    """ablated_logit_renormed of head.l.h@k: the final norm recomputed on final_in minus that source's share."""
    m = tiny_models(arch)
    dec = sl.decompose(m, PROMPTS, " the", contrast=" a", unit="source", progress=False)
    tr = sl.trace(m, PROMPTS, positions=-1, sources=True)
    ids = [m.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in (" the", " a")]
    W, b = m.unembed_weight()
    u = (W[ids[0]] - W[ids[1]]).float()
    c = 0.0 if b is None else float(b[ids[0]] - b[ids[1]])
    x = tr["final_in"][:, 0]  # (prompt, d)
    for l, h, k in ((1, 2, 0), (0, 1, 3), (1, 0, 5)):
        w = tr["head_source_out", l][:, 0, h, k]  # (prompt, d)
        want = m.final_norm(x - w) @ u + c
        got = dec.ablated_renormed[dec.labels.index(f"head.{l}.{h}@{k}"), :, 0, 0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_alibi_positions_are_read_as_computed(tmp_path):
    """Bloom adds ALiBi biases to the scores: the pattern read at the hook already holds them, so the split is exact."""
    from streamlens.testing import build_bridged

    folder, _ = build_bridged("BloomForCausalLM", tmp_path / "bloom")
    m = sl.load(str(folder))
    assert m.arch.positional == "alibi"
    dec = sl.decompose(m, PROMPTS, " the", unit="source", progress=False)
    head = sl.decompose(m, PROMPTS, " the", unit="head", progress=False)
    assert dec.check() <= 1e-5
    src = dec.to_dataframe().groupby(["prompt", "layer", "head"])["value"].sum()
    per_head = head.to_dataframe().query("kind == 'head'").groupby(["prompt", "layer", "head"])["value"].sum()
    torch.testing.assert_close(torch.tensor(src.values), torch.tensor(per_head.loc[src.index].values), atol=1e-5, rtol=1e-4)
    tr = sl.trace(m, PROMPTS, heads=True, patterns=True, sources=True)
    assert tr.closure_error() <= 1e-5
