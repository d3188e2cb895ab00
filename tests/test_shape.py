"""repkern.shape_distance against an independent numpy version of netrep's LinearMetric, facts that need
no oracle (invariances, identical inputs), degenerate input and bad arguments. Both implementations run:
the op and repkern.reference (REPKERN_BACKEND=reference)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import repkern
from repkern import _common
from tests.linear_oracles import netrep_linear_metric

ALPHAS = (1.0, 0.7, 0.2, 0.0)
SCORES = ("angular", "euclidean")


def _data(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _related(n, d1, d2, seed=0, shift=0.0):
    """y a noisy linear map of x (distance well inside (0, π/2)); x offset by `shift`."""
    x = _data((n, d1), seed) * torch.linspace(0.5, 2.0, d1, dtype=torch.float64) + shift
    y = x @ _data((d1, d2), seed + 1) + 0.8 * _data((n, d2), seed + 2) - shift / 2
    return x, y


def _orthogonal(d, seed):
    q, _ = torch.linalg.qr(_data((d, d), seed))
    return q


# ---- against netrep -------------------------------------------------------------------------------------


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("n, d1, d2", ((53, 7, 7), (61, 5, 9), (40, 11, 3), (97, 1, 4)))
def test_matches_netrep(impl, n, d1, d2, alpha, score):
    x, y = _related(n, d1, d2, seed=n + d1, shift=25.0)
    if alpha == 0 and d1 != d2:  # netrep: "some regularization (alpha > 0) is required" for padding
        with pytest.raises(ValueError, match="alpha > 0"):
            repkern.shape_distance(x, y, alpha=alpha, score=score)
        return
    got = repkern.shape_distance(x, y, alpha=alpha, score=score)
    expected = netrep_linear_metric(x.numpy(), y.numpy(), alpha, score)
    assert got.dtype == torch.float64 and got.shape == ()
    np.testing.assert_allclose(got.item(), expected, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("alpha", (1.0, 0.5, 0.05))
@pytest.mark.parametrize("n, d1, d2", ((9, 20, 20), (12, 30, 17), (6, 4, 25)))
def test_fewer_samples_than_features(impl, n, d1, d2, alpha, score):
    """n <= d: rank-deficient whitening; the oracle takes the eigenvectors from the SVD of the data."""
    x, y = _related(n, d1, d2, seed=3 * n)
    got = repkern.shape_distance(x, y, alpha=alpha, score=score).item()
    expected = netrep_linear_metric(x.numpy(), y.numpy(), alpha, score, whiten="svd")
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("alpha", (1.0, 0.3))
def test_float32_input_is_the_float64_result_rounded(impl, alpha, score):
    """float64 internals: a float32 input gives the float64 value of the same (float32) numbers."""
    x, y = (t.float() for t in _related(77, 13, 6, seed=5, shift=100.0))
    got = repkern.shape_distance(x, y, alpha=alpha, score=score)
    assert got.dtype == torch.float32
    expected = netrep_linear_metric(x.double().numpy(), y.double().numpy(), alpha, score)
    np.testing.assert_allclose(got.item(), expected, rtol=3e-7)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_16_bit_input_gives_float32(impl, dtype):
    x, y = (t.to(dtype) for t in _related(40, 6, 5, seed=6))
    got = repkern.shape_distance(x, y, alpha=0.5)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.item(), netrep_linear_metric(x.double().numpy(), y.double().numpy(), 0.5,
                                                                "angular"), rtol=1e-6)


# ---- facts -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_identical_inputs_are_at_distance_zero(impl, alpha, score):
    x, _ = _related(64, 8, 8, seed=7, shift=3.0)
    d = repkern.shape_distance(x, x.clone(), alpha=alpha, score=score).item()
    # arccos near 1 turns rounding ε into sqrt(2ε); the euclidean score is ‖X̄‖·sqrt(rounding)
    scale = 1.0 if score == "angular" else torch.linalg.norm(x - x.mean(0)).item()
    assert abs(d) < 1e-6 * scale


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("alpha", (1.0, 0.4, 0.0))
def test_rotation_invariance(impl, alpha, score):
    """x against x·Q (Q orthogonal, plus an offset): 0; y·Q against x: the same distance as y against x."""
    x, y = _related(80, 6, 6, seed=8)
    q = _orthogonal(6, 9)
    tol = 1e-6 if score == "angular" else 1e-6 * torch.linalg.norm(x - x.mean(0)).item()
    assert repkern.shape_distance(x, x @ q + 5.0, alpha=alpha, score=score).item() < tol
    base = repkern.shape_distance(y, x, alpha=alpha, score=score).item()
    rotated = repkern.shape_distance(y @ q, x, alpha=alpha, score=score).item()
    assert base > 0.1
    np.testing.assert_allclose(rotated, base, rtol=1e-10)


def test_procrustes_angular_is_scale_invariant_euclidean_is_not(impl):
    x, y = _related(50, 5, 4, seed=10)
    a = repkern.shape_distance(x, y).item()
    np.testing.assert_allclose(repkern.shape_distance(3.0 * x, y).item(), a, rtol=1e-12)
    e = repkern.shape_distance(x, y, score="euclidean").item()
    e3 = repkern.shape_distance(3.0 * x, 3.0 * y, score="euclidean").item()
    np.testing.assert_allclose(e3, 3 * e, rtol=1e-12)


def test_procrustes_of_orthonormal_columns_is_mean_principal_angle_cosine(impl):
    """netrep's test_principal_angles, centered: for X̄, Ȳ with orthonormal columns the angular
    Procrustes distance is arccos(mean cos θ_i) over the principal angles."""
    xq = torch.linalg.qr(_data((60, 5), 11) - _data((60, 5), 11).mean(0))[0]
    yq = torch.linalg.qr(_data((60, 5), 12) - _data((60, 5), 12).mean(0))[0]
    xq, yq = xq - xq.mean(0), yq - yq.mean(0)  # already centered up to rounding
    cosines = torch.linalg.svdvals(xq.T @ yq)
    expected = math.acos(cosines.mean().item())
    np.testing.assert_allclose(repkern.shape_distance(xq, yq).item(), expected, rtol=1e-10)


def test_alpha_zero_is_invariant_to_invertible_maps(impl):
    x, _ = _related(90, 5, 5, seed=13)
    m = _data((5, 5), 14) + 3 * torch.eye(5, dtype=torch.float64)
    assert repkern.shape_distance(x, x @ m + 1.0, alpha=0.0).item() < 1e-6
    assert repkern.shape_distance(x, x @ m + 1.0, alpha=1.0).item() > 0.05  # Procrustes is not


def test_permuting_rows_of_one_input_destroys_alignment(impl):
    x, _ = _related(200, 6, 6, seed=15)
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(16))
    assert repkern.shape_distance(x, x).item() < 1e-6
    assert repkern.shape_distance(x, x[perm]).item() > 1.0  # near π/2: unrelated


def test_symmetric(impl):
    x, y = _related(45, 7, 4, seed=17)
    for alpha in (1.0, 0.5):
        np.testing.assert_allclose(repkern.shape_distance(x, y, alpha=alpha).item(),
                                   repkern.shape_distance(y, x, alpha=alpha).item(), rtol=1e-11)


# ---- degenerate input ----------------------------------------------------------------------------------------


def test_nan_input_gives_nan_without_warning(impl):
    x, y = _related(30, 4, 4, seed=18)
    x[3, 1] = math.nan
    y2 = y.clone()
    y2[0, 0] = math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(repkern.shape_distance(x, y).item())
        assert math.isnan(repkern.shape_distance(y, x, alpha=0.0, score="euclidean").item())
        assert math.isnan(repkern.shape_distance(y2.float(), y.float()).item())


def test_constant_input(impl):
    """Angular: NaN (no direction to compare; a RuntimeWarning from the op). Euclidean: ‖Ỹ‖ = ‖Ȳ‖
    (variance preserved)."""
    _, y = _related(30, 4, 4, seed=19)
    x = torch.full((30, 4), 0.1, dtype=torch.float64)
    if impl == "ops":
        with pytest.warns(RuntimeWarning, match="x: zero variance"):
            assert math.isnan(repkern.shape_distance(x, y).item())
    else:
        assert math.isnan(repkern.shape_distance(x, y).item())
    for alpha in (1.0, 0.5):
        np.testing.assert_allclose(repkern.shape_distance(x, y, alpha=alpha, score="euclidean").item(),
                                   torch.linalg.norm(y - y.mean(0)).item(), rtol=1e-12)


def test_alpha_zero_rank_deficient_suggests_alpha_above_zero(impl):
    x, y = _related(40, 5, 5, seed=20)
    collinear = torch.cat([x[:, :4], x[:, :1] + x[:, 1:2]], 1)
    with pytest.raises(ValueError, match=r"x: full whitening \(alpha=0\).*rank 4 < d=5.*alpha > 0"):
        repkern.shape_distance(collinear, y, alpha=0.0)
    with pytest.raises(ValueError, match=r"y: .*zero-padded from 3 to 5.*alpha > 0"):
        repkern.shape_distance(x, y[:, :3], alpha=0.0)
    with pytest.raises(ValueError, match=r"x: .*n=4 samples.*alpha > 0"):
        repkern.shape_distance(x[:4], y[:4], alpha=0.0)
    repkern.shape_distance(collinear, y, alpha=1e-3)  # partial whitening is defined


# ---- bad arguments ---------------------------------------------------------------------------------------------


def test_bad_arguments_name_the_argument(impl):
    x, y = _related(20, 4, 3, seed=21)
    with pytest.raises(ValueError, match=r"y: has n=19 samples \(rows\) but x has n=20"):
        repkern.shape_distance(x, y[:19])
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        repkern.shape_distance(x[None], y[None])
    with pytest.raises(ValueError, match="y: expected at least 2 dimensions"):
        repkern.shape_distance(x, y[:, 0])
    with pytest.raises(ValueError, match="alpha"):
        repkern.shape_distance(x, y, alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        repkern.shape_distance(x, y, alpha=-0.1)
    with pytest.raises(ValueError, match="alpha"):
        repkern.shape_distance(x, y, alpha=math.nan)
    with pytest.raises(TypeError, match="alpha"):
        repkern.shape_distance(x, y, alpha="1")
    with pytest.raises(ValueError, match="score"):
        repkern.shape_distance(x, y, score="cosine")
    with pytest.raises(ValueError, match="x: shape_distance .*n >= 2"):
        repkern.shape_distance(x[:1], y[:1])
    with pytest.raises(TypeError, match="y: dtype"):
        repkern.shape_distance(x, y.float())
    with pytest.raises(TypeError, match="x"):
        repkern.shape_distance(x.numpy(), y)
    with pytest.raises(TypeError, match="x"):
        repkern.shape_distance(x.long(), y)


def test_result_dtype_rule():
    x, y = _related(20, 3, 3, seed=22)
    assert repkern.shape_distance(x.float(), y.float()).dtype == _common.stat_dtype(torch.float32)
