"""repkern.rdm / rsa against scipy (pdist, spearmanr, pearsonr), hand-computed small cases, ties,
degenerate input and bad arguments; the op and repkern.reference (REPKERN_BACKEND=reference) both run."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.stats
import torch

import repkern
from repkern.ops import rsa as rsa_ops
from tests.linear_oracles import rdm_scipy, rsa_scipy

METRICS = ("correlation", "euclidean")


def _data(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# ---- rdm -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n, d", ((2, 3), (7, 5), (33, 17), (50, 2)))
def test_rdm_matches_scipy_pdist(impl, metric, n, d):
    x = _data((n, d), n + d) * 3 + 10.0
    got = repkern.rdm(x, metric)
    assert got.dtype == torch.float64 and got.shape == (n * (n - 1) // 2,)
    np.testing.assert_allclose(got.numpy(), rdm_scipy(x.numpy(), metric), rtol=1e-10, atol=1e-12)


def test_rdm_row_blocks_cover_the_triangle(monkeypatch):
    """Several row blocks (forced small) give the same condensed vector as one."""
    x = _data((41, 6), 1)
    whole = repkern.rdm(x, "euclidean")
    monkeypatch.setattr(rsa_ops, "BLOCK_ELEMENTS", 41 * 3)
    for metric in METRICS:
        np.testing.assert_allclose(repkern.rdm(x, metric).numpy(), rdm_scipy(x.numpy(), metric), rtol=1e-10,
                                   atol=1e-12)
    np.testing.assert_allclose(repkern.rdm(x, "euclidean").numpy(), whole.numpy(), rtol=1e-12, atol=1e-14)


def test_rdm_by_hand(impl):
    # euclidean: squared distance / d. Points (0,0), (1,0), (0,2): pairs (0,1) 1/2, (0,2) 4/2, (1,2) 5/2
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    np.testing.assert_allclose(repkern.rdm(pts, "euclidean").numpy(), [0.5, 2.0, 2.5], atol=1e-14)
    # correlation: 1 − r. (1,2,3) vs (3,2,1): r = −1 → 2; vs (2,4,6): r = 1 → 0; (3,2,1) vs (2,4,6): 2
    pat = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [2.0, 4.0, 6.0]], dtype=torch.float64)
    np.testing.assert_allclose(repkern.rdm(pat, "correlation").numpy(), [2.0, 0.0, 2.0], atol=1e-14)
    # condensed order: 4 patterns → (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
    line = torch.tensor([[0.0], [1.0], [3.0], [6.0]], dtype=torch.float64)
    np.testing.assert_allclose(repkern.rdm(line, "euclidean").numpy(), [1, 9, 36, 4, 25, 9], atol=1e-13)
    square = scipy.spatial.distance.squareform(repkern.rdm(line, "euclidean").numpy())
    assert square[1, 3] == pytest.approx(25.0) and square[3, 1] == pytest.approx(25.0)


def test_rdm_float32_and_16_bit(impl):
    x = _data((12, 5), 2)
    for dtype in (torch.float32, torch.bfloat16):
        got = repkern.rdm(x.to(dtype), "correlation")
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), rdm_scipy(x.to(dtype).double().numpy(), "correlation"), rtol=2e-6,
                                   atol=2e-7)


def test_rdm_nan_and_constant_patterns_stay_in_their_pairs(impl):
    x = _data((5, 4), 3)
    x[1, 2] = math.nan
    for metric in METRICS:
        square = scipy.spatial.distance.squareform(np.nan_to_num(repkern.rdm(x, metric).numpy(), nan=-1.0),
                                                   checks=False)
        bad = np.zeros((5, 5), bool)
        bad[1, :] = bad[:, 1] = True
        np.fill_diagonal(bad, False)
        assert (square[bad] == -1).all() and (square[~bad] != -1).all()
    c = _data((5, 4), 4)
    c[2] = 7.0  # a constant pattern: its correlation with anything is undefined
    got = repkern.rdm(c, "correlation").numpy()
    assert np.isnan(got).sum() == 4 and np.isfinite(repkern.rdm(c, "euclidean").numpy()).all()


def test_rdm_inf_patterns_give_nan_in_each_of_their_pairs(impl):
    """Before: the squared distance of a pattern holding ±Inf was inf − inf = NaN in some pairs and inf in
    others ([[-inf], [0.3], [1]]: NaN, inf)."""
    x = torch.tensor([[-math.inf], [0.3], [1.0], [math.inf]], dtype=torch.float64)
    for metric in METRICS:
        got = repkern.rdm(torch.cat([x, x.neg().exp2()], 1), metric)  # two features: correlation too
        assert torch.isnan(got).tolist() == [True, True, True, False, True, True], metric


# ---- rsa ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compare", ("spearman", "pearson"))
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n, d1, d2", ((3, 4, 2), (20, 8, 5), (37, 3, 30)))
def test_rsa_matches_scipy(impl, metric, compare, n, d1, d2):
    x = _data((n, d1), n)
    y = x[:, :1] @ _data((1, d2), n + 1) + _data((n, d2), n + 2)
    got = repkern.rsa(x, y, rdm=metric, compare=compare)
    assert got.dtype == torch.float64 and got.shape == ()
    np.testing.assert_allclose(got.item(), rsa_scipy(x.numpy(), y.numpy(), metric, compare), rtol=1e-10, atol=1e-12)


def test_average_ranks_with_ties_by_hand():
    v = torch.tensor([10.0, 20.0, 20.0, 5.0, 20.0, 1.0], dtype=torch.float64)
    np.testing.assert_allclose(rsa_ops.average_ranks(v).numpy(), [3, 5, 5, 2, 5, 1])
    np.testing.assert_allclose(rsa_ops.average_ranks(v).numpy(), scipy.stats.rankdata(v.numpy()))


def test_spearman_with_tied_dissimilarities(impl):
    """Integer grid patterns: many equal squared distances; average ranks as scipy's spearmanr."""
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 3, (14, 2), generator=g).double()
    y = torch.randint(0, 3, (14, 3), generator=g).double() + x[:, :1]
    dx = repkern.rdm(x, "euclidean").numpy()
    assert len(np.unique(dx)) < len(dx) / 4  # heavily tied
    expected = scipy.stats.spearmanr(rdm_scipy(x.numpy(), "euclidean"), rdm_scipy(y.numpy(), "euclidean")).statistic
    got = repkern.rsa(x, y, rdm="euclidean")
    np.testing.assert_allclose(got.item(), expected, rtol=1e-12)
    # ties matter: plain ranks (ties broken by position) give a different number
    order = lambda v: np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(float)  # noqa: E731
    broken = np.corrcoef(order(dx), order(repkern.rdm(y, "euclidean").numpy()))[0, 1]
    assert abs(broken - got.item()) > 1e-3


