"""Gram matrices in plain PyTorch: :func:`gram` and the RBF median heuristic."""

from __future__ import annotations

from typing import Optional

import torch

from repkern._common import acc_dtype
from repkern._validation import check_gram_args


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
    A row holding NaN or ±Inf is taken as all NaN: NaN in its row and column of K.
    Cosine divides each row by its largest absolute entry first, so that ‖x_i‖ neither
    overflows nor underflows.
    """
    sigma, threshold = check_gram_args(x, kernel, sigma, threshold, center, median)
    xa = x.to(acc_dtype(x.dtype))
    xa = xa.masked_fill(~torch.isfinite(xa).all(-1, keepdim=True), torch.nan)
    if kernel == "linear":
        k = xa @ xa.mT
    elif kernel == "cosine":
        tiny = torch.finfo(xa.dtype).tiny
        xa = xa / xa.abs().amax(-1, keepdim=True).clamp_min(tiny)  # entries <= 1: the norm cannot overflow
        norms = xa.norm(dim=-1, keepdim=True)
        u = xa / norms.clamp_min(tiny)
        k = u @ u.mT
    else:
        d = squared_distances(xa)
        if sigma is None:
            sigma_sq = threshold**2 * median_squared_distance(d, median)[..., None, None]
        else:
            sigma_sq = torch.full((), sigma * sigma, dtype=xa.dtype, device=xa.device)  # inf/0 past the range
        k = torch.exp(-d / (2 * sigma_sq))
        k = torch.where(d == 0, torch.ones((), dtype=k.dtype, device=k.device), k)  # σ = 0 limit
    if center:
        k = k - k.mean(-1, keepdim=True) - k.mean(-2, keepdim=True) + k.mean((-2, -1), keepdim=True)
    return k.to(x.dtype)

