"""Gram matrices: ``repkern.gram`` and its custom ops.

Path: the GEMM x xᵀ goes to torch (bmm over row strips of the upper triangle,
float32 accumulation for 16-bit inputs) — on the CPU, float32 rows of at most SMALL_WIDTH features go to a
native register-tiled kernel instead, which writes both triangles (the linear kernel then needs no
epilogue); one native epilogue kernel turns inner products into the Gram matrix
in a single pass (cosine normalization / distances -> exp, exact symmetry, and
centering from a row-sum pass). The RBF median bandwidth comes from a second op
that selects the median of the squared distances.

Custom op (fake impl and autograd registered):
  repkern::gram(x (B,n,d), kernel, scale (B,)?, median, threshold, center)
      -> (K (B,n,n) in x.dtype, scale used (B,), median positions (B,2))
  rbf: scale = −1/(2σ²) per batch matrix, or None for the median heuristic,
  which runs inside the op on the same GEMM (distances in place -> median ->
  exp in place); the gradient flows through the median too.
"""

from __future__ import annotations

import math
import platform
from typing import Optional

import torch
from torch import Tensor

from repkern import _C, _common, _native, _validation, reference
from repkern._constants import GramKind, GramPass

__all__ = ["gram"]

GRAM_EPILOGUE = _native.kernel("gram_epilogue")
MEDIAN_SELECT = _native.kernel("median_select", cuda=False)
INNER_PRODUCTS = _native.kernel("inner_products", cuda=False)
XTX_SQ_NORM = _native.kernel("xtx_sq_norm", cuda=False)
# Where the native inner-products kernel replaces the GEMM path on the CPU: float32 rows of at most
# SMALL_WIDTH features, at the CPU levels where it wins (docs/benchmarks.md: 16 × 512 × d, d = 64 and 128,
# 1.0–1.4× of the bmm x xᵀ at the avx2 and avx512 levels; the SSE copy, 0.65×, loses to MKL's GEMM).
# The same levels run xtx_sq_norm's register tiles, on matrices of at least XTX_MIN_WIDTH columns: below,
# the padding of the last strip (8–32 columns by level) is a large share of its work, and the GEMM is cheap.
SMALL_WIDTH = 128
INNER_PRODUCTS_ISAS = ("avx2", "avx512", "native") if platform.machine() in ("x86_64", "AMD64") else ()
XTX_MIN_WIDTH = 64


KINDS = {"linear": GramKind.LINEAR, "cosine": GramKind.COSINE, "rbf": GramKind.RBF}


EPILOGUE_TILE = 64  # a multiple of both epilogue tile edges (CPU 64, CUDA 32)


