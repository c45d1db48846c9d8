import pytest
import torch

import streamlens as sl
from streamlens.stream.inputs import encode
from tests.conftest import PROMPTS


def _reference(m, prompts, target):
    """Full-vocabulary lens computed directly from a trace of every position (no chunking)."""
    tr = sl.trace(m, prompts)
    W, b = m.unembed_weight()
    logp_model = torch.log_softmax(tr["logits"].float(), -1)
    out = {}
    for l in range(m.arch.n_layers):
        for name in ("resid_pre", "resid_mid", "resid_post"):
            if name == "resid_mid" and not m.arch.has_resid_mid:
                continue
            lg = m.final_norm(tr[name, l]) @ W.float().T + (0 if b is None else b.float())
            logp = torch.log_softmax(lg, -1)
            kl = (logp_model.exp() * (logp_model - logp)).sum(-1)
            t_lg = lg[..., target]
            others = torch.arange(lg.shape[-1]) != target
            out[f"{name}.{l}"] = (logp, kl, logp[..., target].exp(), ((lg > t_lg[..., None]) & others).sum(-1))
    return out, tr.mask


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama", "gemma"])
def test_lens_matches_a_direct_full_vocabulary_computation(tiny_models, arch):
    m = tiny_models(arch)
    t = m.tokenizer(" the", add_special_tokens=False)["input_ids"][0]
    lens = sl.logit_lens(m, PROMPTS, target=" the", k=4, chunk_size=97, batch_size=2, progress=False)
    ref, mask = _reference(m, PROMPTS, t)
    assert lens.points == tuple(ref) and torch.equal(lens.mask, mask)
    for p, name in enumerate(lens.points):
        logp, kl, tprob, rank = ref[name]
        top = logp.topk(4, -1)
        torch.testing.assert_close(lens.top_probs[p][mask], top.values.exp()[mask], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(lens.kl[p][mask], kl.clamp_min(0)[mask], atol=2e-5, rtol=1e-3)
        torch.testing.assert_close(lens.target_probs[p][mask], tprob[mask], atol=1e-6, rtol=1e-4)
        # ranks count strictly larger logits; a near-tie (|Δ| ~ 1e-7, rounding of differently shaped
        # matmuls) may flip one neighbour, so allow a difference of one rank, and require it to be rare
        d = (lens.target_ranks[p][mask] - rank[mask]).abs()
        assert int(d.max()) <= 1 and float((d == 0).float().mean()) >= 0.9
        # the reported ids carry the reported probabilities (ids may differ from topk's only inside exact ties)
        torch.testing.assert_close(logp.gather(-1, lens.top_ids[p]).exp()[mask], lens.top_probs[p][mask], atol=1e-6, rtol=1e-4)
    # the last residual is what the model reads out: KL 0 and the model's own top tokens
    last = lens.points.index(f"resid_post.{m.arch.n_layers - 1}")
    assert float(lens.kl[last][mask].abs().max()) <= 1e-4


def test_lens_positions_outputs_and_errors(tiny_models, tmp_path):
    m = tiny_models("llama")
    lens = sl.logit_lens(m, PROMPTS, positions="last", target=[" the", " a", " is"], progress=False)
    assert lens.mask.shape == (3, 1) and bool(lens.mask.all())
    batch = encode(m, PROMPTS)
    assert torch.equal(lens.positions[:, 0], batch.lengths - 1)
    df = lens.to_dataframe()
    assert len(df) == len(lens.points) * 3
    assert {"point", "layer", "position", "top_token", "top_prob", "kl", "target", "target_prob", "target_rank"} <= set(df.columns)
    assert lens.save(tmp_path / "l.csv").exists() and lens.save(tmp_path / "l.json").exists()
    assert lens.plot().data and "LogitLens" in lens._repr_html_()
    with pytest.raises(sl.StreamlensError, match="not a single token"):
        sl.logit_lens(m, PROMPTS, target="hello world", progress=False)
    with pytest.raises(sl.StreamlensError, match="k must be"):
        sl.logit_lens(m, PROMPTS, k=0, progress=False)
    with pytest.raises(sl.UnsupportedModelError, match="post-norm"):
        sl.logit_lens(tiny_models("bert"), PROMPTS, progress=False)


@pytest.mark.smollm2
def test_smollm2_lens_ends_at_the_models_prediction(smollm2):
    lens = sl.logit_lens(smollm2, ["The capital of France is"], positions="last", target=" Paris", progress=False)
    assert float(lens.kl[-1].abs().max()) <= 1e-3
    assert int(lens.target_ranks[-1, 0, 0]) <= int(lens.target_ranks[0, 0, 0])
