"""Screening: first-order estimates (attribution patching) of every unit, exact numbers for the top ones."""

import pytest
import torch

import streamlens as sl
from streamlens.intervene.units import parse_unit
from streamlens.model import hooks
from streamlens.report.demo import pydoc_texts
from streamlens.skip.attribution import estimate_all
from streamlens.skip.metrics import spearman

TEXTS = [t[:300] for t in pydoc_texts()[:4]]


def _ev(m, **kw):
    return sl.LayerSkipEvaluator(m, TEXTS, max_tokens=20, batch_size=2, progress=False, n_boot=100, **kw)


def _directional_derivative(ev, layer, comp, side, delta_of):
    """d CE / d alpha at alpha = 0 with the hook point's tensor t replaced by t + alpha * delta_of(t),
    summed over every position with a next token: what the estimate of the removal must equal."""
    m = ev.model
    alpha = torch.zeros((), requires_grad=True)
    total = 0.0
    for _, batch, sel in ev.data_batches:
        hp = hooks.block_point(m.bridge, layer, comp, side)
        with torch.enable_grad(), hooks.attached([(hp, lambda t: t + alpha * delta_of(t.detach()))]):
            logits = m.run(batch.input_ids, batch.mask)
            lp = torch.log_softmax(logits[:, :-1].float(), -1)
            tgt = batch.input_ids[:, 1:]
            keep = batch.mask[:, 1:] & sel[:, :-1]
            ce = -(lp.gather(-1, tgt[..., None])[..., 0] * keep).sum()
            total += float(torch.autograd.grad(ce, alpha)[0])
    return total / float(ev.counts[:, 1].sum())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_estimates_are_the_first_order_change_along_the_removal(tiny_models, arch):
    ev = _ev(tiny_models(arch))
    m = ev.model
    dh = m.arch.d_head
    units = [parse_unit(m, u) for u in ("head.1.2", "mlp.0", "attn.1", "block.0")]
    est = estimate_all(ev, units, "skip")

    def head_delta(z):  # remove head 2: minus its slice of z
        d = torch.zeros_like(z)
        d[..., 2 * dh:3 * dh] = -z[..., 2 * dh:3 * dh]
        return d

    want = _directional_derivative(ev, 1, "o", "in", head_delta)
    assert abs(est["head.1.2"] - want) <= 1e-4 * (abs(want) + 1e-3) and abs(want) > 1e-5
    comp, side = m.arch.rule.write_point("mlp")
    want = _directional_derivative(ev, 0, comp, side, lambda w: -w)
    assert abs(est["mlp.0"] - want) <= 1e-4 * (abs(want) + 1e-3)
    mean = estimate_all(ev, [parse_unit(m, "attn.1")], "mean")["attn.1"]
    means = ev.means
    from streamlens.intervene.units import Atom

    mu = means[Atom("attn", 1)]
    comp, side = m.arch.rule.write_point("attn")
    want = _directional_derivative(ev, 1, comp, side, lambda w: mu[: w.shape[1]].to(w.dtype) - w)
    assert abs(mean - want) <= 1e-4 * (abs(want) + 1e-3)


def test_screened_sweep_is_exact_where_it_computes(tiny_models):
    ev = _ev(tiny_models("llama"))
    full = ev.sweep("head", metrics=("kl", "ce", "top1")).to_dataframe().set_index("unit")
    res = ev.sweep("head", metrics=("kl", "ce", "top1"), screen=3)
    df = res.to_dataframe().set_index("unit")
    assert list(df.index) == list(full.index)
    assert df["exact"].sum() == 3 and (df["exact"] == df["kl"].notna()).all()
    top = df["delta_ce_estimate"].abs().sort_values(ascending=False).index[:3]
    assert set(df.index[df["exact"]]) == set(top)
    for u in top:
        for col in ("kl", "kl_lo", "kl_hi", "delta_ce", "top1"):
            assert df.loc[u, col] == full.loc[u, col]
    rho = spearman(df.loc[top, "delta_ce_estimate"], df.loc[top, "delta_ce"])
    assert res.screening == {"estimated": "delta_ce", "exact_units": 3, "rank_correlation": rho}
    assert "screened" in res.describe()
    # over all heads the estimate ranks the exact damage well on this model
    all_est = ev.sweep("head", metrics=("ce",), screen=len(df)).to_dataframe()
    assert all_est["exact"].all() and spearman(all_est["delta_ce_estimate"], all_est["delta_ce"]) > 0.7
    with pytest.raises(sl.StreamlensError, match="screen=99"):
        ev.sweep("head", screen=99)


def test_screening_refuses_post_norm_models(tiny_models):
    with pytest.raises(sl.StreamlensError, match="screening needs"):
        _ev(tiny_models("bert")).sweep("attn", screen=1)