def _strip_rows(n: int) -> int:
    """Rows per GEMM strip: about 8 strips, a multiple of the epilogue tile."""
    rows = max(256, -(-n // 8))
    return -(-rows // EPILOGUE_TILE) * EPILOGUE_TILE


def _gemm_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out (B, r, c) = a (B, r, d) · b (B, c, d)ᵀ, accumulated in out.dtype."""
    if a.dtype == out.dtype:
        torch.bmm(a, b.mT, out=out)
        return
    try:  # 16-bit GEMM with float32 output (CUDA, recent torch)
        out.copy_(torch.bmm(a, b.mT, out_dtype=out.dtype))
    except (TypeError, RuntimeError, NotImplementedError):
        torch.bmm(a.to(out.dtype), b.mT.to(out.dtype), out=out)


def native_inner_products(x: Tensor) -> bool:
    """Whether inner_products(x) takes the native kernel, which fills both triangles."""
    return (_native.backend_for(x.device) == "cpu" and _common.acc_dtype(x.dtype) == torch.float32
            and x.shape[-1] <= SMALL_WIDTH and _C.cpu_isa() in INNER_PRODUCTS_ISAS)


def inner_products(x: Tensor) -> Tensor:
    """x (B, n, d) -> x xᵀ (B, n, n) in the accumulation dtype, UPPER PART ONLY:
    row strips [i, i+s) × columns [i, n) (a SYRK by GEMMs: about half the FLOPs).
    Every epilogue tile with ti <= tj lies inside a strip; the rest of the buffer
    is uninitialized and never read. Where native_inner_products(x): the native
    kernel's full, exactly symmetric x xᵀ."""
    acc = _common.acc_dtype(x.dtype)
    if not x.is_cuda:
        x = x.to(acc)  # the CPU has no 16-bit GEMM with float32 output
    batch, n, _ = x.shape
    inner = torch.empty((batch, n, n), dtype=acc, device=x.device)
    if native_inner_products(x):
        _native.call(INNER_PRODUCTS, x.device, x.contiguous(), inner)
        return inner
    rows = _strip_rows(n)
    for i in range(0, n, rows):
        _gemm_into(inner[:, i : i + rows, i:], x[:, i : i + rows], x[:, i:])
    return inner


def native_xtx_sq_norm(x: Tensor) -> bool:
    """Whether xtx_sq_norm(x) takes the native kernel."""
    return (_native.backend_for(x.device) == "cpu" and x.dtype == torch.float32 and x.shape[-1] >= XTX_MIN_WIDTH
            and _C.cpu_isa() in INNER_PRODUCTS_ISAS)


@torch.library.custom_op("repkern::xtx_sq_norm", mutates_args=())
def xtx_sq_norm(x: Tensor) -> Tensor:
    """‖xᵀx‖²_F (B,) float64 of x (B, n, d) float32/float64 (the products in x.dtype, their squares summed
    in float64). Where native_xtx_sq_norm(x): one native pass over the upper block triangle of xᵀx (half the
    FLOPs of the GEMM, no d×d product stored); else the GEMM. The choice is made inside the op, at run
    time (the CPU level is not traceable)."""
    if not native_xtx_sq_norm(x):
        return _common.square_sum64(x.mT @ x, (-2, -1))
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    _native.call(XTX_SQ_NORM, x.device, x.contiguous(), out)
    return out


@xtx_sq_norm.register_fake
def _(x):
    return x.new_empty((x.shape[0],), dtype=torch.float64)


def _xtx_sq_norm_backward(ctx, grad):
    (x,) = ctx.saved_tensors  # d‖xᵀx‖²/dx = 4 x (xᵀx)
    return (4 * grad).to(x.dtype)[:, None, None] * (x @ (x.mT @ x))


xtx_sq_norm.register_autograd(_xtx_sq_norm_backward,
                              setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[0]))


# ---- exact rescaling and non-finite rows ------------------------------------------------------


def pow2_factors(exponent: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """2^exponent (float64 integers) as two factors in `dtype` whose product it is: each factor is a power
    of two representable in dtype (float32 needs two for 2^149, the largest scale-up of a subnormal), so
    multiplying by one, then the other, is exact unless the result itself overflows or underflows."""
    half = torch.trunc(exponent / 2)
    return torch.exp2(half).to(dtype), torch.exp2(exponent - half).to(dtype)


def pow2_exponent(peak: Tensor) -> Tensor:
    """−round(log2(peak)) (float64) where peak is finite and > 0, else 0: the power of two that brings
    `peak` to [2^−½, 2^½]."""
    peak = peak.double()
    ok = torch.isfinite(peak) & (peak > 0)
    return torch.where(ok, -torch.log2(torch.where(ok, peak, torch.ones_like(peak))).round(), torch.zeros_like(peak))


def unit_rows(x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """x (..., n, d) with each finite nonzero row multiplied by the power of two that brings its largest
    |entry| near 1 (exact; cosine similarity does not see it), and the two factors (..., n, 1) used: float32
    products of the rows can then neither overflow (|x| ≈ 1e20) nor underflow (subnormal rows)."""
    with torch.no_grad():
        exponent = pow2_exponent(x.detach().abs().amax(-1, keepdim=True))
    f1, f2 = pow2_factors(exponent, x.dtype)
    return x * f1 * f2, (f1, f2)


def nan_rows(x: Tensor) -> Tensor:
    """x (..., n, d) with every row that holds NaN or ±Inf made all NaN: its Gram row and column are then NaN
    whatever the kernel (an Inf row would give ±inf, or a cosine diagonal of 1)."""
    return x.masked_fill(~torch.isfinite(x).all(-1, keepdim=True), math.nan)


def row_factors(kind: GramKind, inner: Tensor) -> Optional[Tensor]:
    """(B, n) per-row factor of the epilogue (csrc/common/gram_math.h): g_ii for
    distances, 1/‖x_i‖ for cosine (0 for a zero row, NaN stays NaN)."""
    if kind in (GramKind.LINEAR, GramKind.RBF_FROM_SQDIST):
        return None
    diag = inner.diagonal(dim1=1, dim2=2)
    if kind == GramKind.COSINE:
        return torch.where(diag > 0, diag.rsqrt(), torch.where(diag == 0, torch.zeros_like(diag), diag))
    return diag.clone(memory_format=torch.contiguous_format)  # own buffer: the epilogue may write in place


def epilogue(kind: GramKind, pass_: GramPass, inner: Tensor, out=None, scale=None, row_sums=None, totals=None):
    aux = row_factors(kind, inner)
    _native.call(GRAM_EPILOGUE, inner.device, int(kind), int(pass_), inner, aux, out, scale, row_sums, totals)


# ---- median bandwidth ------------------------------------------------------------


def upper_to_flat(p: Tensor, n: int) -> Tensor:
    """Index p into the row-major strict upper triangle of n×n -> flat index i·n + j."""
    pf = p.double()
    b = 2 * n - 1
    i = torch.floor((b - torch.sqrt((b * b - 8 * pf).clamp_min(0))) / 2).long()

    def start(r):  # packed index of (r, r + 1)
        return r * (n - 1) - r * (r - 1) // 2

    i = torch.where(start(i) > p, i - 1, i)
    i = torch.where(start(i + 1) <= p, i + 1, i)
    return i * n + (p - start(i) + i + 1)


def _middle_ranks(n: int, offdiag: bool) -> list[Optional[int]]:
    """The two middle ranks of the numpy median over the full ('full': n², diagonal zeros included) or
    off-diagonal multiset of n×n distances, each as its 1-based rank k among the n(n−1)/2 upper-triangle
    values (each off-diagonal value appears twice), or None for a diagonal zero."""
    total, zeros = (n * (n - 1), 0) if offdiag else (n * n, n)
    return [None if rank <= zeros else (rank - zeros + 1) // 2 for rank in ((total + 1) // 2, total // 2 + 1)]


def _middle_values(ranks: list[Optional[int]], selected: dict, zero: Tensor) -> tuple[Tensor, Tensor]:
    """(mean of the two middle values (B,), their flat positions (B, 2)) from selected: k -> (value (B,),
    flat position (B,)); a diagonal zero is value 0 at position 0."""
    picked = [selected[k] if k is not None else (zero, torch.zeros_like(zero, dtype=torch.int64)) for k in ranks]
    return (picked[0][0] + picked[1][0]) / 2, torch.stack([picked[0][1], picked[1][1]], dim=1)


def median_sq_dist(d: Tensor, offdiag: bool) -> tuple[Tensor, Tensor]:
    """Median of the squared distances d (B, n, n) (exactly symmetric; only the strict upper triangle is
    read), numpy-style: the mean of the two middle values for an even count. Over all n² entries the
    diagonal counts as n exact zeros; NaN sorts above every number (torch's order). Each off-diagonal
    value appears twice, so the order statistics are taken over the n(n−1)/2 upper-triangle values.
    Returns (median (B,), flat positions i·n + j (B, 2) of the two middle entries, the lowest i·n + j
    among equal values; a diagonal position stands for a zero).

    CPU: a native radix select over the triangle in place. CUDA: the triangle packed, then
    torch.kthvalue (a radix select on the GPU)."""
    batch, n, _ = d.shape
    if _native.backend_for(d.device) != "cpu":
        values = d.new_empty((batch, n * (n - 1) // 2))
        for i in range(n - 1):  # row slices: a boolean-mask gather of all n² entries costs as much as the GEMM
            start = i * (n - 1) - i * (i - 1) // 2
            values[:, start : start + n - 1 - i] = d[:, i, i + 1 :]
        return median_from_upper(values, n, offdiag)
    ranks = _middle_ranks(n, offdiag)
    wanted = sorted({k for k in ranks if k is not None})
    selected = {}
    if wanted:
        values = d.new_empty((batch, len(wanted)))
        positions = torch.empty((batch, len(wanted)), dtype=torch.int64, device=d.device)
        _native.call(MEDIAN_SELECT, d.device, d, wanted, values, positions)
        selected = {k: (values[:, c], positions[:, c]) for c, k in enumerate(wanted)}
    return _middle_values(ranks, selected, d.new_zeros(batch))


def _next_order_statistic(values: Tensor, value: Tensor, k: int) -> Tensor:
    """The k-th smallest of values (B, N) given the (k−1)-th, value (B,): the same value when at least
    k entries are <= it (ties), else the smallest entry above it, NaN when only NaN is left (torch's
    order). A few streaming passes instead of a second kthvalue."""
    tie = torch.count_nonzero(values <= value[:, None], dim=1) >= k
    above = values > value[:, None]
    nearest = torch.where(above, values, math.inf).amin(1)
    return torch.where(tie, value, torch.where(above.any(1), nearest, torch.full_like(value, math.nan)))


def _lowest_index_of(values: Tensor, value: Tensor) -> Tensor:
    """The lowest index (B,) of values (B, N) that equals value (B,) (NaN equal to NaN, −0 to +0)."""
    equal = (values == value[:, None]) | (values.isnan() & value.isnan()[:, None])
    return equal.to(torch.uint8).argmax(1)


def median_from_upper(values: Tensor, n: int, offdiag: bool) -> tuple[Tensor, Tensor]:
    """:func:`median_sq_dist` from the strict upper triangle of d packed row-major
    into values (B, n(n−1)/2) (packed order is flat order, so the lowest packed index
    among equal values is the lowest flat one)."""
    ranks = _middle_ranks(n, offdiag)
    selected = {}  # k -> (value, flat position)
    for k in sorted({k for k in ranks if k is not None}):
        if k - 1 in selected:  # the two middle ranks are neighbours
            value = _next_order_statistic(values, selected[k - 1][0], k)
        else:
            value = torch.kthvalue(values, k, dim=1).values
        selected[k] = (value, upper_to_flat(_lowest_index_of(values, value), n))
    return _middle_values(ranks, selected, values.new_zeros(values.shape[0]))


def median_backward(x: Tensor, positions: Tensor, grad_median: Tensor) -> Tensor:
    """Gradient w.r.t. x (B, n, d) of median = (D[p0] + D[p1]) / 2, D_ij = ‖x_i − x_j‖²:
    dD_ij/dx_i = 2(x_i − x_j) = −dD_ij/dx_j."""
    n, d = x.shape[1], x.shape[2]
    rows, cols = positions // n, positions % n
    xi = x.gather(1, rows[..., None].expand(-1, -1, d))
    xj = x.gather(1, cols[..., None].expand(-1, -1, d))
    contrib = grad_median[:, None, None] * (xi - xj)  # (1/2 per position) · 2(x_i − x_j)
    gx = torch.zeros_like(x).scatter_add(1, rows[..., None].expand(-1, -1, d), contrib)
    return gx.scatter_add(1, cols[..., None].expand(-1, -1, d), -contrib)


# ---- repkern::gram ----------------------------------------------------------------


def _rows_inner_products(x: Tensor, kind: GramKind, center: bool) -> Tensor:
    """Upper inner products (inner_products) of the rows the epilogue needs: cosine rows rescaled
    (unit_rows), linear rows centered when `center` (H x xᵀ H = (Hx)(Hx)ᵀ, exactly)."""
    if kind == GramKind.COSINE:
        x, _ = unit_rows(x)
    if kind == GramKind.LINEAR and center:
        xa = x.to(_common.acc_dtype(x.dtype))
        return inner_products(xa - xa.mean(dim=1, keepdim=True))
    return inner_products(x)


@torch.library.custom_op("repkern::gram", mutates_args=())
def _gram_op(
    x: Tensor, kernel: str, scale: Optional[Tensor], median: str, threshold: float, center: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, n, d) -> (K (B, n, n) in x.dtype, scale used (B,), median positions (B, 2)).
    rbf: scale = −1/(2σ²) given, or (scale None) σ² = threshold² · median ('full'/'offdiag')."""
    batch, n, _ = x.shape
    acc = _common.acc_dtype(x.dtype)
    positions = torch.full((batch, 2), -1, dtype=torch.int64, device=x.device)
    if batch == 0:
        return x.new_empty((batch, n, n)), x.new_zeros((batch,), dtype=acc), positions
    kind = KINDS[kernel]
    on_cpu = x.device.type == "cpu"
    if not on_cpu:  # no host sync on a GPU, where the NaN-row pass is a cheap elementwise step
        x = nan_rows(x)
    inner = _rows_inner_products(x, kind, center)
    # On the CPU a row with NaN/Inf has a non-finite ‖x_i‖² on the diagonal: only then pay the pass that
    # makes such rows all NaN (a finite row whose ‖x_i‖² overflows is recomputed unchanged).
    if on_cpu and not bool(torch.isfinite(inner.diagonal(dim1=1, dim2=2)).all()):
        inner = _rows_inner_products(nan_rows(x), kind, center)
    if kind == GramKind.LINEAR and center:  # centered through x (_rows_inner_products)
        center = False
    if kind == GramKind.RBF and scale is None:
        epilogue(GramKind.SQDIST, GramPass.WRITE, inner, inner)  # distances, in place
        med, positions = median_sq_dist(inner, median == "offdiag")
        scale = -0.5 / (threshold**2 * med)
        kind = GramKind.RBF_FROM_SQDIST
    # float32/float64: the epilogue overwrites its input (one n×n buffer).
    out = inner if inner.dtype == x.dtype else torch.empty((batch, n, n), dtype=x.dtype, device=x.device)
    if center:
        row_sums = torch.zeros((batch, n), dtype=torch.float64, device=x.device)
        epilogue(kind, GramPass.ROW_SUMS, inner, None, scale, row_sums)
        epilogue(kind, GramPass.WRITE_CENTERED, inner, out, scale, row_sums, row_sums.sum(dim=1))
    elif not (kind == GramKind.LINEAR and out is inner and native_inner_products(x)):  # else: done
        epilogue(kind, GramPass.WRITE, inner, out, scale)
    scale_used = scale.clone() if scale is not None else x.new_zeros((batch,), dtype=acc)
    return out, scale_used, positions


@_gram_op.register_fake
def _(x, kernel, scale, median, threshold, center):
    batch, n, _ = x.shape
    acc = _common.acc_dtype(x.dtype)
    return x.new_empty((batch, n, n)), x.new_empty((batch,), dtype=acc), x.new_empty((batch, 2), dtype=torch.int64)


def _gram_setup_context(ctx, inputs, output):
    x, kernel, scale, median, threshold, center = inputs
    k, scale_used, positions = output
    ctx.kernel, ctx.center, ctx.threshold = kernel, center, threshold
    ctx.from_median = kernel == "rbf" and scale is None
    ctx.mark_non_differentiable(scale_used, positions)
    # Centered nonlinear Grams recompute K in backward instead of keeping a second n×n matrix.
    keep_k = kernel != "linear" and not center
    ctx.save_for_backward(x, scale_used, positions, k if keep_k else None)


def _double_center(g: Tensor) -> Tensor:
    return g - g.mean(-1, keepdim=True) - g.mean(-2, keepdim=True) + g.mean((-2, -1), keepdim=True)


def _gram_backward(ctx, grad, _grad_scale_used, _grad_positions):
    x, scale, positions, k = ctx.saved_tensors
    acc = _common.acc_dtype(x.dtype)
    xa, g = x.to(acc), grad.to(acc)
    if ctx.kernel == "linear":
        xc = xa - xa.mean(dim=1, keepdim=True) if ctx.center else xa
        gx = (g + g.mT) @ xc
        if ctx.center:
            gx = gx - gx.mean(dim=1, keepdim=True)
        return gx.to(x.dtype), None, None, None, None, None
    if ctx.center:
        g = _double_center(g)
        k = torch.ops.repkern.gram(x, ctx.kernel, scale if ctx.kernel == "rbf" else None, "full", 1.0, False)[0]
    ka = k.to(acc)
    if ctx.kernel == "cosine":  # on the rows rescaled as in the forward (xs = x·f): dL/dx = f·dL/dxs
        xs, (f1, f2) = unit_rows(xa)
        norms = xs.norm(dim=-1, keepdim=True)
        nonzero = norms > 0
        safe = torch.where(nonzero, norms, torch.ones_like(norms))
        u = xs / safe
        gu = (g + g.mT) @ u
        gx = torch.where(nonzero, (gu - (gu * u).sum(-1, keepdim=True) * u) / safe, torch.zeros_like(gu))
        return (gx * f1 * f2).to(x.dtype), None, None, None, None, None
    # rbf: K = exp(scale · D), D_ij = ‖x_i − x_j‖²
    finite = torch.isfinite(scale)  # σ = 0 limit: piecewise constant, zero gradient
    w = torch.where(finite[:, None, None], g * ka * scale[:, None, None], torch.zeros_like(g))  # dL/dD
    ws = w + w.mT
    gx = 2 * (ws.sum(-1, keepdim=True) * xa - ws @ xa)
    grad_scale = None
    if ctx.from_median or ctx.needs_input_grad[2]:
        d = reference.squared_distances(xa)
        grad_scale = torch.where(finite, (g * ka * d).sum((1, 2)), torch.zeros_like(scale))
    if ctx.from_median:  # scale = −1/(2 t² m): dscale/dm = 2 t² scale²
        grad_median = grad_scale * 2 * ctx.threshold**2 * scale * scale
        gx = gx + median_backward(xa, positions, grad_median)
        grad_scale = None
    return gx.to(x.dtype), None, grad_scale, None, None, None


_gram_op.register_autograd(_gram_backward, setup_context=_gram_setup_context)


# ---- public API --------------------------------------------------------------------


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
            row gives 0, including its diagonal; each row is first rescaled by a power of
            two, exactly, so rows at 1e20 or subnormal ones do not overflow or underflow)
            or ``"rbf"`` (exp(−‖x_i − x_j‖²/(2σ²))).
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
        limit: 1 where two rows coincide, else 0. NaN or ±Inf in a row of x gives
        NaN in that row and column, diagonal included, for every kernel (with
        ``center=True`` every entry is NaN: centering mixes all rows). Differentiable
        w.r.t. x, through the median too.
    """
    sigma, threshold = _validation.check_gram_args(x, kernel, sigma, threshold, center, median)
    if _native.use_reference():
        return reference.gram(x, kernel, sigma=sigma, threshold=threshold, center=center, median=median)
    *batch_shape, n, d = x.shape
    x3 = x.reshape(-1, n, d)
    scale = None
    if kernel == "rbf" and sigma is not None:
        acc = _common.acc_dtype(x.dtype)
        scale = torch.full((x3.shape[0],), _common.rbf_scale(sigma, acc), dtype=acc, device=x.device)
    k, _, _ = torch.ops.repkern.gram(x3, kernel, scale, median, threshold, center)
    return k.reshape(*batch_shape, n, n)
