"""Linear alignment metrics from second-order statistics, shared by the one-shot functions
(:mod:`repkern.ops.shape`, :mod:`repkern.ops.cca`) and :class:`repkern.StreamingAlignment`.

Everything here starts from the centered Gram blocks of a pair of representations
X (n, d1) and Y (n, d2), column-centered (X̄ = X − 1 mean(X)):

    A = X̄ᵀ X̄ (d1, d1),   B = Ȳᵀ Ȳ (d2, d2),   C = X̄ᵀ Ȳ (d1, d2)      (float64)

which a stream of batches gives exactly (StreamingCKA's shifted sums), so every metric
below is the same function of (A, B, C) whether the rows came at once or in batches.

Per representation, the eigendecomposition A = V Λ Vᵀ (float64, eigenvalues descending) is the
SVD of X̄ without X̄: X̄ = U Λ^½ Vᵀ with U = X̄ V Λ^-½ (orthonormal columns) for the eigenvalues
above the numerical-rank tolerance

    λ_i > d · ρ · λ_max,   ρ = 2⁻⁴⁶ (≈ 1.4e-14 ≈ float32's ε²; float64's eigensolver resolves
                                    about d · 2⁻⁵² · λ_max from a float64 Gram matrix)

and the rest (directions without variance, up to rounding) are treated as exactly null.
A representation whose rows are all equal has rank 0.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import torch
from torch import Tensor

from repkern import _common
from repkern._validation.shape import rank_deficient_error

RANK_RHO = 2.0**-46  # numerical rank: λ_i > d · RANK_RHO · λ_max
NETREP_EIGVAL_CLIP = 1e-7  # netrep's whiten(): eigenvalues of X̄ᵀX̄ clipped to this before λ^-½
NETREP_NO_WHITENING = 1 - 1e-7  # netrep's whiten(): alpha above this returns Z = I (no rescaling)


@dataclasses.dataclass
class Spectrum:
    """A = V diag(values) Vᵀ with values descending; values beyond `rank` set to 0."""

    values: Tensor  # (d,) float64
    vectors: Tensor  # (d, d) float64, columns
    rank: int
    trace: Tensor  # () float64: tr(A) = ‖X̄‖²_F

    @property
    def width(self) -> int:
        return self.values.shape[0]


def spectrum(a: Tensor, constant: bool = False) -> Spectrum:
    """Eigendecomposition of a centered Gram block A (d, d), float64, with its numerical rank.
    ``constant``: the rows were all equal (rank 0 whatever rounding left in A)."""
    d = a.shape[0]
    if constant:
        zero = a.new_zeros(d)
        return Spectrum(zero, torch.eye(d, dtype=a.dtype, device=a.device), 0, a.new_zeros(()))
    values, vectors = torch.linalg.eigh((a + a.T) / 2)
    values, vectors = values.flip(0), vectors.flip(1)
    top = float(values[0])
    rank = int((values > d * RANK_RHO * top).sum()) if top > 0 else 0
    keep = torch.arange(d, device=a.device) < rank
    return Spectrum(torch.where(keep, values, torch.zeros_like(values)), vectors, rank, torch.diagonal(a).sum())


def prepare(x: Tensor, y: Tensor) -> Optional[tuple[Spectrum, Spectrum, Tensor, Tensor]]:
    """(spectrum of A, spectrum of B, C, (2,) bool: x, y constant) or None when an input holds NaN/Inf."""
    if not (bool(_common.all_finite(x)) and bool(_common.all_finite(y))):
        return None
    constant = torch.stack([_common.constant_rows(x), _common.constant_rows(y)])
    a, b, c = centered_grams(x, y)
    return spectrum(a, bool(constant[0])), spectrum(b, bool(constant[1])), c, constant


def no_flags(x: Tensor) -> Tensor:
    """(2,) bool, all False: the degenerate-input flags of a pair that gets no warning."""
    return x.new_zeros(2, dtype=torch.bool)


def flagged(flags: Tensor) -> list[str]:
    """The names ("x", "y") whose flag in the (2,) bool tensor is set."""
    return [name for name, flag in zip("xy", flags.tolist()) if flag]


def centered_grams(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(A, B, C) of x (n, d1), y (n, d2) in float64, centered on the float64 column means."""
    x64, y64 = x.detach().double(), y.detach().double()
    xc, yc = x64 - x64.mean(0), y64 - y64.mean(0)
    return xc.T @ xc, yc.T @ yc, xc.T @ yc


# ---- shape metrics (netrep's LinearMetric) -----------------------------------------------------------


def partial_whitening(s: Spectrum, padded: int, alpha: float) -> tuple[Tensor, Tensor]:
    """netrep's partial whitening Z = V diag(d) Vᵀ of X̄ zero-padded to `padded` columns, restricted to
    the numerical range of X̄ (on the null space X̄·Z is exactly 0). Eigenvalues (the padded columns' zeros
    included) are clipped at 1e-7, d_i = α + (1−α) λ_i^-½, rescaled by
    sqrt(Σλ / Σ(α²λ + 2α(1−α)√λ + (1−α)²)) (the clipped λ throughout, as netrep). Returns
    (Z on the range (d, d), ‖X̄ Z‖²_F = Σ_{i<rank} d_i² λ_i)."""
    lam = torch.cat([s.values, s.values.new_zeros(padded - s.width)]).clamp_min(NETREP_EIGVAL_CLIP)
    diag = alpha + (1 - alpha) * lam.rsqrt()
    new_var = (alpha**2 * lam + 2 * alpha * (1 - alpha) * lam.sqrt() + (1 - alpha) ** 2).sum()
    diag = diag * torch.sqrt(lam.sum() / new_var)
    r = s.rank
    v, dr = s.vectors[:, :r], diag[:r]
    return (v * dr) @ v.T, (dr.square() * s.values[:r]).sum()


