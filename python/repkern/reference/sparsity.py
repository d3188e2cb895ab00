"""Activation sparsity statistics in plain PyTorch."""

from __future__ import annotations

import torch

from repkern.results import sparsity as sparsity_results
from repkern._common import acc_dtype
from repkern._constants import SPARSITY_TOP_K_TOLERANCE
from repkern._validation import check_sparsity_args


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
        k = torch.ceil(p * n64 - SPARSITY_TOP_K_TOLERANCE).clamp_min(1).long()
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

    Definitions, degenerate cases and fields: :class:`repkern.SparsityStats`.
    Per-feature statistics from vectorized reductions over all rows; per-row statistics by batches of
    `row_batch` rows (one torch.sort per batch), computed in float32 (float64 for float64 input) with
    row sums in float64.
    """
    eps, top_p, dense_threshold = check_sparsity_args(a, eps, top_p, dense_threshold, density_bins, row_bins, ordered)
    d = a.shape[-1]
    x = a.reshape(-1, d).to(acc_dtype(a.dtype))
    rows = x.shape[0]
    state = sparsity_feature_state(x, eps)
    per_row = sparsity_rows(x, eps, top_p, ordered, row_batch=row_batch)
    sums, defined, hists = sparsity_results.row_summary_parts(per_row, d, row_bins)
    lead = a.shape[:-1]
    shaped = {k: v.reshape(tuple(lead) + tuple(v.shape[1:])) for k, v in per_row.items()}  # a (d,) input: 0-d
    return sparsity_results.build_stats(state, rows, shaped, sums, defined, hists, stat_dtype=x.dtype, top_p=top_p, eps=eps,
                          dense_threshold=dense_threshold, density_bins=density_bins, row_bins=row_bins)


def sparsity_feature_state(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-feature state (10, d) float64 of x (N, d) (fields: SPARSITY_FEATURE_FIELDS), by
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

