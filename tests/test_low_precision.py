"""bfloat16 / float16 for every verb outside skip/: results in float32, exact for the stored stream, close to the
float32 model, and a clear error instead of a silent NaN.

"Exact" in half precision (README, "Low precision"): every contribution is computed in float32 from the stored
half-precision writes, so the decomposition adds up, to float32 rounding, to the float32 evaluation of the stored
stream; the model's own half-precision logit differs from that by its rounding (``dec.check()`` ≤ 4 eps of the dtype).
Against the same weights run in float32, each verb's numbers agree within CLOSE[dtype] of the largest value.
"""

import pandas as pd
import pytest
import torch

import streamlens as sl
from streamlens.model.affine import measure
from streamlens.model.precision import check_tol, up
from streamlens.readout.unembed import unembed_matrices

PROMPTS = ["The capital of France is", "def f(x): return x + 1"]
HALF = [torch.bfloat16, torch.float16]
# agreement with the float32 run of the same weights, relative to the largest |value| of the column
CLOSE = {torch.bfloat16: 5e-2, torch.float16: 1e-2}


@pytest.fixture(scope="module")
def runs(tiny_dirs):
    cache = {}

    def get(arch, dtype):
        if (arch, dtype) not in cache:
            cache[arch, dtype] = sl.load(str(tiny_dirs(arch)), dtype=dtype)
        return cache[arch, dtype]

    return get