def test_rsa_facts(impl):
    x = _data((25, 6), 6)
    assert repkern.rsa(x, x.clone()).item() == pytest.approx(1.0, abs=1e-12)
    assert repkern.rsa(x, 3 * x + 1, rdm="euclidean", compare="pearson").item() == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(_data((6, 6), 7))
    assert repkern.rsa(x, x @ q, rdm="euclidean").item() == pytest.approx(1.0, abs=1e-12)  # distances kept
    perm = torch.randperm(25, generator=torch.Generator().manual_seed(8))
    assert abs(repkern.rsa(x, x[perm]).item()) < 0.3  # the patterns no longer correspond


def test_rsa_degenerate(impl):
    x = _data((10, 4), 9)
    y = _data((10, 3), 10)
    y[4, 1] = math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(repkern.rsa(x, y).item())
        assert math.isnan(repkern.rsa(y, x, rdm="euclidean", compare="pearson").item())
    simplex = torch.eye(4, dtype=torch.float64)  # all squared distances equal: a constant RDM
    z = _data((4, 3), 11)
    if impl == "ops":
        with pytest.warns(RuntimeWarning, match="x: all dissimilarities"):
            assert math.isnan(repkern.rsa(simplex, z, rdm="euclidean").item())
    else:
        assert math.isnan(repkern.rsa(simplex, z, rdm="euclidean").item())


def test_bad_arguments_name_the_argument(impl):
    x, y = _data((10, 4), 12), _data((10, 3), 13)
    with pytest.raises(ValueError, match="metric"):
        repkern.rdm(x, "cosine")
    with pytest.raises(ValueError, match="x: an RDM .*n >= 2"):
        repkern.rdm(x[:1])
    with pytest.raises(ValueError, match="x: the correlation distance .* d >= 2"):
        repkern.rdm(x[:, :1])
    repkern.rdm(x[:, :1], "euclidean")
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        repkern.rdm(x[None])
    with pytest.raises(ValueError, match="y: has n=9 samples"):
        repkern.rsa(x, y[:9])
    with pytest.raises(ValueError, match="x: rsa .*n >= 3"):
        repkern.rsa(x[:2], y[:2])
    with pytest.raises(ValueError, match="rdm"):
        repkern.rsa(x, y, rdm="mahalanobis")
    with pytest.raises(ValueError, match="compare"):
        repkern.rsa(x, y, compare="kendall")
    with pytest.raises(ValueError, match="y: the correlation distance"):
        repkern.rsa(x, y[:, :1])
    with pytest.raises(TypeError, match="y: dtype"):
        repkern.rsa(x, y.float())
