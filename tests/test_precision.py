"""Precision at the edges of the float formats, against float64 references: mean-shifted data on the
linear CKA feature path, inputs below float32's normal range, cosine rows near float32's overflow, and
rows holding ±Inf (NaN in their Gram row and column on every kernel, backend and in the reference)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import repkern
from repkern import reference
from tests.conftest import assert_close_to_reference

KERNELS = ("linear", "cosine", "rbf")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _shifted_pair(n=2048, seed=0):
    """float32 x (n, 16), y (n, 8) with mean 1e3 and std 1e-3 (a ulp of 1e3 is 6e-5), y partly dependent on x."""
    g = _gen(seed)
    x = (1e3 + 1e-3 * torch.randn(n, 16, generator=g, dtype=torch.float64)).float()
    y = (1e3 + 1e-3 * torch.randn(n, 8, generator=g, dtype=torch.float64)).float()
    y[:, :4] = (y[:, :4].double() + 0.5 * (x[:, :4].double() - 1e3)).float()
    return x, y


@pytest.mark.parametrize("debiased", (False, True))
def test_feature_path_on_mean_shifted_float32_matches_float64(backend, debiased):
    """The default (feature-space) linear path used to subtract a rounded float32 column mean and leave
    its error in every row: 2e-4 off the float64 CKA here (the Gram path, whose centering is done in float64
    from row sums, was 2e-9 off). Now within float32 tolerance on every path."""
    x, y = _shifted_pair()
    want = float(reference.feature_space_linear_cka(x.double(), y.double(), debiased=debiased))
    assert 0.05 < want < 0.1
    assert repkern.cka_plan(x, y).method == "feature"
    x, y = x.to(backend.device), y.to(backend.device)
    methods = ("auto", "feature") if backend.is_emu else ("auto", "feature", "gram")  # the emulator: n² is slow
    for method in methods:
        got = float(repkern.cka(x, y, method=method, debiased=debiased))
        assert got == pytest.approx(want, abs=2e-6), method
    got = repkern.cka_matrix([x, y], debiased=debiased)
    assert float(got[0, 1]) == pytest.approx(want, abs=2e-6)
    h_want = float(reference.hsic(x.cpu().double(), y.cpu().double(), debiased=debiased))
    assert float(repkern.hsic(x, y, debiased=debiased)) == pytest.approx(h_want, rel=2e-5)


@pytest.mark.parametrize("kernel", ("linear", "cosine"))
def test_inputs_below_the_float32_normal_range(backend, kernel):
    """max |x| < 2^-128: the power-of-two scale 2^128+ does not fit float32 (it gave NaN and a false
    zero-variance warning); it is applied as two exact factors now."""
    g = _gen(1)
    x = (torch.randn(64, 5, generator=g) * 2.0**-135).to(backend.device)
    y = (x[:, :3] * 2.0 + torch.randn(64, 3, generator=g).to(backend.device) * 2.0**-136).to(backend.device)
    assert x.abs().max() < 2.0**-128
    want = float(reference.cka(x.cpu().double(), y.cpu().double(), kernel))
    for method in ("feature", "gram") if kernel == "linear" else ("gram",):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no zero-variance warning
            got = float(repkern.cka(x, y, kernel, method=method))
        assert got == pytest.approx(want, abs=2e-5), method
    assert float(repkern.cka(x, x, kernel)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
def test_cosine_gram_of_rows_near_the_float32_limits(backend, dtype):
    """Cosine of finite rows at |x| ≈ 1e20 was NaN off the diagonal (float32 products overflow before the
    normalization); rows at 1e-20 or subnormal must not underflow to 'zero rows' either."""
    g = _gen(2)
    x = torch.randn(2, 7, 6, generator=g, dtype=torch.float64)
    x[0] *= 1e20
    x[1, :3] *= 1e-20
    x[1, 3:5] *= 1e19
    x[1, 5] *= 2.0**-140 if dtype == torch.float32 else 1.0  # subnormal float32 row
    x = x.to(dtype)
    k = repkern.gram(x.to(backend.device), "cosine").cpu()
    assert_close_to_reference(k, reference.gram(x, "cosine"), reference.gram(x.double(), "cosine"))
    assert torch.isfinite(k).all() and (k.diagonal(dim1=1, dim2=2) == 1).all()
    want = reference.cka(x[0].double(), x[1].double(), "cosine")
    got = repkern.cka(x[0].to(backend.device), x[1].to(backend.device), "cosine")
    assert float(got) == pytest.approx(float(want), abs=1e-5 if dtype != torch.bfloat16 else 1e-2)


def test_cosine_gram_gradient_of_huge_rows():
    x64 = torch.randn(6, 4, generator=_gen(3), dtype=torch.float64) * 1e20
    w = torch.randn(6, 6, generator=_gen(4), dtype=torch.float64)
    x = x64.float().requires_grad_()
    (repkern.gram(x, "cosine") * w.float()).sum().backward()
    ref = x.detach().double().requires_grad_()
    (reference.gram(ref, "cosine") * w).sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad.double(), ref.grad, rtol=1e-4, atol=1e-4 * ref.grad.abs().max().item())


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bad", (math.inf, -math.inf, math.nan))
def test_a_non_finite_row_gives_nan_in_its_row_and_column(backend, kernel, bad):
    """Documented: NaN or ±Inf in row i gives NaN in row and column i, diagonal included (an Inf row gave
    a cosine diagonal of 1 and linear entries ±inf; RBF entries 0), on every backend and in the reference;
    other entries are those of the finite rows."""
    x = torch.randn(2, 6, 3, generator=_gen(5), dtype=torch.float32)
    x[0, 2, 1] = bad
    x[1, 4, 0] = bad
    kw = {"sigma": 1.3} if kernel == "rbf" else {}
    for center in (False, True):
        for k in (repkern.gram(x.to(backend.device), kernel, center=center, **kw).cpu(),
                  reference.gram(x, kernel, center=center, **kw)):
            if center:  # centering mixes every row into every entry
                assert torch.isnan(k).all()
                continue
            for b, i in ((0, 2), (1, 4)):
                assert torch.isnan(k[b, i]).all() and torch.isnan(k[b, :, i]).all()
                keep = [j for j in range(6) if j != i]
                rest = k[b][keep][:, keep]
                torch.testing.assert_close(rest, reference.gram(x[b, keep], kernel, **kw), rtol=1e-5, atol=1e-6)
    # the median bandwidth skips nothing: only row and column i are certain to be NaN
    if kernel == "rbf":
        k = repkern.gram(x.to(backend.device), "rbf").cpu()
        assert torch.isnan(k[0, 2]).all() and torch.isnan(k[0, :, 2]).all()
