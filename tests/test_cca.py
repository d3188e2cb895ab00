"""repkern.cca / svcca / pwcca against independent numpy/scipy versions (principal angles, whitened
covariances), facts that need no oracle, degenerate input and bad arguments; the op and
repkern.reference (REPKERN_BACKEND=reference) both run."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import repkern
from repkern.ops import _second_order as so
from tests.linear_oracles import cca_covariance, cca_subspace_angles, orth, pwcca_numpy, svcca_numpy

SIZES = ((60, 5, 5), (73, 4, 9), (51, 11, 3), (35, 1, 6))


def _data(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _related(n, d1, d2, seed=0, shift=0.0):
    """Correlations spread over (0, 1): y shares a few directions of x, with noise; uneven column scales."""
    x = _data((n, d1), seed) * torch.linspace(0.3, 3.0, d1, dtype=torch.float64) + shift
    y = x[:, : min(d1, 3)] @ _data((min(d1, 3), d2), seed + 1) + 0.9 * _data((n, d2), seed + 2) - shift
    return x, y


# ---- cca ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, d1, d2", SIZES)
def test_cca_matches_principal_angles_and_whitened_covariance(impl, n, d1, d2):
    x, y = _related(n, d1, d2, seed=n, shift=40.0)
    got = repkern.cca(x, y)
    assert got.dtype == torch.float64 and got.shape == (min(d1, d2),)
    assert bool((got[:-1] >= got[1:]).all())  # descending
    np.testing.assert_allclose(got.numpy(), cca_subspace_angles(x.numpy(), y.numpy()), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(got.numpy(), cca_covariance(x.numpy(), y.numpy())[0], rtol=1e-9, atol=1e-10)


def test_cca_float32_input_is_the_float64_result_rounded(impl):
    x, y = (t.float() for t in _related(90, 8, 6, seed=1, shift=500.0))
    got = repkern.cca(x, y)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), cca_subspace_angles(x.double().numpy(), y.double().numpy()), rtol=1e-6,
                               atol=1e-7)


@pytest.mark.parametrize("n, d1, d2", ((8, 12, 5), (10, 4, 30), (6, 9, 9)))
def test_cca_with_fewer_samples_than_features(impl, n, d1, d2):
    """n <= d: the centered ranks are <= n − 1; min(rank x̄, rank ȳ) correlations, of which at least
    rank x̄ + rank ȳ − (n − 1) are 1 (the column spaces must meet)."""
    x, y = _related(n, d1, d2, seed=2 * n)
    ux, uy = orth(x.numpy()), orth(y.numpy())
    expected = np.linalg.svd(ux.T @ uy, compute_uv=False)[: min(ux.shape[1], uy.shape[1])]
    got = repkern.cca(x, y).numpy()
    assert got.shape == expected.shape == (min(ux.shape[1], uy.shape[1]),)
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-8)
    forced = ux.shape[1] + uy.shape[1] - (n - 1)
    np.testing.assert_allclose(got[:forced], 1.0, atol=1e-8)


def test_identical_inputs_give_all_ones(impl):
    x, _ = _related(70, 6, 6, seed=3, shift=7.0)
    np.testing.assert_allclose(repkern.cca(x, x.clone()).numpy(), np.ones(6), atol=1e-10)
    np.testing.assert_allclose(repkern.svcca(x, x.clone()).item(), 1.0, atol=1e-10)
    np.testing.assert_allclose(repkern.pwcca(x, x.clone()).item(), 1.0, atol=1e-10)


def test_cca_is_invariant_to_invertible_linear_maps_and_shifts(impl):
    x, y = _related(80, 5, 4, seed=4)
    mx = _data((5, 5), 5) + 2 * torch.eye(5, dtype=torch.float64)
    my = _data((4, 4), 6) + 2 * torch.eye(4, dtype=torch.float64)
    base = repkern.cca(x, y)
    mapped = repkern.cca(x @ mx - 3.0, y @ my + 11.0)
    np.testing.assert_allclose(mapped.numpy(), base.numpy(), rtol=1e-9, atol=1e-11)
    for fn in (repkern.svcca, repkern.pwcca):  # not invariant to maps, but to shifts and the order of rows
        perm = torch.randperm(80, generator=torch.Generator().manual_seed(7))
        np.testing.assert_allclose(fn(x[perm] + 2.0, y[perm]).item(), fn(x, y).item(), rtol=1e-10)


def test_permuting_rows_of_y_alone_destroys_alignment(impl):
    x, _ = _related(400, 4, 4, seed=8)
    perm = torch.randperm(400, generator=torch.Generator().manual_seed(9))
    assert repkern.cca(x, x[perm]).max().item() < 0.3
    assert repkern.svcca(x, x[perm]).item() < 0.2
    assert repkern.pwcca(x, x[perm]).item() < 0.2


def test_dead_units_are_dropped(impl):
    """A constant column has no variance: it neither adds a canonical correlation nor breaks the others."""
    x, y = _related(50, 4, 3, seed=10)
    dead = torch.cat([x, torch.zeros(50, 2, dtype=torch.float64)], 1)
    np.testing.assert_allclose(repkern.cca(dead, y).numpy(), repkern.cca(x, y).numpy(), rtol=1e-9)
    assert repkern.cca(dead, dead).shape == (4,)


# ---- svcca -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", (0.99, 0.8, 0.5, 1.0))
@pytest.mark.parametrize("n, d1, d2", SIZES)
def test_svcca_keep_matches_numpy(impl, n, d1, d2, keep):
    x, y = _related(n, d1, d2, seed=n + 1, shift=3.0)
    got = repkern.svcca(x, y, keep=keep)
    assert got.dtype == torch.float64 and got.shape == ()
    np.testing.assert_allclose(got.item(), svcca_numpy(x.numpy(), y.numpy(), keep=keep), rtol=1e-9)


@pytest.mark.parametrize("dims", (1, 2, (3, 1), (1, 3)))
def test_svcca_dims_matches_numpy(impl, dims):
    x, y = _related(66, 5, 4, seed=11)
    pair = (dims, dims) if isinstance(dims, int) else dims
    np.testing.assert_allclose(repkern.svcca(x, y, dims=dims).item(),
                               svcca_numpy(x.numpy(), y.numpy(), dims=pair), rtol=1e-9)


def test_svcca_with_all_directions_is_mean_cca(impl):
    x, y = _related(70, 6, 4, seed=12)
    np.testing.assert_allclose(repkern.svcca(x, y, dims=(6, 4)).item(), repkern.cca(x, y).mean().item(), rtol=1e-12)
    np.testing.assert_allclose(repkern.svcca(x, y, keep=1.0).item(), repkern.cca(x, y).mean().item(), rtol=1e-12)


def test_svcca_keep_counts_variance_of_directions():
    """Hand-made spectrum: variances 100, 10, 1, 0.1 per side → keep=0.9 keeps 1 direction (100/111.1),
    keep=0.95 keeps 2; checked through the op's selection rule."""
    values = torch.tensor([100.0, 10.0, 1.0, 0.1], dtype=torch.float64)
    s = so.Spectrum(values, torch.eye(4, dtype=torch.float64), 4, values.sum())
    assert so.svcca_directions(s, None, 0.9) == 1
    assert so.svcca_directions(s, None, 0.95) == 2
    assert so.svcca_directions(s, None, 1.0) == 4
    assert so.svcca_directions(s, 3, 0.5) == 3


