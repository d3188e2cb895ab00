"""Pure-PyTorch implementations of every repkern op.

Readable first: these are the oracle of the tests and the baseline of the
benchmarks (written the way a careful user would, not as a strawman). Math
conventions: DESIGN.md §4. Results are computed in float32 (float64 for float64
inputs) and returned in the dtypes the fast ops use.
"""

from __future__ import annotations

from typing import Optional

import torch

from repkern import _checks
from repkern._native import acc_dtype

GRAM_KERNELS = ("linear", "cosine", "rbf")
MEDIANS = ("full", "offdiag")


def check_gram_args(x, kernel, sigma, threshold, center, median):
    """Validates the arguments of :func:`gram`; returns (sigma, threshold)."""
    _checks.floating_tensor("x", x, min_dim=2, shape_hint="(..., n, d)")
    n, d = x.shape[-2], x.shape[-1]
    if n < 1:
        raise ValueError(f"x: needs n >= 1 samples (shape (..., n, d)), got shape {tuple(x.shape)}")
    if d < 1:
        raise ValueError(f"x: needs d >= 1 features (shape (..., n, d)), got shape {tuple(x.shape)}")
    _checks.choice("kernel", kernel, GRAM_KERNELS)
    sigma = _checks.positive_number("sigma", sigma, allow_none=True)
    threshold = _checks.positive_number("threshold", threshold)
    _checks.boolean("center", center)
    _checks.choice("median", median, MEDIANS)
    if kernel == "rbf" and sigma is None and median == "offdiag" and n < 2:
        raise ValueError("median='offdiag' needs n >= 2 samples (there is no off-diagonal distance)")
    return sigma, threshold


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    """x (..., n, d) -> (..., n, n) ‖x_i − x_j‖², clamped at 0; the diagonal is
    exactly 0 (NaN for a row holding NaN)."""
    sq = (x * x).sum(-1)
    d = sq[..., :, None] + sq[..., None, :] - 2 * (x @ x.mT)
    d = d.clamp_min(0)
    eye = torch.eye(x.shape[-2], dtype=torch.bool, device=x.device)
    return torch.where(eye, (0 * sq)[..., :, None], d)


def median_squared_distance(d: torch.Tensor, median: str = "full") -> torch.Tensor:
    """numpy-style median over the last two dims of distances d (..., n, n):
    the mean of the two middle values for an even count. 'full' includes the
    diagonal as n exact zeros (Kornblith et al.; also for a row holding NaN);
    'offdiag' uses the n(n−1) entries i ≠ j. NaN sorts last (as in torch.sort)."""
    n = d.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=d.device)
    if median == "offdiag":
        values = d[..., ~eye]
    else:
        values = torch.where(eye, torch.zeros((), dtype=d.dtype, device=d.device), d).reshape(*d.shape[:-2], n * n)
    values, _ = torch.sort(values, dim=-1)
    count = values.shape[-1]
    lo, hi = (count - 1) // 2, count // 2
    return (values[..., lo] + values[..., hi]) / 2


def gram(
    x: torch.Tensor,
    kernel: str = "linear",
    *,
    sigma: Optional[float] = None,
    threshold: float = 1.0,
    center: bool = False,
    median: str = "full",
) -> torch.Tensor:
    """Gram matrix K (..., n, n) of the rows of x (..., n, d).

    linear: K = x xᵀ. cosine: K_ij = x_i·x_j / (‖x_i‖‖x_j‖), 0 for zero rows.
    rbf: K_ij = exp(−‖x_i − x_j‖² / (2σ²)), σ given or σ² = threshold² · median
    of the squared distances. center: H K H with H = I − 11ᵀ/n.
    """
    sigma, threshold = check_gram_args(x, kernel, sigma, threshold, center, median)
    xa = x.to(acc_dtype(x.dtype))
    if kernel == "linear":
        k = xa @ xa.mT
    elif kernel == "cosine":
        norms = xa.norm(dim=-1, keepdim=True)
        u = xa / norms.clamp_min(torch.finfo(xa.dtype).tiny)
        k = u @ u.mT
    else:
        d = squared_distances(xa)
        if sigma is None:
            sigma_sq = threshold**2 * median_squared_distance(d, median)[..., None, None]
        else:
            sigma_sq = torch.full((), sigma**2, dtype=xa.dtype, device=xa.device)
        k = torch.exp(-d / (2 * sigma_sq))
        k = torch.where(d == 0, torch.ones((), dtype=k.dtype, device=k.device), k)  # σ = 0 limit
    if center:
        k = k - k.mean(-1, keepdim=True) - k.mean(-2, keepdim=True) + k.mean((-2, -1), keepdim=True)
    return k.to(x.dtype)


# ---- activation sparsity (DESIGN.md §4) -------------------------------------------------

