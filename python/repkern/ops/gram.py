"""Gram matrices: ``repkern.gram`` and its custom ops.

Path: the GEMM x xᵀ goes to torch (bmm, float32 accumulation for 16-bit
inputs); one native epilogue kernel turns inner products into the Gram matrix
in a single pass (cosine normalization / distances -> exp, exact symmetry, and
centering from a row-sum pass). The RBF median bandwidth comes from a second op
that selects the median of the squared distances.

Custom ops (all registered with fake impls and autograd):
  repkern::gram(x (B,n,d), kernel, scale (B,)?, center) -> K (B,n,n) in x.dtype
      scale = −1/(2σ²) per batch matrix (rbf only)
  repkern::gram_median_sq_dist(x (B,n,d), offdiag) -> (median (B,), positions (B,2))
      positions: flat indices i·n + j of the (one or two) middle entries
"""

from __future__ import annotations

import enum
import math
from typing import Optional

import torch
from torch import Tensor

from repkern import _native, reference

__all__ = ["gram"]


class GramKind(enum.IntEnum):  # csrc/common/gram_math.h
    LINEAR = 0
    COSINE = 1
    RBF = 2
    SQDIST = 3


class GramPass(enum.IntEnum):
    WRITE = 0
    ROW_SUMS = 1
    WRITE_CENTERED = 2


_KIND = {"linear": GramKind.LINEAR, "cosine": GramKind.COSINE, "rbf": GramKind.RBF}


def _inner_products(x: Tensor) -> Tensor:
    """x (B, n, d) -> x xᵀ (B, n, n) in the accumulation dtype."""
    acc = _native.acc_dtype(x.dtype)
    if x.dtype != acc and x.is_cuda:
        try:
            return torch.bmm(x, x.mT, out_dtype=acc)  # 16-bit GEMM, float32 output
        except (TypeError, RuntimeError):
            pass
    xa = x.to(acc)
    return torch.bmm(xa, xa.mT)


def _row_factors(kind: GramKind, inner: Tensor) -> Optional[Tensor]:
    """(B, n) per-row factor of the epilogue (csrc/common/gram_math.h): g_ii for
    distances, 1/‖x_i‖ for cosine (0 for a zero row, NaN stays NaN)."""
    if kind == GramKind.LINEAR:
        return None
    diag = inner.diagonal(dim1=1, dim2=2)
    if kind == GramKind.COSINE:
        return torch.where(diag > 0, diag.rsqrt(), torch.where(diag == 0, torch.zeros_like(diag), diag))
    return diag.clone(memory_format=torch.contiguous_format)  # own buffer: the epilogue may write in place


def _epilogue(kind: GramKind, pass_: GramPass, inner: Tensor, out=None, scale=None, row_sums=None, totals=None):
    aux = _row_factors(kind, inner)
    _native.call("gram_epilogue", inner.device, int(kind), int(pass_), inner, aux, out, scale, row_sums, totals)


# ---- repkern::gram ----------------------------------------------------------------


@torch.library.custom_op("repkern::gram", mutates_args=())
def _gram_op(x: Tensor, kernel: str, scale: Optional[Tensor], center: bool) -> Tensor:
    batch, n, _ = x.shape
    kind = _KIND[kernel]
    if batch == 0:
        return x.new_empty((batch, n, n))
    out_dtype = x.dtype
    if kind == GramKind.LINEAR and center:  # H x xᵀ H = (Hx)(Hx)ᵀ: center x, exactly
        xa = x.to(_native.acc_dtype(x.dtype))
        x = xa - xa.mean(dim=1, keepdim=True)
        center = False
    inner = _inner_products(x)
    # float32/float64: the epilogue overwrites the GEMM output (one n×n buffer).
    out = inner if inner.dtype == out_dtype else torch.empty((batch, n, n), dtype=out_dtype, device=x.device)
    if not center:
        _epilogue(kind, GramPass.WRITE, inner, out, scale)
        return out
    row_sums = torch.zeros((batch, n), dtype=torch.float64, device=x.device)
    _epilogue(kind, GramPass.ROW_SUMS, inner, None, scale, row_sums)
    totals = row_sums.sum(dim=1)
    _epilogue(kind, GramPass.WRITE_CENTERED, inner, out, scale, row_sums, totals)
    return out