def _close(got: pd.DataFrame, want: pd.DataFrame, dtype, *, keys=None, min_rows=1.0, what="", skip=(), scale_of=None):
    """Rows matched on ``keys`` (default: every non-float column); every float column within CLOSE[dtype] of its
    largest |value| (``scale_of[c]``: of another column's, for a difference of two rounded quantities)."""
    floats = [c for c in want.columns if want[c].dtype.kind == "f" and c not in skip]
    want, got = want.drop(columns=list(skip)), got.drop(columns=list(skip))
    keys = keys or [c for c in want.columns if c not in floats]
    both = want.merge(got, on=keys, suffixes=("_32", "_16"))
    assert len(both) >= min_rows * len(want) and len(both) > 0, (what, len(both), len(want))
    for c in floats:
        if c in keys:
            continue
        a, b = torch.tensor(both[f"{c}_16"].values, dtype=torch.float64), torch.tensor(both[f"{c}_32"].values, dtype=torch.float64)
        assert torch.equal(a.isnan(), b.isnan()), (what, c)  # NaN exactly where float32 has NaN (none new)
        ok = ~b.isnan()
        if ok.any():
            err = float((a[ok] - b[ok]).abs().max())
            ref = b if c not in (scale_of or {}) else torch.tensor(both[f"{scale_of[c]}_32"].values, dtype=torch.float64)
            assert err <= CLOSE[dtype] * float(ref[ok].abs().max().clamp_min(1e-6)), (what, c, err)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_verb_runs_in_half_precision_close_to_float32(runs, arch, dtype, tmp_path):
    m16, m32 = runs(arch, dtype), runs(arch, torch.float32)
    assert m16.dtype == dtype
    tr16, tr32 = sl.trace(m16, PROMPTS, heads=True), sl.trace(m32, PROMPTS, heads=True)
    assert tr16["resid_pre", 1].dtype == torch.float32 and tr16["logits"].dtype == torch.float32  # exact casts
    assert sl.trace(m16, PROMPTS, store_dtype=dtype)["resid_pre", 1].dtype == dtype  # unless asked otherwise
    assert tr16.closure_error() <= check_tol(dtype, 1e-5) and tr32.closure_error() <= 1e-5
    _close(tr16.to_dataframe(), tr32.to_dataframe(), dtype, what="trace")
    _close(sl.trace_stats(m16, PROMPTS, progress=False).to_dataframe(),
           sl.trace_stats(m32, PROMPTS, progress=False).to_dataframe(), dtype, what="trace_stats")
    for unit, kw in (("layer", {}), ("head", {}), ("neuron", {"layers": [1], "neurons": 64}), ("source", {})):
        d16 = sl.decompose(m16, PROMPTS, " the", unit=unit, progress=False, **kw)
        d32 = sl.decompose(m32, PROMPTS, " the", unit=unit, progress=False, **kw)
        assert d16.values.dtype == torch.float32 and d16.check() <= check_tol(dtype, 1e-5), unit
        _close(d16.to_dataframe(), d32.to_dataframe(), dtype, what=f"decompose {unit}")
    lens16 = sl.logit_lens(m16, PROMPTS[0], target=" the", progress=False).to_dataframe()
    lens32 = sl.logit_lens(m32, PROMPTS[0], target=" the", progress=False).to_dataframe()
    _close(lens16, lens32, dtype, keys=["point", "layer", "position"] if "point" in lens32 else None, what="lens")
    dyn16 = sl.dynamics(m16, PROMPTS, progress=False).to_dataframe()
    assert float(dyn16["split_error"].max()) <= check_tol(dtype, 1e-6)  # the split holds to the dtype's rounding
    _close(dyn16, sl.dynamics(m32, PROMPTS, progress=False).to_dataframe(), dtype, what="dynamics", skip=("split_error",))
    _close(sl.value_paths(m16, PROMPTS[0], " the", top=3).to_dataframe(), sl.value_paths(m32, PROMPTS[0], " the", top=3).to_dataframe(),
           dtype, min_rows=0.5, what="value_paths")
    f16, f32 = sl.information_flow(m16, PROMPTS[0], " the", threshold=0.0), sl.information_flow(m32, PROMPTS[0], " the", threshold=0.0)
    _close(f16.to_dataframe(), f32.to_dataframe(), dtype, what="flow")
    _close(sl.attention_patterns(m16, PROMPTS[0]).to_dataframe(), sl.attention_patterns(m32, PROMPTS[0]).to_dataframe(),
           dtype, what="patterns")
    rem = dict(head="head.1.1", writer="head.0.3", input="key")
    _close(sl.remove_from_input(m16, PROMPTS[0], **rem).to_dataframe(), sl.remove_from_input(m32, PROMPTS[0], **rem).to_dataframe(),
           dtype, min_rows=0.5, what="remove_from_input",
           scale_of={"pattern_change": "clean_weight_on_clean_top"})  # the clean top source may differ by a near tie


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_decomposition_adds_up_to_the_float32_evaluation_of_the_stored_stream(runs, arch, dtype):
    """Σ contributions == u · (g ⊙ C(Σ stored writes) / s + b) + b_U, every term in float32 from the stored
    half-precision writes (s: the final norm's scale of the stored final residual): float32 rounding only."""
    m = runs(arch, dtype)
    tr = sl.trace(m, PROMPTS, positions="last", heads=True)
    ids = torch.tensor([m.tokenizer.encode(" the")[-1]] * len(PROMPTS))
    dec = sl.decompose(m, PROMPTS, " the", progress=False)
    heads = sl.decompose(m, PROMPTS, " the", unit="head", progress=False)
    norm = m.final_norm
    W, bU = unembed_matrices(m)
    u = W[ids][:, None, :]  # (b, 1, d)
    scale = norm.scale(tr["final_in"])
    writes = [tr["embed"]] + ([tr["pos_embed"]] if "pos_embed" in tr.names else [])
    writes += [tr[name, l] for l in tr.layers for name in ("attn_out", "mlp_out")]
    assert all(w.dtype == torch.float32 for w in writes)
    stream = torch.stack(writes).sum(0)  # the stored writes, added in float32
    want = ((norm.linear_part(stream, scale) + norm.bias_part(stream)) * u).sum(-1) + bU[ids][:, None]
    got = dec.total()[..., 0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    # unit="head": each head's write is z_h W_O[h] in float32 from the stored z (the trace's head_out), so the
    # head split adds up to the stream with Σ_h head_out + attn_bias_out in place of the model's rounded attn_out
    writes = writes[:len(writes) - 2 * len(tr.layers)]
    writes += [w for l in tr.layers for w in (tr["head_out", l].sum(-2) + tr["attn_bias_out", l], tr["mlp_out", l])]
    stream = torch.stack(writes).sum(0)
    want_h = ((norm.linear_part(stream, scale) + norm.bias_part(stream)) * u).sum(-1) + bU[ids][:, None]
    torch.testing.assert_close(heads.total()[..., 0], want_h, rtol=0, atol=1e-5 * float(want.abs().max()))
    assert float((heads.total() - dec.total()).abs().max()) <= check_tol(dtype, 1e-5) * float(want.abs().max())
    for l in tr.layers:  # each head's value is the readout of its stored write, in float32
        for h in range(m.arch.n_heads):
            one = (norm.linear_part(tr["head_out", l][:, :, h], scale) * u).sum(-1)
            torch.testing.assert_close(heads.values[heads.labels.index(f"head.{l}.{h}")][..., 0], one, rtol=0,
                                       atol=1e-6 * float(want.abs().max()))
    # and the stored stream is the model's own, up to its rounding: the check against the model's logit
    assert 1e-7 < dec.check() <= check_tol(dtype, 1e-5)


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "Qwen2MoeForCausalLM"])
def test_experts_split_exactly_in_bfloat16(tmp_path, arch):
    from streamlens.testing import build_bridged

    folder, _ = build_bridged(arch, tmp_path / arch)
    m = sl.load(str(folder), dtype=torch.bfloat16)
    by_expert = sl.decompose(m, PROMPTS, "top:3", unit="expert", progress=False)
    by_layer = sl.decompose(m, PROMPTS, "top:3", unit="layer", progress=False)
    assert by_expert.values.dtype == torch.float32 and by_expert.check() <= check_tol(torch.bfloat16, 1e-5)
    torch.testing.assert_close(by_expert.total(), by_layer.total(), rtol=0,
                               atol=1e-5 * float(by_layer.total().abs().max()))


