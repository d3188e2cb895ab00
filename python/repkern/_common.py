"""Helpers the reference and the fast path both need: the result-dtype rules, the zero-variance and
non-finite tests of the CKA family, cka_test's resampling plan, BatchTopK's code count and the JumpReLU
straight-through window. Plain PyTorch; imports no other repkern module."""

from __future__ import annotations

import functools
import math

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise (the native kernels' rule)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of scalar/statistic results: float64 for float64 inputs, float32 otherwise."""
    return acc_dtype(dtype)


def rbf_scale(sigma: float, dtype: torch.dtype) -> float:
    """The RBF exponent factor −1/(2σ²) of a bandwidth σ > 0 as a number the kernels take in `dtype`, with
    the limits where σ² leaves the float range (Python's ``**`` would raise, ``torch.full`` refuse the
    value): −inf when σ² underflows or −1/(2σ²) overflows `dtype` (the σ → 0 limit: K = 1 where two rows
    coincide, else 0, as for a zero median), −0.0 when σ² overflows (the σ → ∞ limit: K = 1)."""
    square = sigma * sigma  # inf or 0 past the float range, never an exception
    if square == 0:
        return -math.inf
    scale = -0.5 / square
    return -math.inf if scale < -torch.finfo(dtype).max else scale


def zero_variance_tolerance(dtype: torch.dtype) -> float:
    """A self-HSIC numerator ‖H K H‖²_F (or its unbiased twin ‖Ũ_K‖²_F) at most this
    times Σ K∘K is rounding noise, and the representation counts as constant. Two
    floors: the Gram entries' own rounding (relative eps each: noise energy
    ~eps² Σ K∘K), and the centering, which cancels terms of size Σ K∘K in float64
    (~n·2⁻⁵³ relative at worst for n up to ~10⁵: 2⁻³⁶ ≈ 1.5e-11)."""
    return max(16 * torch.finfo(acc_dtype(dtype)).eps ** 2, 2.0**-36)


SQUARE_BLOCK = 1 << 16  # elements per matrix converted at a time by square_sum64 (512 KiB of float64)


def square_sum64(t: torch.Tensor, dim) -> torch.Tensor:
    """Σ t² over dim = -1 or (-2, -1) of t (..., r, c), in float64 from exact float64 squares, converted by
    blocks of rows that stay in cache: t.square().sum(dim, dtype=torch.float64) rounds the squares to t's
    dtype and writes all of them out as float64, 5x slower on the CPU (4096 x 768 float32: 4.0 ms against
    0.75). Differentiable; one expression under torch.compile, which fuses it."""
    if torch.compiler.is_compiling() or t.shape[-2] * t.shape[-1] <= SQUARE_BLOCK:
        return t.to(torch.float64, copy=True).square_().sum(dim)
    rows = max(1, SQUARE_BLOCK // max(1, t.shape[-1]))
    parts = [block.to(torch.float64, copy=True).square_().sum(dim) for block in t.split(rows, -2)]
    return torch.cat(parts, -1) if dim == -1 else torch.stack(parts).sum(0)


def constant_rows(x: torch.Tensor) -> torch.Tensor:
    """(...,) True where all n rows of x (..., n, d) are identical (a zero-variance
    representation; exact comparison, NaN rows are not identical)."""
    return (x == x[..., :1, :]).all(-1).all(-1)


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """(...,) True where t (..., a, b) holds no NaN or ±Inf."""
    return torch.isfinite(t).all(-1).all(-1)


MEDIAN_SHIFT_ROWS = 1024  # rows sampled for finite_row_median: central enough, and O(d) work for any n


def finite_row_median(x: torch.Tensor) -> torch.Tensor:
    """(d,) per column of x (n, d), the (lower) median of the finite rows among every ⌈n/1024⌉-th
    row (0 if none): a shift for distance computations. It is a value of the data in each column,
    so data on a grid (integers, float32 values in float64) stay on it after the shift and exactly
    equal distances stay equal; and it is central, so it removes a common offset as the mean
    would, without being pulled away by outlying rows."""
    if x.shape[0] == 0:
        return x.new_zeros(x.shape[1])
    sample = x[:: -(-x.shape[0] // MEDIAN_SHIFT_ROWS)]
    finite = torch.isfinite(sample).all(1, keepdim=True)
    return sample.masked_fill(~finite, math.nan).nanmedian(0).values.nan_to_num(0.0)


def replicate_indices(n: int, n_permutations: int, n_bootstrap: int, seed: int, device=None):
    """The resampling plan of :func:`cka_test`, drawn on the CPU from ``torch.Generator().manual_seed(seed)``
    (the same on every device): (n_permutations, n) permutations (argsort of uniforms), then
    (n_bootstrap, n) bootstrap indices drawn with replacement. int64, on `device`."""
    generator = torch.Generator().manual_seed(seed)
    perms = torch.argsort(torch.rand(n_permutations, n, generator=generator), dim=1)
    boots = torch.randint(0, n, (n_bootstrap, n), generator=generator)
    return perms.to(device), boots.to(device)


def batch_topk_count(k: float, n_rows: int) -> int:
    """Codes kept by BatchTopK over n_rows rows: int(k · n_rows) (SAELens)."""
    return int(k * n_rows)


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The straight-through window of JumpReLU's threshold gradient: 1 on (−½, ½), 0 elsewhere."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)



def outside_inference_mode(method):
    """Runs an accumulator method with inference mode off, so the state it creates or updates holds normal
    tensors: an accumulator first fed under ``torch.inference_mode()`` can still be updated, merged and
    restored outside it (inference tensors cannot be modified in place there). Inputs made under inference
    mode are fine: ops outside it read them."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False):
            return method(*args, **kwargs)

    return wrapper
