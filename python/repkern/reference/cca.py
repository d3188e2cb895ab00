"""CCA, SVCCA and PWCCA in plain PyTorch, from the SVD of the centered data: the canonical correlations
are the cosines of the principal angles between the column spaces of x̄ and ȳ, i.e. the singular values
of Uxᵀ Uy for orthonormal bases Ux, Uy of those spaces (float64)."""

from __future__ import annotations

from typing import Optional

import torch

from repkern._common import all_finite, constant_rows, stat_dtype
from repkern._validation.cca import check_cca_args, check_svcca_args

RANK_RHO = 2.0**-46  # a direction is null when its squared singular value <= d·RANK_RHO·s_max²


def _basis(x: torch.Tensor):
    """(orthonormal basis (n, r) of the centered columns of x, their singular values (r,) descending,
    the centered x (n, d)); r = numerical rank, 0 for a constant x."""
    x64 = x.double()
    xc = x64 - x64.mean(0)
    u, s, _ = torch.linalg.svd(xc, full_matrices=False)
    if bool(constant_rows(x)) or not bool(s[0] > 0):
        return u[:, :0], s[:0], xc
    rank = int((s.square() > x.shape[1] * RANK_RHO * s[0].square()).sum())
    return u[:, :rank], s[:rank], xc


def _nan(x, shape=()):
    return torch.full(shape, torch.nan, dtype=stat_dtype(x.dtype), device=x.device)


def _finite(x, y) -> bool:
    return bool(all_finite(x)) and bool(all_finite(y))


def cca(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Canonical correlations of x (n, d1), y (n, d2) -> (min(rank x̄, rank ȳ),), descending."""
    check_cca_args(x, y)
    if not _finite(x, y):
        return _nan(x, (min(x.shape[1], y.shape[1]),))
    ux, _, _ = _basis(x)
    uy, _, _ = _basis(y)
    k = min(ux.shape[1], uy.shape[1])
    if k == 0:
        return _nan(x, (0,))
    return torch.linalg.svdvals(ux.T @ uy)[:k].clamp(0, 1).to(stat_dtype(x.dtype))


def _kept(s: torch.Tensor, dims: Optional[int], keep: float) -> int:
    """Leading SVD directions kept: `dims` (at most the rank), else the fewest explaining `keep` of the variance."""
    if s.numel() == 0:
        return 0
    if dims is not None:
        return min(dims, s.numel())
    var = s.square()
    explained = torch.cumsum(var, 0) / var.sum()
    return min(int((explained < keep).sum()) + 1, s.numel())


def svcca(x: torch.Tensor, y: torch.Tensor, *, dims=None, keep: float = 0.99) -> torch.Tensor:
    """SVCCA of x (n, d1), y (n, d2) -> (): the mean canonical correlation of the top SVD directions of each."""
    dims, keep = check_svcca_args(x, y, dims, keep)
    if not _finite(x, y):
        return _nan(x)
    ux, sx, _ = _basis(x)
    uy, sy, _ = _basis(y)
    kx = _kept(sx, None if dims is None else dims[0], keep)
    ky = _kept(sy, None if dims is None else dims[1], keep)
    if min(kx, ky) == 0:
        return _nan(x)
    # the reduced data ux[:, :kx] diag(sx[:kx]) spans the same space as ux[:, :kx]
    rho = torch.linalg.svdvals(ux[:, :kx].T @ uy[:, :ky])[: min(kx, ky)].clamp(0, 1)
    return rho.mean().to(stat_dtype(x.dtype))


def pwcca(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""PWCCA of x (n, d1), y (n, d2) -> (): Σ α_i ρ_i / Σ α_i with α_i = Σ_j \|⟨h_i, x̄_j⟩\| for x's canonical
    variates h_i (unit norm) and the centered columns x̄_j of x."""
    check_cca_args(x, y, "pwcca")
    if not _finite(x, y):
        return _nan(x)
    ux, _, xc = _basis(x)
    uy, _, _ = _basis(y)
    k = min(ux.shape[1], uy.shape[1])
    if k == 0:
        return _nan(x)
    u, rho, _ = torch.linalg.svd(ux.T @ uy, full_matrices=False)
    h = ux @ u[:, :k]  # canonical variates of x, (n, k), orthonormal
    weights = (xc.T @ h).abs().sum(0)
    rho = rho[:k].clamp(0, 1)
    return ((weights * rho).sum() / weights.sum()).to(stat_dtype(x.dtype))
