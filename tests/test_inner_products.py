"""The CPU kernel for x xᵀ of small-width float32 matrices (gram_ops.INNER_PRODUCTS, the linear Gram's
inner products for d <= SMALL_WIDTH): against a float64 matmul, at every compiled CPU level this host runs,
on shapes around its panel and strip edges; exact symmetry; independence of the thread count; the checks of
its arguments."""

from __future__ import annotations

import math
import re

import pytest
import torch

import repkern
from repkern import _C, _native
from repkern.ops import gram as gram_ops
from tests.conftest import at_thread_counts


def _inner(x: torch.Tensor) -> torch.Tensor:
    out = torch.full((x.shape[0], x.shape[1], x.shape[1]), math.nan)
    _native.call(gram_ops.INNER_PRODUCTS, x.device, x, out)
    return out


def _assert_products(got: torch.Tensor, x: torch.Tensor) -> None:
    """Within float32 rounding of the float64 products: |error| <= d·2⁻²³·‖x_i‖‖x_j‖ per entry."""
    x64 = x.double()
    norms = x64.norm(dim=-1)
    bound = max(x.shape[-1], 1) * 2.0**-23 * norms[..., :, None] * norms[..., None, :] + 1e-30
    err = (got.double() - x64 @ x64.mT).abs()
    assert bool((err <= bound).all()), float((err / bound).max())


# panels of 6 or 8 rows, strips of 8, 16 or 32 columns (by level): n around both, strip counts odd and even
@pytest.mark.parametrize("n", [1, 2, 5, 6, 7, 8, 9, 15, 17, 31, 32, 33, 47, 64, 100, 257])
@pytest.mark.parametrize("d", [1, 3, 64, 128])
def test_matches_float64_products_and_is_exactly_symmetric(cpu_isa, n, d):
    g = torch.Generator().manual_seed(n * 1000 + d)
    x = torch.randn((3, n, d), generator=g) * torch.rand((3, n, 1), generator=g) * 4
    got = _inner(x)
    _assert_products(got, x)
    assert torch.equal(got, got.mT)


def test_special_values_propagate_to_their_rows_and_columns(cpu_isa):
    x = torch.randn(1, 40, 16)
    x[0, 3, 5] = math.nan
    x[0, 20, 0] = math.inf
    got = _inner(x)
    assert bool(got[0, 3].isnan().all()) and bool(got[0, :, 3].isnan().all())
    assert got[0, 20, 20] == math.inf and not bool(got[0, 20].isfinite().any())
    clean = [i for i in range(40) if i not in (3, 20)]
    _assert_products(got[:, clean][:, :, clean], x[:, clean])


def test_zero_width_gives_zeros():
    assert torch.equal(_inner(torch.zeros(2, 9, 0)), torch.zeros(2, 9, 9))


@pytest.mark.parametrize("batch", [1, 3])
def test_independent_of_thread_count(batch):
    """A matrix per task (batch >= threads) or pairs of strips per task (batch < threads): the same bits."""
    x = torch.randn(batch, 300, 40)
    results = at_thread_counts(lambda: _inner(x))
    _assert_products(results[0], x)
    for r in results[1:]:
        assert torch.equal(r, results[0])


def test_linear_gram_takes_it_for_small_float32_widths_only(cpu_isa):
    """At the avx2 and avx512 levels (not the SSE baseline, where MKL's GEMM is faster)."""
    fast_level = _C.cpu_isa() in ("avx2", "avx512")
    for shape, dtype, native in [((2, 50, 128), torch.float32, True), ((2, 50, 129), torch.float32, False),
                                 ((2, 50, 8), torch.float64, False), ((2, 50, 8), torch.bfloat16, True)]:
        x = torch.randn(shape, dtype=dtype)
        assert gram_ops.native_inner_products(x) is (native and fast_level)
        k = repkern.gram(x, "linear")
        assert torch.equal(k, k.mT)
        x64 = x.double()
        torch.testing.assert_close(k.double(), x64 @ x64.mT, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-2 if dtype == torch.bfloat16 else 1e-4)


def test_rejects_bad_arguments():
    x, out = torch.zeros(2, 4, 3), torch.zeros(2, 4, 4)
    cases = [
        ((torch.zeros(2, 4, 3, dtype=torch.float64), out), "x: unexpected dtype"),
        ((torch.zeros(4, 3), out), "x: expected shape [B, n, d]"),
        ((torch.zeros(2, 3, 4).mT, out), "x: must be contiguous"),
        ((x, torch.zeros(2, 4, 3)), "out: unexpected shape"),
        ((x, torch.zeros(2, 4, 4, dtype=torch.float64)), "out: unexpected dtype"),
        ((x, torch.zeros(2, 4, 4).mT), "out: must be contiguous"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            _native.call(gram_ops.INNER_PRODUCTS, x.device, *args)
