"""RDMs and RSA in plain PyTorch: the full n×n dissimilarity matrix, its upper triangle, ranks from
torch.unique (float64)."""

from __future__ import annotations

import torch

from repkern._common import stat_dtype
from repkern._validation.rsa import check_rdm_args, check_rsa_args


def _dissimilarities(x: torch.Tensor, metric: str) -> torch.Tensor:
    """Condensed RDM (n(n−1)/2,) in float64: entries (i, j), i < j, row-major."""
    n, d = x.shape
    x64 = x.double()
    if metric == "correlation":
        full = 1 - torch.corrcoef(x64)  # Pearson r between rows
        i, j = torch.triu_indices(n, n, 1, device=x.device)
        return full[i, j]
    # row by row, from the differences themselves: ‖x_i − x_j‖² / d for j > i; NaN in every pair of a pattern
    # holding NaN/Inf
    x64 = torch.where(torch.isfinite(x64).all(1, keepdim=True), x64, torch.nan)
    return torch.cat([(x64[i] - x64[i + 1 :]).square().sum(-1) / d for i in range(n - 1)])


def rdm(x: torch.Tensor, metric: str = "correlation") -> torch.Tensor:
    """Condensed RDM of the rows of x (n, d) -> (n(n−1)/2,): 1 − Pearson r, or squared distance / d."""
    check_rdm_args(x, metric)
    return _dissimilarities(x, metric).to(stat_dtype(x.dtype))


def _average_ranks(v: torch.Tensor) -> torch.Tensor:
    """1-based ranks; tied values get the mean of the ranks they span."""
    _, inverse, counts = torch.unique(v, sorted=True, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    return (first + (counts + 1) / 2).double()[inverse]


def rsa(x: torch.Tensor, y: torch.Tensor, *, rdm: str = "correlation", compare: str = "spearman") -> torch.Tensor:
    """Correlation (Spearman with average ranks, or Pearson) of the condensed RDMs of x (n, d1), y (n, d2) -> ()."""
    check_rsa_args(x, y, rdm, compare)
    dx, dy = _dissimilarities(x, rdm), _dissimilarities(y, rdm)
    if not (bool(torch.isfinite(dx).all()) and bool(torch.isfinite(dy).all())):
        return torch.full((), torch.nan, dtype=stat_dtype(x.dtype), device=x.device)
    if compare == "spearman":
        dx, dy = _average_ranks(dx), _average_ranks(dy)
    return torch.corrcoef(torch.stack([dx, dy]))[0, 1].to(stat_dtype(x.dtype))