@pytest.mark.parametrize("dtype", HALF)
def test_gradient_split_in_half_precision(runs, dtype):
    m16, m32 = runs("llama", dtype), runs("llama", torch.float32)
    s16, s32 = sl.gradient_split(m16, PROMPTS), sl.gradient_split(m32, PROMPTS)
    assert s16.full.dtype == s16.identity.dtype == s16.sublayer.dtype == torch.float32
    # autograd rounds identity + sublayer into full in the model's dtype: the split holds to that rounding
    assert 1e-7 < s16.split_error() <= check_tol(dtype, 1e-6) and s32.split_error() <= 1e-5
    _close(s16.to_dataframe(), s32.to_dataframe(), dtype, what="gradient_split")


def test_measure_is_exact_on_a_half_precision_module():
    """f(I) − f(0) in bfloat16 would round W + b; the float32 copy gives the stored weights exactly."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8).to(torch.bfloat16)
    with torch.no_grad():
        lin.bias.mul_(300)  # a large bias: W + b in bfloat16 loses W's low bits
    w, b = measure(lin, 16)
    assert w.dtype == b.dtype == torch.float32
    assert torch.equal(w, lin.weight.detach().float().T) and torch.equal(b, lin.bias.detach().float())
    assert up(lin.weight).dtype == torch.float32 and up(torch.ones(2, dtype=torch.float64)).dtype == torch.float64


def test_float16_overflow_is_an_error_not_a_nan(tiny_dirs, tmp_path):
    """A float16 model whose stream overflows stops every verb with an error naming where."""
    m = sl.load(str(tiny_dirs("llama")), dtype=torch.float16)  # a model of its own: its weights are changed
    with torch.no_grad():
        m.hf.model.layers[0].mlp.down_proj.weight.mul_(1e6)  # the block's write exceeds float16's 65504
    for name, verb in (("trace", lambda: sl.trace(m, PROMPTS)),
                       ("decompose", lambda: sl.decompose(m, PROMPTS, " the", progress=False)),
                       ("gradient_split", lambda: sl.gradient_split(m, PROMPTS)),
                       ("trace_stats", lambda: sl.trace_stats(m, PROMPTS, progress=False)),
                       ("logit_lens", lambda: sl.logit_lens(m, PROMPTS, progress=False))):
        with pytest.raises(sl.StreamlensError, match="(NaN|inf|finite)"):
            verb()


def test_report_in_bfloat16(runs, tmp_path):
    from streamlens.report import build, demo

    res = build.build_report(runs("llama", torch.bfloat16), demo.demo_corpus(2), tmp_path / "r.html", n_prompts=1,
                             max_tokens=12, progress=False)
    assert res.missing == {}
    s = res.summary.set_index("quantity")["value"]
    assert float(s["closure error"]) <= check_tol(torch.bfloat16, build.CLOSURE_TOL)
    assert float(s["exactness error"]) <= check_tol(torch.bfloat16, build.DECOMPOSE_TOL)
    text = res.report.read_text()
    assert ": FAILED</span>" not in text and text.count(": passed</span>") >= 3  # every exactness check passes
