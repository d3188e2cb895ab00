"""repkern.cka_test: the fused permutation/bootstrap kernel against a loop that permutes or
resamples and recomputes CKA with the reference, calibration of the p-value, determinism,
degenerate and bad input, on every backend."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import repkern
from repkern import _common, reference
from repkern.ops import cka_test as cka_test_ops
from tests.conftest import assert_close_to_reference, upper_shares


def _related(n, seed, noise=1.5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = x @ torch.randn(5, 3, generator=g, dtype=torch.float64) + noise * torch.randn(n, 3, generator=g,
                                                                                      dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


@pytest.mark.parametrize("n", (37, 40))  # 40: 16-byte loads in the CUDA kernel; 37: the scalar fallback
@pytest.mark.parametrize("debiased", (False, True))
@pytest.mark.parametrize("kernel", ("linear", "cosine", "rbf"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_matches_a_loop_recomputing_cka_with_the_reference(backend, dtype, kernel, debiased, n):
    x, y = _related(n, seed=1)
    kwargs = dict(kernel=kernel, debiased=debiased, n_permutations=6, n_bootstrap=5, seed=11)
    got = repkern.cka_test(x.to(dtype).to(backend.device), y.to(dtype).to(backend.device), **kwargs)
    ref_low = reference.cka_test(x.to(dtype), y.to(dtype), **kwargs)
    ref64 = reference.cka_test(x, y, **kwargs)
    for field in ("cka", "null", "bootstrap", "ci_low", "ci_high"):
        value = getattr(got, field)
        assert value.dtype == _common.stat_dtype(dtype), field
        assert_close_to_reference(value.cpu(), getattr(ref_low, field), getattr(ref64, field))
    assert got.p_value.item() == pytest.approx(ref64.p_value.item(), rel=1e-7)
    # the null really is CKA against permuted rows: check two by hand with the public op
    perms, _ = _common.replicate_indices(n, 6, 5, 11)
    for i in (0, 5):
        by_hand = repkern.cka(x, y[perms[i]], kernel, debiased=debiased)
        torch.testing.assert_close(got.null[i].double().cpu(), by_hand, rtol=1e-4 if dtype == torch.float32 else 1e-10,
                                   atol=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.emu_smoke
@pytest.mark.parametrize("n", (13, 24, 300))  # 300: rows whose column loop runs twice and ends in a tail
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_replicate_rows_kernel_both_modes(backend, dtype, n):
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    b = torch.randn(n, n, generator=g, dtype=torch.float64)
    a, b = (a + a.T).to(dtype), (b + b.T).to(dtype)
    perms = torch.stack([torch.randperm(n, generator=g) for _ in range(3)]).to(torch.int32)
    weights = torch.randint(0, 3, (4, n), generator=g).float()
    dev = backend.device
    out = torch.ops.repkern.replicate_rows(a.to(dev), b.to(dev), perms.to(dev), 0).cpu()
    ad, bd = a.double(), b.double()
    for r, p in enumerate(perms.long()):
        products = ad * bd[p][:, p]
        torch.testing.assert_close(out[r, :, 0], upper_shares(products), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out[r, :, 0].sum(), products.sum(), rtol=1e-12, atol=1e-10)  # the total
    out = torch.ops.repkern.replicate_rows(a.to(dev), b.to(dev), weights.to(dev), 1).cpu()
    for r, w in enumerate(weights.double()):
        expected = torch.stack([(ad * bd * w).sum(1), (ad * ad * w).sum(1), (bd * bd * w).sum(1), (ad * w).sum(1),
                                (bd * w).sum(1)], dim=1)
        torch.testing.assert_close(out[r], expected, rtol=1e-12, atol=1e-12)


def test_replicate_rows_opcheck_and_index_check():
    a = torch.randn(6, 6)
    a = a + a.T
    perms = torch.stack([torch.randperm(6) for _ in range(2)]).to(torch.int32)
    torch.library.opcheck(torch.ops.repkern.replicate_rows.default, (a, a, perms, 0))
    torch.library.opcheck(torch.ops.repkern.replicate_rows.default, (a, a, torch.ones(3, 6), 1))
    with pytest.raises(ValueError, match="columns"):
        torch.ops.repkern.replicate_rows(a, a, perms + 1, 0)


def test_p_value_is_calibrated_under_independence():
    """Independent x, y: the permutation p-value is uniform on {1, ..., B+1}/(B+1), so the test
    rejects at 0.05 about 5% of the time (binomial sd over 200 data sets: 1.5 points)."""
    p_values = []
    for rep in range(200):
        g = torch.Generator().manual_seed(1000 + rep)
        x, y = torch.randn(20, 3, generator=g, dtype=torch.float64), torch.randn(20, 2, generator=g,
                                                                                dtype=torch.float64)
        p_values.append(repkern.cka_test(x, y, n_permutations=99, n_bootstrap=0, seed=rep).p_value.item())
    p = torch.tensor(p_values)
    assert 0.01 <= (p <= 0.05).double().mean().item() <= 0.10
    assert 0.40 <= p.mean().item() <= 0.60
    assert (p >= 1 / 100).all() and (p <= 1).all()


def test_p_value_is_minimal_for_strongly_related_data(backend):
    x, y = _related(60, seed=2, noise=0.1)
    result = repkern.cka_test(x.to(backend.device), y.to(backend.device), "rbf", n_permutations=49, n_bootstrap=40)
    assert result.p_value.item() == pytest.approx(1 / 50)
    assert (result.null < result.cka).all()
    assert 0 < result.ci_low <= result.ci_high <= 1 + 1e-12
    assert result.null.shape == (49,) and result.bootstrap.shape == (40,)


def test_deterministic_per_seed(backend):
    x, y = _related(30, seed=3)
    x, y = x.float().to(backend.device), y.float().to(backend.device)
    first = repkern.cka_test(x, y, n_permutations=20, n_bootstrap=20, seed=5)
    again = repkern.cka_test(x, y, n_permutations=20, n_bootstrap=20, seed=5)
    other = repkern.cka_test(x, y, n_permutations=20, n_bootstrap=20, seed=6)
    for field in ("cka", "p_value", "ci_low", "ci_high", "null", "bootstrap"):
        assert torch.equal(getattr(first, field), getattr(again, field)), field
    assert not torch.equal(first.null, other.null)
    # the plan is drawn on the CPU: the same on every device
    p1, b1 = _common.replicate_indices(30, 20, 20, 5)
    assert torch.equal(torch.sort(p1, 1).values, torch.arange(30).expand(20, 30)) and b1.max() < 30


def test_degenerate_input(backend):
    x, y = _related(30, seed=4)
    x, y = x.to(backend.device), y.to(backend.device)
    with pytest.warns(RuntimeWarning, match="x"):
        result = repkern.cka_test(torch.ones_like(x), y, n_permutations=5, n_bootstrap=5)
    assert all(torch.isnan(getattr(result, f)).all() for f in ("cka", "p_value", "ci_low", "ci_high", "null"))
    bad = x.clone()
    bad[3, 1] = math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = repkern.cka_test(bad, y, n_permutations=5, n_bootstrap=5)
    assert torch.isnan(result.cka) and torch.isnan(result.p_value) and torch.isnan(result.bootstrap).all()
    result = repkern.cka_test(x, y, n_permutations=0, n_bootstrap=0)
    assert torch.isnan(result.p_value) and torch.isnan(result.ci_low) and result.null.numel() == 0
    torch.testing.assert_close(result.cka.cpu(), repkern.cka(x, y).cpu(), rtol=1e-12, atol=1e-12)
    assert "p_value" in repr(result)


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        (dict(x=torch.randn(2, 10, 3)), ValueError, "x"),
        (dict(y=torch.randn(11, 3)), ValueError, "y"),
        (dict(y=torch.randn(10, 3, dtype=torch.float64)), TypeError, "y"),
        (dict(x=torch.randint(0, 3, (10, 3))), TypeError, "x"),
        (dict(n_permutations=-1), ValueError, "n_permutations"),
        (dict(n_permutations=10.0), TypeError, "n_permutations"),
        (dict(n_bootstrap=True), TypeError, "n_bootstrap"),
        (dict(seed=-2), ValueError, "seed"),
        (dict(ci=1.0), ValueError, "ci"),
        (dict(ci=0.0), ValueError, "ci"),
        (dict(kernel="poly"), ValueError, "kernel"),
        (dict(x=torch.randn(3, 3), y=torch.randn(3, 2), debiased=True), ValueError, "n >= 4"),
        (dict(max_gram_bytes=100), ValueError, "max_gram_bytes"),
    ],
)
def test_bad_input_names_the_argument(kwargs, exc, message):
    args = dict(x=torch.randn(10, 3), y=torch.randn(10, 2), n_permutations=3, n_bootstrap=3)
    args.update(kwargs)
    x, y = args.pop("x"), args.pop("y")
    with pytest.raises(exc, match=message):
        repkern.cka_test(x, y, **args)


def test_reference_backend_is_the_reference(monkeypatch):
    x, y = _related(20, seed=5)
    monkeypatch.setenv("REPKERN_BACKEND", "reference")
    got = repkern.cka_test(x, y, n_permutations=4, n_bootstrap=4)
    ref = reference.cka_test(x, y, n_permutations=4, n_bootstrap=4)
    assert torch.equal(got.null, ref.null) and torch.equal(got.bootstrap, ref.bootstrap)


def test_chunked_launches_agree_with_one_launch(monkeypatch):
    x, y = _related(32, seed=6)
    whole = repkern.cka_test(x, y, n_permutations=30, n_bootstrap=30)
    monkeypatch.setattr(cka_test_ops, "REPLICATE_BYTES", 32 * 50 * 7)  # a few replicates per launch
    assert len(cka_test_ops._chunks(30, 32, 5)) > 3
    split = repkern.cka_test(x, y, n_permutations=30, n_bootstrap=30)
    assert torch.equal(whole.null, split.null) and torch.equal(whole.bootstrap, split.bootstrap)
