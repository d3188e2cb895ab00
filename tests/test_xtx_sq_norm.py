"""The CPU kernel for ‖xᵀx‖²_F of float32 matrices (gram_ops.XTX_SQ_NORM, the self terms of the feature-space
linear CKA): against float64 products, at every compiled CPU level this host runs, on shapes around its
panel and strip edges and its float32 row blocks; independence of the thread count; the op's autograd and
fake implementation; where it is used; the checks of its arguments."""

from __future__ import annotations

import math
import re

import pytest
import torch

import repkern
from repkern import _C, _native, reference
from repkern.ops import gram as gram_ops
from tests.conftest import at_thread_counts

ROW_BLOCK = 512  # kXtxBlock in csrc/cpu/gram.cpp: rows summed in float32 before the float64 accumulation


def _native_norm(x: torch.Tensor) -> torch.Tensor:
    out = torch.full((x.shape[0],), math.nan, dtype=torch.float64)
    _native.call(gram_ops.XTX_SQ_NORM, x.device, x, out)
    return out


def _assert_sq_norm(got: torch.Tensor, x: torch.Tensor) -> None:
    """Within float32 rounding of the float64 value: each product entry s_ij is off by at most
    e_ij = n·2⁻²³·‖c_i‖‖c_j‖ (columns c), so its square by at most 2|s_ij|e_ij + e_ij²."""
    x64 = x.double()
    s = x64.mT @ x64
    cols = x64.norm(dim=-2)
    e = max(x.shape[-2], 1) * 2.0**-23 * cols[..., :, None] * cols[..., None, :]
    bound = (2 * s.abs() * e + e * e).sum((-2, -1)) + 1e-12 * s.square().sum((-2, -1)) + 1e-300
    err = (got - s.square().sum((-2, -1))).abs()
    assert bool((err <= bound).all()), float((err / bound).max())


# panels of 6 or 8 columns, strips of 8, 16 or 32 columns (by level); rows around the float32 blocks
@pytest.mark.parametrize("d", [1, 5, 6, 7, 8, 9, 16, 17, 31, 32, 33, 48, 100])
@pytest.mark.parametrize("n", [1, 3, ROW_BLOCK, ROW_BLOCK + 1, 2 * ROW_BLOCK + 7])
def test_matches_float64(cpu_isa, n, d):
    g = torch.Generator().manual_seed(n * 1000 + d)
    x = torch.randn((2, n, d), generator=g) * torch.rand((2, 1, d), generator=g) * 4 + 0.5
    _assert_sq_norm(_native_norm(x), x)


def test_every_entry_counts_once_with_its_mirror():
    """A hand-checkable case: x = [[1, 2], [3, 4]] gives xᵀx = [[10, 14], [14, 20]], 100 + 2·196 + 400."""
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    assert _native_norm(x).item() == 892.0
    ones = torch.ones(1, 600, 70)  # every entry 600 (two row blocks), 70² entries
    assert _native_norm(ones).item() == 600.0**2 * 70 * 70


def test_special_values_and_empty_shapes():
    x = torch.randn(3, 40, 20)
    x[0, 3, 5] = math.nan
    x[1, 7, 19] = math.inf
    got = _native_norm(x)
    assert math.isnan(got[0]) and not math.isfinite(got[1]) and math.isfinite(got[2])
    assert torch.equal(_native_norm(torch.zeros(2, 0, 5)), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(_native_norm(torch.zeros(2, 9, 0)), torch.zeros(2, dtype=torch.float64))
    assert _native_norm(torch.zeros(0, 9, 5)).shape == (0,)


@pytest.mark.parametrize("batch", [1, 3])
def test_independent_of_thread_count(batch):
    """A matrix per task (batch >= threads) or pairs of strips per task (batch < threads): the same bits."""
    x = torch.randn(batch, 700, 90)
    results = at_thread_counts(lambda: _native_norm(x))
    _assert_sq_norm(results[0], x)
    for r in results[1:]:
        assert torch.equal(r, results[0])


def test_which_inputs_take_it(cpu_isa):
    """float32 of at least XTX_MIN_WIDTH columns on the CPU at the avx2 and avx512 levels (not the SSE baseline,
    where MKL's GEMM is faster); every input gets the same value either way."""
    fast_level = _C.cpu_isa() in ("avx2", "avx512")
    width = gram_ops.XTX_MIN_WIDTH
    for dtype, d, native in [(torch.float32, width, True), (torch.float32, width - 1, False),
                             (torch.float64, width, False)]:
        x = torch.randn(2, 50, d, dtype=dtype)
        assert gram_ops.native_xtx_sq_norm(x) is (native and fast_level)
        x64 = x.double()
        torch.testing.assert_close(gram_ops.xtx_sq_norm(x), (x64.mT @ x64).square().sum((-2, -1)), rtol=1e-5,
                                   atol=0)


def test_gradient_and_op_registration():
    g = torch.Generator().manual_seed(3)
    x = torch.randn((2, 30, 70), generator=g, requires_grad=True)
    (gx,) = torch.autograd.grad((gram_ops.xtx_sq_norm(x) * torch.tensor([1.0, -2.0], dtype=torch.float64)).sum(), x)
    x64 = x.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(((x64.mT @ x64).square().sum((-2, -1)) * torch.tensor([1.0, -2.0],
                                                                                       dtype=torch.float64)).sum(), x64)
    torch.testing.assert_close(gx.double(), g64, rtol=1e-5, atol=1e-3)
    torch.library.opcheck(torch.ops.repkern.xtx_sq_norm.default, (torch.randn(2, 20, 70, requires_grad=True),))


def test_debiased_feature_cka_unchanged_by_it(monkeypatch):
    """cka's feature path with the kernel (the self terms) against plain-PyTorch feature-space CKA, and against
    itself with the kernel turned off."""
    monkeypatch.delenv("REPKERN_BACKEND", raising=False)
    g = torch.Generator().manual_seed(5)
    x = torch.randn((3, 300, 80), generator=g)
    y = torch.randn((3, 300, 64), generator=g) + x[..., :64]
    with_kernel = [repkern.cka(x, y, debiased=debiased, method="feature") for debiased in (False, True)]
    monkeypatch.setattr(gram_ops, "INNER_PRODUCTS_ISAS", ())
    for debiased, value in zip((False, True), with_kernel):
        expected = reference.feature_space_linear_cka(x.double(), y.double(), debiased=debiased).float()
        torch.testing.assert_close(value, expected)
        torch.testing.assert_close(repkern.cka(x, y, debiased=debiased, method="feature"), value)


def test_rejects_bad_arguments():
    x, out = torch.zeros(2, 4, 3), torch.zeros(2, dtype=torch.float64)
    cases = [
        ((torch.zeros(2, 4, 3, dtype=torch.float64), out), "x: unexpected dtype"),
        ((torch.zeros(4, 3), out), "x: expected shape [B, n, d]"),
        ((torch.zeros(2, 3, 4).mT, out), "x: must be contiguous"),
        ((x, torch.zeros(3, dtype=torch.float64)), "out: unexpected shape"),
        ((x, torch.zeros(2)), "out: unexpected dtype"),
        ((x, torch.zeros(2, 2, dtype=torch.float64)[:, 0]), "out: must be contiguous"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            _native.call(gram_ops.XTX_SQ_NORM, x.device, *args)