@_gram_op.register_fake
def _(x, kernel, scale, center):
    batch, n, _ = x.shape
    return x.new_empty((batch, n, n))


def _gram_setup_context(ctx, inputs, output):
    x, kernel, scale, center = inputs
    ctx.kernel, ctx.center = kernel, center
    # Centered nonlinear Grams recompute K in backward instead of keeping a second n×n matrix.
    keep_k = kernel != "linear" and not center
    ctx.save_for_backward(x, scale, output if keep_k else None)


def _double_center(g: Tensor) -> Tensor:
    return g - g.mean(-1, keepdim=True) - g.mean(-2, keepdim=True) + g.mean((-2, -1), keepdim=True)


def _gram_backward(ctx, grad):
    x, scale, k = ctx.saved_tensors
    acc = _native.acc_dtype(x.dtype)
    xa, g = x.to(acc), grad.to(acc)
    grad_scale = None
    if ctx.kernel == "linear":
        xc = xa - xa.mean(dim=1, keepdim=True) if ctx.center else xa
        gx = (g + g.mT) @ xc
        if ctx.center:
            gx = gx - gx.mean(dim=1, keepdim=True)
        return gx.to(x.dtype), None, None, None
    if ctx.center:
        g = _double_center(g)
        k = torch.ops.repkern.gram(x, ctx.kernel, scale, False)
    ka = k.to(acc)
    if ctx.kernel == "cosine":
        norms = xa.norm(dim=-1, keepdim=True)
        nonzero = norms > 0
        safe = torch.where(nonzero, norms, torch.ones_like(norms))
        u = xa / safe
        gu = (g + g.mT) @ u
        gx = torch.where(nonzero, (gu - (gu * u).sum(-1, keepdim=True) * u) / safe, torch.zeros_like(gu))
    else:  # rbf: K = exp(scale · D), D_ij = ‖x_i − x_j‖²
        finite = torch.isfinite(scale)[:, None, None]  # σ = 0 limit: piecewise constant
        w = torch.where(finite, g * ka * scale[:, None, None], torch.zeros_like(g))  # dL/dD
        ws = w + w.mT
        gx = 2 * (ws.sum(-1, keepdim=True) * xa - ws @ xa)
        if ctx.needs_input_grad[2]:
            d = reference.squared_distances(xa)
            grad_scale = torch.where(finite[:, 0, 0], (g * ka * d).sum((1, 2)), torch.zeros_like(scale))
    return gx.to(x.dtype), None, grad_scale, None


_gram_op.register_autograd(_gram_backward, setup_context=_gram_setup_context)


# ---- repkern::gram_median_sq_dist --------------------------------------------------


