"""Canonical correlation analysis: ``repkern.cca``, ``repkern.svcca``, ``repkern.pwcca``.

All three from the centered second-order statistics A = X̄ᵀX̄, B = ȲᵀȲ, C = X̄ᵀȲ in float64 (the math in
:mod:`repkern.ops._second_order`; :class:`repkern.StreamingAlignment` gives the same numbers from
batches):

- A = Vx Λx Vxᵀ (descending) is the SVD of X̄ without X̄: X̄ = Ux Λx^½ Vxᵀ, Ux = X̄ Wx with
  Wx = Vx Λx^-½ over the numerical range of X̄ (rank rx: eigenvalues above d1·2⁻⁴⁶·λ_max);
- canonical correlations = cosines of the principal angles between the column spaces of X̄ and Ȳ =
  singular values of Uxᵀ Uy = Wxᵀ C Wy (rx × ry): min(rx, ry) of them;
- SVCCA keeps the top kx eigen-directions of A (= the top SVD directions of X̄) and ky of B, i.e. the
  reduced data X̄ Vx[:, :kx], whose own Gram blocks are Λx[:kx], Vx[:, :kx]ᵀ C Vy[:, :ky], Λy[:ky];
- PWCCA's weights from x's canonical variates h_i = X̄ Wx u_i (u_i the left singular vectors of
  Wxᵀ C Wy, ‖h_i‖ = 1): ⟨h_i, x_j⟩ = (A Wx u_i)_j = (Vx Λx^½ u_i)_j for the columns x_j of X̄ (h_i has
  zero mean, so centering x_j changes nothing).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from repkern import _common, _native, reference
from repkern._validation.cca import check_cca_args, check_svcca_args
from repkern.ops import _second_order as so

__all__ = ["cca", "svcca", "pwcca"]


def _nan(x: Tensor, shape=()) -> Tensor:
    return torch.full(shape, torch.nan, dtype=_common.stat_dtype(x.dtype), device=x.device)


# Each function is one opaque op under torch.compile: the ranks, the directions SVCCA keeps (so cca's
# output length) and the NaN/constant branches depend on the data; eager and compiled calls run the same
# code. The (2,) bool output flags a finite constant x, y (for the warning, given outside the op).


@torch.library.custom_op("repkern::cca", mutates_args=())
def _cca_op(x: Tensor, y: Tensor) -> Tensor:
    parts = so.prepare(x, y)
    if parts is None:
        return _nan(x, (min(x.shape[1], y.shape[1]),))
    sx, sy, c, _ = parts
    rho, _ = so.canonical(sx, sy, c)
    return rho.to(_common.stat_dtype(x.dtype))


@_cca_op.register_fake
def _(x, y):
    return x.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=_common.stat_dtype(x.dtype))


@torch.library.custom_op("repkern::svcca", mutates_args=())
def _svcca_op(x: Tensor, y: Tensor, dims: Optional[list[int]], keep: float) -> tuple[Tensor, Tensor]:
    parts = so.prepare(x, y)
    if parts is None:
        return _nan(x), so.no_flags(x)
    sx, sy, c, constant = parts
    pair = None if dims is None else (dims[0], dims[1])
    return svcca_from_stats(sx, sy, c, pair, keep).to(_common.stat_dtype(x.dtype)), constant


@_svcca_op.register_fake
def _(x, y, dims, keep):
    return x.new_empty((), dtype=_common.stat_dtype(x.dtype)), so.no_flags(x)


@torch.library.custom_op("repkern::pwcca", mutates_args=())
def _pwcca_op(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    parts = so.prepare(x, y)
    if parts is None:
        return _nan(x), so.no_flags(x)
    sx, sy, c, constant = parts
    return pwcca_from_stats(sx, sy, c).to(_common.stat_dtype(x.dtype)), constant


@_pwcca_op.register_fake
def _(x, y):
    return x.new_empty((), dtype=_common.stat_dtype(x.dtype)), so.no_flags(x)


def cca(x: Tensor, y: Tensor) -> Tensor:
    """All canonical correlations of x and y, descending.

    ρ_i = max corr(X̄a, Ȳb) over directions uncorrelated with the first i−1 pairs; computed exactly
    (no randomness, no regularization) as the singular values of the whitened cross-covariance
    (Λx^-½ Vxᵀ) X̄ᵀȲ (Vy Λy^-½) from float64 second-order statistics, i.e. the cosines of the principal
    angles between the column spaces of the centered x and y.

    Args:
        x, y: ``(n, d1)``, ``(n, d2)``: the same n >= 2 samples (rows), same dtype and device.

    Returns:
        ``(k,)`` float32 (float64 for float64 input) in [0, 1], descending, with k = min(rank x̄, rank ȳ):
        the numerical ranks of the centered inputs (eigenvalues of X̄ᵀX̄ above d·2⁻⁴⁶·λ_max), which are
        min(d1, d2) for full-rank data; directions without variance (dead units, collinear columns,
        n <= d) have no canonical correlation and are dropped. When rank x̄ + rank ȳ > n − 1 the
        column spaces must intersect and at least that excess of the correlations is 1 (too few
        samples: the correlations say nothing then). A constant input gives k = 0 (an empty tensor).
        All NaN, of length min(d1, d2), where an input holds NaN/Inf. Invariant to invertible linear
        maps and shifts of either input.
        No gradient. Works under ``torch.compile`` (fullgraph, dynamic shapes; the length is then a
        data-dependent size).
    """
    check_cca_args(x, y)
    if _native.use_reference():
        return reference.cca(x, y)
    return _cca_op(x.detach(), y.detach())


def svcca(x: Tensor, y: Tensor, *, dims: Optional[Union[int, tuple[int, int]]] = None,
          keep: float = 0.99) -> Tensor:
    """SVCCA (Raghu et al. 2017): mean canonical correlation of the top SVD directions of each side.

    Each input is centered and reduced to its top SVD directions X̄ V[:, :k] (the principal components,
    k chosen per side), then ``mean(cca(reduced x, reduced y))`` over all min(kx, ky) correlations.

    Args:
        x, y: ``(n, d1)``, ``(n, d2)``: the same n >= 2 samples (rows), same dtype and device.
        dims: directions kept per side: an int for both, or a pair (dims_x, dims_y), each at most that
            side's d; never more than its numerical rank (directions without variance are not kept).
            ``None``: per side, the fewest leading directions whose variances (squared singular values)
            reach ``keep`` of the total.
        keep: fraction of the variance in (0, 1] (used when dims is None; the paper's 0.99).

    Returns:
        ``()`` float32 (float64 for float64 input). NaN where an input holds NaN/Inf; NaN with a
        RuntimeWarning where an input is constant (no direction to keep). No gradient.
        Works under ``torch.compile`` (fullgraph, dynamic shapes), without the warning.
    """
    dims_pair, keep = check_svcca_args(x, y, dims, keep)
    if _native.use_reference():
        return reference.svcca(x, y, dims=dims_pair, keep=keep)
    value, constant = _svcca_op(x.detach(), y.detach(), None if dims_pair is None else list(dims_pair), keep)
    if not torch.compiler.is_compiling():  # no data-dependent Python under torch.compile
        so.warn_degenerate("svcca", so.flagged(constant), f"{so.CONSTANT}; SVCCA is NaN")
    return value


def svcca_from_stats(sx: so.Spectrum, sy: so.Spectrum, c: Tensor, dims: Optional[tuple[int, int]],
                     keep: float) -> Tensor:
    kx = so.svcca_directions(sx, None if dims is None else dims[0], keep)
    ky = so.svcca_directions(sy, None if dims is None else dims[1], keep)
    rho, _ = so.canonical(sx, sy, c, kx, ky)
    return so.mean_or_nan(rho)


def pwcca_from_stats(sx: so.Spectrum, sy: so.Spectrum, c: Tensor) -> Tensor:
    rho, u = so.canonical(sx, sy, c)
    return so.pwcca_value(rho, so.projection_weights(sx, u))


def pwcca(x: Tensor, y: Tensor) -> Tensor:
    r"""Projection-weighted CCA (Morcos et al. 2018), weights from x's canonical variates.

    With the canonical correlations ρ_i (i = 1..k, as :func:`cca`) and x's canonical variates h_i = X̄a_i
    (unit norm, h_i and ρ_i paired), α_i = Σ_j \|⟨h_i, x_j⟩\| over the d1 centered columns (units) x_j of
    x, and ``pwcca = Σ α_i ρ_i / Σ α_i``: how much of x's units the correlated directions account for.

    Not symmetric: the weights come from x (the paper's L1). google/svcca's ``compute_pwcca`` instead
    takes the side with fewer units, and builds its weights from the QR orthonormalization of its
    rotated activations (the whitened-space rotation applied to the centered activations, neuron means
    added back) rather than from the canonical variates, projecting the uncentered activations; the
    two agree only in special cases. Here: the paper's definition; call ``pwcca(y, x)`` for y's side.

    Args:
        x, y: ``(n, d1)``, ``(n, d2)``: the same n >= 2 samples (rows), same dtype and device.

    Returns:
        ``()`` float32 (float64 for float64 input) in [0, 1]. NaN where an input holds NaN/Inf; NaN with
        a RuntimeWarning where an input is constant. No gradient.
        Works under ``torch.compile`` (fullgraph, dynamic shapes), without the warning.
    """
    check_cca_args(x, y, "pwcca")
    if _native.use_reference():
        return reference.pwcca(x, y)
    value, constant = _pwcca_op(x.detach(), y.detach())
    if not torch.compiler.is_compiling():  # no data-dependent Python under torch.compile
        so.warn_degenerate("pwcca", so.flagged(constant), f"{so.CONSTANT}; PWCCA is NaN")
    return value
