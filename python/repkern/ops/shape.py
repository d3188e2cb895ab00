"""Shape metrics (Williams et al. 2021): ``repkern.shape_distance``.

netrep's ``LinearMetric(alpha, center_columns=True, zero_pad=True, score_method=score)``, computed from
the centered second-order statistics A = X̄ᵀX̄, B = ȲᵀȲ, C = X̄ᵀȲ in float64 (the math, and why the
same numbers come out of :class:`repkern.StreamingAlignment`, in :mod:`repkern.ops._second_order`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from repkern import _common, _native, reference
from repkern._validation.shape import check_shape_args
from repkern.ops import _second_order as so

__all__ = ["shape_distance"]


def shape_from_stats(n: int, sx: so.Spectrum, sy: so.Spectrum, c: Tensor, alpha: float, score: str,
                     names: tuple[str, str] = ("x", "y")) -> Tensor:
    """The distance from the spectra of A and B and the cross block C (float64, 0-d).
    ValueError (naming the input) for full whitening of a rank-deficient or zero-padded input."""
    padded = max(sx.width, sy.width)
    if alpha == 0:
        so.check_whitenable(sx, padded, alpha, names[0], n)
        so.check_whitenable(sy, padded, alpha, names[1], n)
    nx2, ny2, nuclear = so.shape_terms(sx, sy, c, alpha)
    return so.shape_value(nx2, ny2, nuclear, score)


def shape_distance(x: Tensor, y: Tensor, *, alpha: float = 1.0, score: str = "angular") -> Tensor:
    """Generalized shape metric between two representations of the same n samples (Williams et al. 2021).

    The numbers of netrep's ``LinearMetric(alpha, center_columns=True, zero_pad=True)``, score_method
    ``score``, fitted and scored on the same data:

    1. the narrower matrix is zero-padded to p = max(d1, d2) columns, and every column is centered;
    2. partial whitening X̃ = X̄ Z, Z = V diag(d) Vᵀ from X̄ᵀX̄ = V Λ Vᵀ (not divided by n), eigenvalues
       clipped at 1e-7, d = α + (1−α) λ^-½, times sqrt(Σλ / Σ(α²λ + 2α(1−α)√λ + (1−α)²)) so that the
       total variance is kept; for α > 1 − 1e-7, Z = I (α = 1: no whitening, the Procrustes distance);
    3. the rotation aligning X̃ and Ỹ: from the SVD of X̃ᵀỸ = U S Wᵀ (X̃U against ỸW);
    4. ``score="angular"``: arccos(⟨X̃U, ỸW⟩_F / (‖X̃‖_F ‖Ỹ‖_F)) = arccos(‖X̃ᵀỸ‖_* / (‖X̃‖_F ‖Ỹ‖_F)),
       in [0, π]; ``"euclidean"``: ‖X̃U − ỸW‖_F = sqrt(‖X̃‖² + ‖Ỹ‖² − 2‖X̃ᵀỸ‖_*), *not* normalized (as
       netrep: it grows with n and with the scale of the data; the angular score is scale-invariant).

    Computed from float64 second-order statistics (module :mod:`repkern.ops._second_order`): the
    rotation is never formed, only the nuclear norm of Zx X̄ᵀȲ Zy. Directions of X̄ with no variance
    (eigenvalues of X̄ᵀX̄ at or below d·2⁻⁴⁶·λ_max, e.g. when n <= d) are exactly null, so X̄Z has no
    component there, as in exact arithmetic; their clipped eigenvalue (1e-7) still enters the
    variance-preserving scale, as in netrep. Symmetric in x and y.

    Args:
        x, y: ``(n, d1)``, ``(n, d2)``: the same n >= 2 samples (rows), same dtype (float32, float64,
            float16, bfloat16) and device; d1 and d2 may differ (zero-padding).
        alpha: in [0, 1]. 1: rotations only (Procrustes); 0: any invertible linear map (CCA-like),
            which needs both inputs at full column rank p (no padding, n > p, no collinear columns):
            otherwise ValueError naming the input (use alpha > 0).
        score: ``"angular"`` or ``"euclidean"``.

    Returns:
        ``()`` float32 (float64 for float64 inputs). Identical inputs give 0 up to rounding (the angular
        score of a pair at distance 0 is about sqrt(2ε) ≈ 2e-8 rad from float64 rounding). NaN where an
        input holds NaN or Inf (no error, no warning); angular score NaN with a RuntimeWarning where an
        input is constant (all rows equal: no direction to compare). No gradient.
        Works under ``torch.compile`` (fullgraph, dynamic shapes), without the warning.
    """
    alpha = check_shape_args(x, y, alpha, score)
    if _native.use_reference():
        return reference.shape_distance(x, y, alpha=alpha, score=score)
    value, constant = _shape_op(x.detach(), y.detach(), alpha, score)
    if score == "angular" and not torch.compiler.is_compiling():  # no data-dependent Python under compile
        so.warn_degenerate("shape_distance", so.flagged(constant), f"{so.CONSTANT}; the angular shape distance is NaN")
    return value


# One opaque op under torch.compile: the rank, the alpha = 0 check and the NaN/constant branches depend on
# the data; eager and compiled calls run the same code.
@torch.library.custom_op("repkern::shape_distance", mutates_args=())
def _shape_op(x: Tensor, y: Tensor, alpha: float, score: str) -> tuple[Tensor, Tensor]:
    """(the distance in the statistics dtype, (2,) bool: x, y finite and constant)."""
    stat = _common.stat_dtype(x.dtype)
    parts = so.prepare(x, y)
    if parts is None:
        return torch.full((), torch.nan, dtype=stat, device=x.device), so.no_flags(x)
    sx, sy, c, constant = parts
    return shape_from_stats(x.shape[0], sx, sy, c, alpha, score).to(stat), constant


@_shape_op.register_fake
def _(x, y, alpha, score):
    return x.new_empty((), dtype=_common.stat_dtype(x.dtype)), so.no_flags(x)
