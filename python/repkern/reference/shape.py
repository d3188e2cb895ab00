"""The shape metric of :func:`repkern.shape_distance` in plain PyTorch: netrep's ``LinearMetric`` step by
step on the (padded, centered) data matrices, the whitening's eigendecomposition taken from the SVD of
the data (so its small eigenvalues are accurate), float64 throughout."""

from __future__ import annotations

import torch

from repkern._common import all_finite, constant_rows, stat_dtype
from repkern._validation.shape import check_shape_args, rank_deficient_error

RANK_RHO = 2.0**-46  # a direction is null when its eigenvalue (squared singular value) <= d·RANK_RHO·λ_max


def _centered_padded(x: torch.Tensor, width: int) -> torch.Tensor:
    """x (n, d) -> float64 (n, width): zero columns appended, columns centered; exactly 0 if x is constant."""
    x64 = x.double()
    if bool(constant_rows(x)):
        x64 = torch.zeros_like(x64)
    x64 = torch.nn.functional.pad(x64, (0, width - x.shape[1]))
    return x64 - x64.mean(0)


def partial_whiten(xc: torch.Tensor, alpha: float, name: str, width: int) -> torch.Tensor:
    """netrep's whiten(X̄, alpha, preserve_variance=True): X̄ Z with Z = V diag(d) Vᵀ, X̄ᵀX̄ = V Λ Vᵀ,
    λ clipped at 1e-7, d = α + (1−α) λ^-½ rescaled to keep Σλ; α > 1 − 1e-7: X̄ unchanged.
    `width`: the unpadded width (the numerical-rank tolerance scales with it)."""
    if alpha > 1 - 1e-7:
        return xc
    n, p = xc.shape
    _, s, vh = torch.linalg.svd(xc, full_matrices=n < p)  # vh (p, p): all p eigenvectors of X̄ᵀX̄
    lam = torch.zeros(p, dtype=xc.dtype, device=xc.device)
    lam[: s.numel()] = s.square()
    rank = int((lam > width * RANK_RHO * lam.max()).sum()) if bool(lam.max() > 0) else 0
    if alpha == 0 and rank < p:
        raise rank_deficient_error(name, rank, width, p, n)
    lam = lam.clamp_min(1e-7)
    d = alpha + (1 - alpha) * lam**-0.5
    new_var = (alpha**2 * lam + 2 * alpha * (1 - alpha) * lam.sqrt() + (1 - alpha) ** 2).sum()
    d = d * torch.sqrt(lam.sum() / new_var)
    z = vh.T @ torch.diag(d) @ vh
    return xc @ z


def shape_distance(x: torch.Tensor, y: torch.Tensor, *, alpha: float = 1.0, score: str = "angular") -> torch.Tensor:
    """Shape distance of x (n, d1) and y (n, d2) -> () (see :func:`repkern.shape_distance`): pad, center,
    partially whiten, rotate X̃ onto Ỹ by the SVD of X̃ᵀỸ, then the angle between (or the Frobenius
    distance of) the aligned matrices. NaN for NaN/Inf input; angular NaN for a constant input."""
    alpha = check_shape_args(x, y, alpha, score)
    stat = stat_dtype(x.dtype)
    if not (bool(all_finite(x)) and bool(all_finite(y))):
        return torch.full((), torch.nan, dtype=stat, device=x.device)
    p = max(x.shape[1], y.shape[1])
    xw = partial_whiten(_centered_padded(x, p), alpha, "x", x.shape[1])
    yw = partial_whiten(_centered_padded(y, p), alpha, "y", y.shape[1])
    u, _, vh = torch.linalg.svd(xw.T @ yw)
    tx, ty = xw @ u, yw @ vh.T
    if score == "euclidean":
        return torch.linalg.norm(tx - ty).to(stat)
    norms = torch.linalg.norm(tx) * torch.linalg.norm(ty)
    if not bool(norms > 0):
        return torch.full((), torch.nan, dtype=stat, device=x.device)
    return torch.arccos(((tx * ty).sum() / norms).clamp(-1.0, 1.0)).to(stat)