SPARSITY_MAX_TOP_P = 8  # csrc/common/sparsity_math.h kMaxTopP
TOP_K_TOLERANCE = 1e-9  # k = ceil(p·n − 1e-9): p·n that is an integer up to rounding (0.07·100) gives it


def check_sparsity_args(a, eps, top_p, dense_threshold, density_bins, row_bins, ordered, *, name="a", min_rows=1):
    """Validates the arguments of :func:`sparsity_stats`; returns (eps, top_p tuple, dense_threshold)."""
    import math
    import numbers

    _checks.floating_tensor(name, a, min_dim=1, shape_hint="(..., d)")
    d = a.shape[-1]
    if d < 1:
        raise ValueError(f"{name}: needs d >= 1 features (last dim), got shape {tuple(a.shape)}")
    rows = a.numel() // d
    if rows < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} row(s) (shape (..., d)), got shape {tuple(a.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a real number, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite number >= 0, got {eps}")
    if isinstance(top_p, numbers.Real):
        top_p = (top_p,)
    if not isinstance(top_p, (tuple, list)):
        raise TypeError(f"top_p: expected a sequence of fractions, got {type(top_p).__name__}")
    if len(top_p) > SPARSITY_MAX_TOP_P:
        raise ValueError(f"top_p: at most {SPARSITY_MAX_TOP_P} values, got {len(top_p)}")
    for p in top_p:
        if isinstance(p, bool) or not isinstance(p, numbers.Real):
            raise TypeError(f"top_p: expected real numbers, got {type(p).__name__}")
        if not (0.0 < float(p) <= 1.0):
            raise ValueError(f"top_p: each value must be in (0, 1], got {p}")
    top_p = tuple(float(p) for p in top_p)
    if isinstance(dense_threshold, bool) or not isinstance(dense_threshold, numbers.Real):
        raise TypeError(f"dense_threshold: expected a real number, got {type(dense_threshold).__name__}")
    dense_threshold = float(dense_threshold)
    if not (0.0 <= dense_threshold <= 1.0):
        raise ValueError(f"dense_threshold: expected a frequency in [0, 1], got {dense_threshold}")
    for arg, value in (("density_bins", density_bins), ("row_bins", row_bins)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{arg}: expected an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{arg}: expected >= 1, got {value}")
    _checks.boolean("ordered", ordered)
    return eps, top_p, dense_threshold


def _sparsity_rows(x: torch.Tensor, eps: float, top_p: tuple, ordered: bool) -> dict:
    """Per-row statistics of x (N, d) (float32 or float64) -> dict of (N,) / (N, P) tensors in x.dtype
    (l0 and nonfinite int64). Row sums in float64 (the thresholded L0 compares values with a threshold
    derived from them); ordered statistics from one descending sort of |a|."""
    finite = torch.isfinite(x)
    n = finite.sum(-1)
    absx = torch.where(finite, x.abs(), torch.zeros_like(x))
    a64 = absx.double()
    n64 = n.double()
    l1 = a64.sum(-1)
    l2sq = (a64 * a64).sum(-1)
    sqrt_n = n64.sqrt()
    hoyer = (sqrt_n - l1 / l2sq.sqrt()) / (sqrt_n - 1)
    hoyer = torch.where((n > 1) & (l2sq > 0), hoyer, torch.full_like(hoyer, float("nan")))
    out = {
        "l0": (absx > eps).sum(-1),
        "l1": l1.to(x.dtype),
        "l2": l2sq.sqrt().to(x.dtype),
        "hoyer": hoyer.to(x.dtype),
        "nonfinite": x.shape[-1] - n,
    }
    if not ordered:
        return out
    nan = torch.full_like(l1, float("nan"))
    defined = l1 > 0
    # Thresholded L0: |a| > mean(|a|) + std(|a|), population std, as a fraction of n.
    mean_abs = l1 / n64
    threshold = mean_abs + (l2sq / n64 - mean_abs * mean_abs).clamp_min(0).sqrt()
    above = ((a64 > threshold[:, None]) & finite).sum(-1)
    out["thresholded_l0"] = torch.where(n > 0, above / n64, nan).to(x.dtype)
    # Effective ranks: exp of the entropy of |a|/Σ|a| and of a²/Σa² (0·log 0 = 0).
    for name, weights, total in (("effective_rank_l1", a64, l1), ("effective_rank_l2", a64 * a64, l2sq)):
        p = weights / total[:, None]
        entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)
        out[name] = torch.where(defined, entropy.exp(), nan).to(x.dtype)
    # One sort: |a| descending, non-finite entries (as −1) after the n finite ones.
    desc, _ = torch.sort(torch.where(finite, x.abs(), -torch.ones_like(x)), dim=-1, descending=True)
    j = torch.arange(x.shape[-1], device=x.device)
    desc = torch.where(j < n[:, None], desc, torch.zeros_like(desc)).double()
    # Gini over |a| ascending, i = n − j: 2Σ i·a₍ᵢ₎/(nΣa) − (n+1)/n = Σ (n − 2j − 1)·a_j / (nΣa).
    gini = ((n64[:, None] - 2 * j - 1) * desc).sum(-1) / (n64 * l1)
    out["gini"] = torch.where(defined, gini, nan).to(x.dtype)
    top_l1, top_l2 = [], []
    cum1, cum2 = desc.cumsum(-1), (desc * desc).cumsum(-1)
    for p in top_p:
        k = torch.ceil(p * n64 - TOP_K_TOLERANCE).clamp_min(1).long()
        last = (k - 1).clamp_max(x.shape[-1] - 1)[:, None]
        top_l1.append(torch.where(defined, cum1.gather(1, last)[:, 0] / l1, nan))
        top_l2.append(torch.where(defined, cum2.gather(1, last)[:, 0] / l2sq, nan))
    out["top_p_l1"] = torch.stack(top_l1, -1).to(x.dtype) if top_p else x.new_zeros((x.shape[0], 0))
    out["top_p_l2"] = torch.stack(top_l2, -1).to(x.dtype) if top_p else x.new_zeros((x.shape[0], 0))
    return out


def sparsity_stats(
    a: torch.Tensor,
    *,
    eps: float = 0.0,
    top_p=(0.01, 0.05, 0.1),
    dense_threshold: float = 0.1,
    density_bins: int = 50,
    row_bins: int = 20,
    ordered: bool = True,
    row_batch: int = 4096,
):
    """Sparsity statistics of a (..., d) (rows = samples, last dim = features), plain PyTorch.

    Definitions, degenerate cases and fields: :class:`repkern.sparsity_result.SparsityStats`.
    Per-feature statistics from vectorized reductions over all rows; per-row statistics by batches of
    `row_batch` rows (one torch.sort per batch), computed in float32 (float64 for float64 input) with
    row sums in float64.
    """
    from repkern import sparsity_result as sr

    eps, top_p, dense_threshold = check_sparsity_args(a, eps, top_p, dense_threshold, density_bins, row_bins, ordered)
    d = a.shape[-1]
    x = a.reshape(-1, d).to(acc_dtype(a.dtype))
    rows = x.shape[0]
    state = sparsity_feature_state(x, eps)
    per_row = sparsity_rows(x, eps, top_p, ordered, row_batch=row_batch)
    sums, defined, hists = sr.row_summary_parts(per_row, d, row_bins)
    lead = a.shape[:-1]
    shaped = {k: v.reshape(*lead, *v.shape[1:]) for k, v in per_row.items()}
    return sr.build_stats(state, rows, shaped, sums, defined, hists, stat_dtype=x.dtype, top_p=top_p, eps=eps,
                          dense_threshold=dense_threshold, density_bins=density_bins, row_bins=row_bins)


def sparsity_feature_state(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-feature state (10, d) float64 of x (N, d) (fields: repkern.sparsity_result.FEATURE_FIELDS), by
    vectorized reductions over all rows in x's accumulation precision: over the finite values of each
    column, counts, mean, central moment sums Σδ², Σδ³, Σδ⁴, min, max (±inf when none), Σ|a|."""
    x = x.to(acc_dtype(x.dtype))
    finite = torch.isfinite(x)
    count = finite.sum(0)
    xf = torch.where(finite, x, torch.zeros_like(x))
    mean = torch.where(count > 0, xf.sum(0) / count.clamp_min(1), torch.zeros_like(xf[0]))
    dev = torch.where(finite, x - mean, torch.zeros_like(x))
    dev2 = dev * dev
    big = torch.full_like(x, float("inf"))
    columns = [
        count, (xf.abs() > eps).sum(0), torch.isnan(x).sum(0), mean, dev2.sum(0), (dev2 * dev).sum(0),
        (dev2 * dev2).sum(0), torch.where(finite, x, big).amin(0), torch.where(finite, x, -big).amax(0),
        xf.abs().sum(0),
    ]
    return torch.stack([c.double() for c in columns])


def sparsity_rows(x: torch.Tensor, eps: float, top_p: tuple, ordered: bool, *, row_batch: int = 4096) -> dict:
    """Per-row statistics of x (N, d) by batches of `row_batch` rows (one torch.sort per batch)."""
    x = x.to(acc_dtype(x.dtype))
    parts = [_sparsity_rows(x[i : i + row_batch], eps, top_p, ordered) for i in range(0, x.shape[0], row_batch)]
    if not parts:
        parts = [_sparsity_rows(x[:0], eps, top_p, ordered)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
