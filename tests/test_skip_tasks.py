"""Task metrics: logit-difference retained fraction, user-supplied metrics, multiple-choice accuracy."""

import pytest
import torch

import streamlens as sl
from streamlens.skip.metrics import ratio_bootstrap
from streamlens.skip.tasks import multiple_choice_set

from reference_skip import OldEvaluator

TEXTS = ["The cat sat on the mat and then", "Paris is the capital of", "One two three four five",
         "def f(x): return x +", "She opened the door and saw"]


def _kw(**kw):
    return {"max_tokens": 16, "batch_size": 2, "progress": False, "n_boot": 200, **kw}


def _hand(m, unit, mode="skip"):
    """Clean and ablated logits at the last real token of every text, from the old evaluator's full forward."""
    from streamlens.intervene.units import parse_unit
    from streamlens.skip.streaming import clean_pass, full

    ev = sl.LayerSkipEvaluator(m, TEXTS, **_kw(positions="last"))
    clean, abl = [], []
    for lo, batch, sel in ev.data_batches:
        torch.set_grad_enabled(False)
        c = clean_pass(m, batch, sel, lo, 5)
        clean.append(c.logits)
        abl.append(full(m, c, parse_unit(m, unit), mode, None)[0])
        torch.set_grad_enabled(True)
    return torch.cat(clean), torch.cat(abl)


def test_logit_diff_retained_fraction(tiny_models):
    m = tiny_models("gpt2")
    targets, contrasts = [5, 17, 9, 30, 2], 11
    ev = sl.LayerSkipEvaluator(m, TEXTS, **_kw(positions="last", target=targets, contrast=contrasts))
    row = ev.evaluate("block.1", metrics=("logit_diff", "kl"))
    clean, abl = _hand(m, "block.1")
    t, k = torch.tensor(targets), torch.tensor([contrasts] * 5)
    ld = lambda lg: lg.gather(-1, t[:, None])[:, 0] - lg.gather(-1, k[:, None])[:, 0]
    want = ratio_bootstrap(ld(abl).double(), ld(clean).double(), ev.boot)
    torch.testing.assert_close(torch.tensor([row["logit_diff"], row["logit_diff_lo"], row["logit_diff_hi"]], dtype=torch.float64),
                               torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert abs(ev.evaluate([], metrics=("logit_diff",))["logit_diff"] - 1.0) <= 1e-6
    assert abs(row["logit_diff"] - 1.0) > 1e-3
    # the kl column is unchanged by the task metric beside it
    old = OldEvaluator(m, TEXTS, **_kw(positions="last"))
    assert row["kl"] == old.evaluate("block.1", metrics=("kl",))["kl"]
    with pytest.raises(sl.StreamlensError, match="needs target= and contrast="):
        sl.LayerSkipEvaluator(m, TEXTS, **_kw(target=3)).evaluate("block.0", metrics=("logit_diff",))


def test_user_metric_has_the_same_intervals(tiny_models):
    m = tiny_models("llama")
    ev = sl.LayerSkipEvaluator(m, TEXTS, **_kw())

    def prob_drop(ablated, clean):
        """How much probability the clean top token loses."""
        top = clean.argmax(-1, keepdim=True)
        return (clean.softmax(-1).gather(-1, top) - ablated.softmax(-1).gather(-1, top))[:, 0]

    def agree(ablated, clean):
        return (ablated.argmax(-1) == clean.argmax(-1)).float()

    df = ev.sweep("attn", metrics=("top1", agree, prob_drop)).to_dataframe()
    for col in ("top1", "top1_lo", "top1_hi"):  # the same metric written by hand: the same numbers
        assert list(df[col]) == list(df[col.replace("top1", "agree")])
    assert (df["prob_drop"].abs() > 0).all() and (df["prob_drop_lo"] <= df["prob_drop_hi"]).all()
    with pytest.raises(sl.StreamlensError, match="needs a unique name"):
        ev.evaluate("attn.0", metrics=(lambda a, c: a.sum(),))  # a lambda's name is not an identifier
    def total(a, c):
        return a.sum()
    with pytest.raises(sl.StreamlensError, match="one value per row"):
        ev.evaluate("attn.0", metrics=(total,))


def _mc_check(m, texts, choices, answers):
    ev = sl.LayerSkipEvaluator(m, texts, positions="last", target=answers, choices=choices, max_tokens=64,
                               progress=False, n_boot=100)
    df = ev.sweep("block", metrics=("mc_accuracy", "kl")).to_dataframe()
    clean = ev.evaluate([], metrics=("mc_accuracy",))["mc_accuracy"]
    tok = m.tokenizer
    ids = torch.tensor([c if isinstance(c, int) else tok(c, add_special_tokens=False)["input_ids"][0] for c in choices])
    hits = []
    with torch.no_grad():
        for t, a in zip(texts, answers):
            x = torch.tensor(tok(t)["input_ids"])[None, :64]  # the evaluator keeps max_tokens=64
            logits = m.run(x, torch.ones_like(x, dtype=torch.bool))
            hits.append(float(ids[logits[0, -1, ids].argmax()] == (a if isinstance(a, int) else ids[choices.index(a)])))
    assert abs(clean - sum(hits) / len(hits)) <= 1e-9  # the clean accuracy, from the answer-token logits by hand
    assert set(df.columns) >= {"mc_accuracy", "mc_accuracy_lo", "mc_accuracy_hi"}
    assert df["n_positions"].iloc[0] == len(texts)
    return ev, df


def test_multiple_choice_accuracy(tiny_models):
    texts, choices, answers = multiple_choice_set()
    assert len(texts) == 12 and all(t.endswith("Answer:") for t in texts) and set(answers) <= set(choices)
    m = tiny_models("gpt2")  # its toy tokenizer splits " A": use token ids as the answers
    ids = [40, 41, 42, 43]
    ev, df = _mc_check(m, texts, ids, [ids[choices.index(a)] for a in answers])
    with pytest.raises(sl.StreamlensError, match="not one of its choices"):
        sl.LayerSkipEvaluator(m, texts, target=7, choices=ids, progress=False)
    with pytest.raises(sl.StreamlensError, match="needs target= .* and choices="):
        sl.LayerSkipEvaluator(m, texts, target=7, progress=False).evaluate("block.0", metrics=("mc_accuracy",))


@pytest.mark.smollm2
def test_multiple_choice_set_on_smollm2(smollm2):
    texts, choices, answers = multiple_choice_set()
    ev, df = _mc_check(smollm2, texts, choices, answers)
    assert len(df) == 30