@torch.library.custom_op("repkern::gram_median_sq_dist", mutates_args=())
def _median_op(x: Tensor, offdiag: bool) -> tuple[Tensor, Tensor]:
    batch, n, _ = x.shape
    if batch == 0:
        return x.new_empty((0,), dtype=_native.acc_dtype(x.dtype)), x.new_empty((0, 2), dtype=torch.int64)
    d = _inner_products(x)
    _epilogue(GramKind.SQDIST, GramPass.WRITE, d, d)  # in place
    count = n * n
    if offdiag:
        d.diagonal(dim1=1, dim2=2).fill_(math.inf)  # ranks <= n(n−1) are the off-diagonal values
        count = n * (n - 1)
    flat = d.reshape(batch, n * n)
    lo, pos_lo = torch.kthvalue(flat, (count + 1) // 2, dim=1)
    hi, pos_hi = torch.kthvalue(flat, count // 2 + 1, dim=1)
    return (lo + hi) / 2, torch.stack([pos_lo, pos_hi], dim=1)


@_median_op.register_fake
def _(x, offdiag):
    batch = x.shape[0]
    return x.new_empty((batch,), dtype=_native.acc_dtype(x.dtype)), x.new_empty((batch, 2), dtype=torch.int64)


def _median_setup_context(ctx, inputs, output):
    x, _ = inputs
    _, positions = output
    ctx.save_for_backward(x, positions)


def _median_backward(ctx, grad_median, _grad_positions):
    # median = (D[p_lo] + D[p_hi]) / 2 with D_ij = ‖x_i − x_j‖²: dD_ij/dx_i = 2(x_i − x_j) = −dD_ij/dx_j.
    x, positions = ctx.saved_tensors
    acc = _native.acc_dtype(x.dtype)
    xa = x.to(acc)
    n, d = x.shape[1], x.shape[2]
    rows, cols = positions // n, positions % n
    xi = xa.gather(1, rows[..., None].expand(-1, -1, d))
    xj = xa.gather(1, cols[..., None].expand(-1, -1, d))
    contrib = grad_median.to(acc)[:, None, None] * (xi - xj)  # (1/2 per position) · 2(x_i − x_j)
    gx = torch.zeros_like(xa)
    gx = gx.scatter_add(1, rows[..., None].expand(-1, -1, d), contrib)
    gx = gx.scatter_add(1, cols[..., None].expand(-1, -1, d), -contrib)
    return gx.to(x.dtype), None


_median_op.register_autograd(_median_backward, setup_context=_median_setup_context)


# ---- public API --------------------------------------------------------------------


def rbf_scale(x3: Tensor, sigma: Optional[float], threshold: float, median: str) -> Tensor:
    """−1/(2σ²) per batch matrix of x3 (B, n, d), σ explicit or by the median heuristic."""
    if sigma is None:
        med, _ = torch.ops.repkern.gram_median_sq_dist(x3, median == "offdiag")
        sigma_sq = threshold**2 * med
    else:
        sigma_sq = torch.full((x3.shape[0],), sigma**2, dtype=_native.acc_dtype(x3.dtype), device=x3.device)
    return -0.5 / sigma_sq


def gram(
    x: Tensor,
    kernel: str = "linear",
    *,
    sigma: Optional[float] = None,
    threshold: float = 1.0,
    center: bool = False,
    median: str = "full",
) -> Tensor:
    """Gram (kernel) matrices of the rows of ``x``.

    Args:
        x: ``(..., n, d)``: n samples of d features, any number of batch dims;
            float32, float64, float16 or bfloat16, CPU or CUDA.
        kernel: ``"linear"`` (x_i·x_j), ``"cosine"`` (x_i·x_j / ‖x_i‖‖x_j‖; a zero
            row gives 0, including its diagonal) or ``"rbf"`` (exp(−‖x_i − x_j‖²/(2σ²))).
        sigma: RBF bandwidth. ``None``: median heuristic σ² = threshold² · median
            of the squared distances (Kornblith et al.'s ``gram_rbf(x, threshold)``).
        threshold: scales the median heuristic (ignored when ``sigma`` is given).
        center: return H K H, H = I − 11ᵀ/n.
        median: ``"full"``: median over all n² entries, diagonal zeros included
            (Kornblith convention); ``"offdiag"``: over the n(n−1) entries i ≠ j.
            Even counts take the mean of the two middle values (numpy).

    Returns:
        ``(..., n, n)`` in x's dtype, accumulated in float32 (float64 for float64),
        exactly symmetric. If the median is 0 (σ = 0) the RBF Gram is the σ → 0
        limit: 1 where two rows coincide, else 0. NaN in a row of x gives NaN in
        that row and column. Differentiable w.r.t. x, through the median too.
    """
    sigma, threshold = reference.check_gram_args(x, kernel, sigma, threshold, center, median)
    if _native.use_reference():
        return reference.gram(x, kernel, sigma=sigma, threshold=threshold, center=center, median=median)
    *batch_shape, n, d = x.shape
    x3 = x.reshape(-1, n, d)
    scale = rbf_scale(x3, sigma, threshold, median) if kernel == "rbf" else None
    k = torch.ops.repkern.gram(x3, kernel, scale, center)
    return k.reshape(*batch_shape, n, n)