# ---- pwcca -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, d1, d2", SIZES)
def test_pwcca_matches_numpy(impl, n, d1, d2):
    x, y = _related(n, d1, d2, seed=n + 2, shift=-9.0)
    got = repkern.pwcca(x, y)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.item(), pwcca_numpy(x.numpy(), y.numpy()), rtol=1e-9)


def test_pwcca_weights_from_x_and_bounds(impl):
    x, y = _related(120, 7, 3, seed=13)
    rho = repkern.cca(x, y)
    forward, backward = repkern.pwcca(x, y).item(), repkern.pwcca(y, x).item()
    assert forward != pytest.approx(backward, rel=1e-6)  # weights from the first argument's units
    for value in (forward, backward):
        assert rho.min().item() - 1e-12 <= value <= rho.max().item() + 1e-12  # a weighted mean of ρ


# ---- degenerate input ------------------------------------------------------------------------------------------


def test_nan_input(impl):
    x, y = _related(30, 4, 3, seed=14)
    x[5, 0] = math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = repkern.cca(x, y)
        assert got.shape == (3,) and torch.isnan(got).all()
        assert math.isnan(repkern.svcca(y, x).item())
        assert math.isnan(repkern.pwcca(x.float(), y.float()).item())


def test_constant_input(impl):
    x, y = _related(30, 4, 3, seed=15)
    c = torch.full((30, 4), 0.3, dtype=torch.float64)
    assert repkern.cca(c, y).shape == (0,)
    for fn in (repkern.svcca, repkern.pwcca):
        if impl == "ops":
            with pytest.warns(RuntimeWarning, match="x: zero variance"):
                assert math.isnan(fn(c, y).item())
        else:
            assert math.isnan(fn(c, y).item())


# ---- bad arguments ------------------------------------------------------------------------------------------------


def test_bad_arguments_name_the_argument(impl):
    x, y = _related(20, 4, 3, seed=16)
    for fn in (repkern.cca, repkern.svcca, repkern.pwcca):
        with pytest.raises(ValueError, match=r"y: has n=18 samples"):
            fn(x, y[:18])
        with pytest.raises(ValueError, match="x: expected a 2-D"):
            fn(x[None], y[None])
        with pytest.raises(ValueError, match="x: .*needs n >= 2"):
            fn(x[:1], y[:1])
        with pytest.raises(TypeError, match="y: dtype"):
            fn(x, y.float())
    with pytest.raises(ValueError, match="keep"):
        repkern.svcca(x, y, keep=0.0)
    with pytest.raises(ValueError, match="keep"):
        repkern.svcca(x, y, keep=1.01)
    with pytest.raises(TypeError, match="keep"):
        repkern.svcca(x, y, keep=None)
    with pytest.raises(ValueError, match="dims: 4 SVD directions requested from y, which has only d=3"):
        repkern.svcca(x, y, dims=4)
    with pytest.raises(ValueError, match="dims"):
        repkern.svcca(x, y, dims=0)
    with pytest.raises(ValueError, match="dims"):
        repkern.svcca(x, y, dims=(1, 2, 3))
    with pytest.raises(TypeError, match="dims"):
        repkern.svcca(x, y, dims=1.5)