def shape_terms(sx: Spectrum, sy: Spectrum, c: Tensor, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """(‖X̄ Zx‖²_F, ‖Ȳ Zy‖²_F, ‖Zx C Zy‖_*): the squared norms of the whitened representations and the
    Frobenius inner product of the aligned ones (the optimal rotation's score is the nuclear norm).
    ``c`` may carry leading batch dimensions (one cross block per permutation): the nuclear norms then
    have them too."""
    if alpha > NETREP_NO_WHITENING:
        nx2, ny2, cross = sx.trace, sy.trace, c
    else:
        padded = max(sx.width, sy.width)
        zx, nx2 = partial_whitening(sx, padded, alpha)
        zy, ny2 = partial_whitening(sy, padded, alpha)
        cross = zx @ c @ zy
    return nx2, ny2, torch.linalg.svdvals(cross).sum(-1)


def shape_value(nx2: Tensor, ny2: Tensor, nuclear: Tensor, score: str) -> Tensor:
    """angular: arccos(⟨·,·⟩ / (‖·‖‖·‖)) clipped to [−1, 1] (NaN if a norm is 0);
    euclidean: sqrt(‖X̄Zx‖² + ‖ȲZy‖² − 2‖Zx C Zy‖_*) (clamped at 0: rounding)."""
    if score == "angular":
        denom = nx2 * ny2
        if not float(denom) > 0:
            return torch.full_like(nx2, torch.nan)
        return torch.arccos((nuclear / denom.sqrt()).clamp(-1.0, 1.0))
    return (nx2 + ny2 - 2 * nuclear).clamp_min(0).sqrt()


def check_whitenable(s: Spectrum, padded: int, alpha: float, name: str, n: int) -> None:
    """Full whitening (alpha = 0) of a rank-deficient or zero-padded representation is undefined."""
    if alpha == 0 and s.rank < padded:
        raise rank_deficient_error(name, s.rank, s.width, padded, n)


# ---- CCA family ---------------------------------------------------------------------------------------


def svcca_directions(s: Spectrum, dims: Optional[int], keep: float) -> int:
    """How many leading eigen-directions (= SVD directions of X̄) SVCCA keeps: `dims` (at most the rank),
    else the fewest whose eigenvalues (variances) reach `keep` of the total (at least 1, at most the rank)."""
    if s.rank == 0:
        return 0
    if dims is not None:
        return min(dims, s.rank)
    cumulative = torch.cumsum(s.values, 0)
    k = int((cumulative < keep * cumulative[-1]).sum()) + 1
    return max(1, min(k, s.rank))


def canonical(sx: Spectrum, sy: Spectrum, c: Tensor, kx: Optional[int] = None,
              ky: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Canonical correlations of the first kx (default: rank) eigen-directions of X̄ and ky of Ȳ:
    with Wx = Vx Λx^-½ (X̄ Wx = Ux orthonormal), the singular values of T = Wxᵀ C Wy, descending,
    min(kx, ky) of them, clipped to [0, 1]. Returns (ρ (k,), the left singular vectors u_i (kx, k));
    with leading batch dimensions on ``c`` (one cross block per permutation), on both results too."""
    kx = sx.rank if kx is None else kx
    ky = sy.rank if ky is None else ky
    batch = c.shape[:-2]
    if min(kx, ky) == 0:
        return c.new_zeros(batch + (0,)), c.new_zeros(batch + (kx, 0))
    wx = sx.vectors[:, :kx] * sx.values[:kx].rsqrt()
    wy = sy.vectors[:, :ky] * sy.values[:ky].rsqrt()
    u, rho, _ = torch.linalg.svd(wx.T @ c @ wy, full_matrices=False)  # min(kx, ky) singular values
    return rho.clamp(0.0, 1.0), u


def projection_weights(sx: Spectrum, u: Tensor) -> Tensor:
    """Morcos et al.'s α_i = Σ_j |⟨h_i, x_j⟩| over the columns x_j of X̄ for the canonical variates
    h_i = X̄ a_i, a_i = Wx u_i (unit norm: X̄ Wx is orthonormal). ⟨h_i, x_j⟩ = (A a_i)_j and
    A Wx = Vx Λx^½, so α_i = ‖Vx Λx^½ u_i‖₁. Not normalized. ``u`` (..., kx, k) -> (..., k)."""
    kx = u.shape[-2]
    return ((sx.vectors[:, :kx] * sx.values[:kx].sqrt()) @ u).abs().sum(-2)


def pwcca_value(rho: Tensor, weights: Tensor) -> Tensor:
    """Σ α_i ρ_i / Σ α_i over the last dimension (NaN without canonical pairs)."""
    if rho.shape[-1] == 0:
        return rho.new_full(rho.shape[:-1], torch.nan)
    return (weights * rho).sum(-1) / weights.sum(-1)


def mean_or_nan(rho: Tensor) -> Tensor:
    """Mean over the last dimension (NaN when it is empty)."""
    return rho.mean(-1) if rho.shape[-1] else rho.new_full(rho.shape[:-1], torch.nan)


CONSTANT = "zero variance (all rows equal)"


def warn_degenerate(op: str, names: list[str], what: str) -> None:
    """RuntimeWarning "repkern.<op>: <names>: <what>" (nothing without names)."""
    if names and not torch.compiler.is_compiling():
        warnings.warn(f"repkern.{op}: {', '.join(names)}: {what}", RuntimeWarning, stacklevel=3)
