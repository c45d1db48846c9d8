import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from streamlens.skip import metrics as M
from streamlens.errors import StreamlensError


def _logits(seed, n=7, v=11):
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed))


def test_kl_and_delta_ce_match_torch():
    p, q = _logits(0), _logits(1)
    lp, lq = p.log_softmax(-1), q.log_softmax(-1)
    want = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(M.kl(lp, lq), want)
    assert float(M.kl(lp, lp).abs().max()) <= 1e-7
    t = torch.tensor([0, 3, 5, 1, 10, 2, 2])
    want = F.cross_entropy(q, t, reduction="none") - F.cross_entropy(p, t, reduction="none")
    torch.testing.assert_close(M.delta_ce(lp, lq, t), want)


def test_top1_topk():
    a = torch.tensor([[5.0, 4.0, 3.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    b = torch.tensor([[5.0, 0.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0]])
    torch.testing.assert_close(M.top1(a, b), torch.tensor([1.0, 0.0]))
    # top-2 of row 0: {0, 1} vs {0, 3} -> 1/2; row 1: {3, 2} vs {0, 1} -> 0
    torch.testing.assert_close(M.topk_overlap(a, b, 2), torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(M.topk_overlap(a, a, 3), torch.ones(2))
    with pytest.raises(StreamlensError, match="k=9"):
        M.topk_overlap(a, b, 9)


def test_angle_and_block_influence():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])
    y = torch.tensor([[0.0, 3.0], [-2.0, 0.0], [2.0, 2.0], [0.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(M.angle(x, y), torch.tensor([0.5, 1.0, 0.0, 0.0, 0.5]), atol=1e-6, rtol=0)
    torch.testing.assert_close(M.block_influence(x, y), torch.tensor([1.0, 2.0, 0.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    ang = M.angle(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]))
    assert abs(float(ang) - 0.25) <= 1e-6


def test_logit_diff():
    lg = torch.tensor([[1.0, 4.0, -2.0]])
    torch.testing.assert_close(M.logit_diff(lg, torch.tensor([1]), torch.tensor([2])), torch.tensor([6.0]))


def test_ratio_bootstrap():
    idx = M.resample_indices(5, 500, seed=0)
    assert idx.shape == (500, 5) and int(idx.min()) >= 0 and int(idx.max()) <= 4
    # every document has the same ratio: the interval collapses onto it
    est, lo, hi = M.ratio_bootstrap(torch.tensor([2.0, 4.0, 6.0, 1.0, 3.0]), torch.tensor([1.0, 2, 3, 0.5, 1.5]), idx)
    assert abs(est - 2.0) <= 1e-12 and abs(lo - 2.0) <= 1e-12 and abs(hi - 2.0) <= 1e-12
    sums, counts = torch.tensor([1.0, 0.0, 5.0, 2.0, 9.0]), torch.tensor([1.0, 2.0, 3.0, 1.0, 4.0])
    est, lo, hi = M.ratio_bootstrap(sums, counts, idx)
    assert abs(est - 17.0 / 11.0) <= 1e-12
    assert lo < est < hi
    assert math.isnan(M.ratio_bootstrap(sums, torch.zeros(5), idx)[0])


def test_spearman():
    x, y = [0.1, 0.5, 0.2, 0.9, 0.3], [1.0, 3.0, 2.5, 8.0, 2.0]
    assert abs(M.spearman(x, y) - spearmanr(x, y).statistic) <= 1e-12
    assert math.isnan(M.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(StreamlensError, match="equal lengths"):
        M.spearman([1, 2], [1, 2, 3])
