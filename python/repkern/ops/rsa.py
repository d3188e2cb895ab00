"""Representational similarity analysis: ``repkern.rdm`` and ``repkern.rsa``.

RDMs follow rsatoolbox's ``calc_rdm`` conventions, for patterns x_i (the rows of x, d features):

    correlation   1 − r(x_i, x_j), r the Pearson correlation of the two patterns across features
    euclidean     ‖x_i − x_j‖² / d (squared Euclidean distance per feature)

as the condensed upper triangle, i < j row-major (scipy's ``pdist`` / ``squareform`` order), length
n(n−1)/2. Float64 internals: the correlation distance from row-centered, unit-normalized patterns; the
squared distance as ‖a‖² + ‖b‖² − 2a·b of the patterns shifted by their column medians (translation
leaves distances unchanged; the shift keeps the terms from cancelling, and being a data value it keeps
integer-valued data exact, so equal distances of such data come out exactly equal). Row blocks of at most
``BLOCK_ELEMENTS`` products are computed at a time and their i < j entries written straight into the
condensed vector (no n×n matrix, no index tensors).

rsa compares two RDMs of the same n patterns: Spearman (Pearson correlation of average ranks: tied
dissimilarities share the mean of their ranks, scipy's ``rankdata(method="average")``) or Pearson.
"""

from __future__ import annotations

import torch
from torch import Tensor

from repkern import _common, _native, reference
from repkern._validation.rsa import check_rdm_args, check_rsa_args
from repkern.ops import _second_order as so

__all__ = ["rdm", "rsa"]

BLOCK_ELEMENTS = 1 << 22  # float64 products per row block (32 MiB)


def condensed_dissimilarities(x: Tensor, metric: str) -> Tensor:
    """The condensed RDM of x (n, d) in float64."""
    n, d = x.shape
    x64 = x.detach().double()
    if metric == "correlation":
        z = x64 - x64.mean(1, keepdim=True)
        z = z / z.norm(dim=1, keepdim=True)  # a constant pattern: 0/0 = NaN in its pairs
        sq = None
    else:
        # shifted by a data value per column: distances are unchanged, and differences of float32 or
        # integer-valued data are exact, so exactly tied distances stay tied
        z = x64 - _common.finite_row_median(x64)
        # a pattern holding ±Inf gives NaN in each of its pairs (as documented), not inf − inf = NaN in some
        # and inf in others
        z = torch.where(torch.isfinite(x64).all(1, keepdim=True), z, torch.nan)
        sq = z.square().sum(1)
    out = z.new_empty(n * (n - 1) // 2)
    rows = max(1, min(n, BLOCK_ELEMENTS // n))
    pos = 0
    for r0 in range(0, n - 1, rows):
        r1 = min(n - 1, r0 + rows)
        g = z[r0:r1] @ z[r0:].T  # (r1 − r0, n − r0): row i − r0, column j − r0
        cols = torch.arange(r0, n, device=x.device)
        upper = cols[None, :] > torch.arange(r0, r1, device=x.device)[:, None]
        if metric == "correlation":
            block = 1 - g
        else:
            block = ((sq[r0:r1, None] + sq[None, r0:]) - 2 * g).clamp_min_(0) / d
        values = block[upper]  # row-major: exactly the condensed entries of rows r0..r1−1
        out[pos : pos + values.numel()] = values
        pos += values.numel()
    return out


def average_ranks(v: Tensor) -> Tensor:
    """1-based ranks of v (m,), ties sharing the mean of their ranks (float64)."""
    sorted_v, order = torch.sort(v)
    starts_group = torch.ones_like(sorted_v, dtype=torch.bool)
    starts_group[1:] = sorted_v[1:] != sorted_v[:-1]
    group = torch.cumsum(starts_group, 0) - 1
    counts = torch.bincount(group).double()
    first = torch.cumsum(counts, 0) - counts  # 0-based position of each group's first element
    ranks = torch.empty_like(v, dtype=torch.float64)
    ranks[order] = (first + (counts + 1) / 2)[group]
    return ranks


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of two float64 vectors; NaN if either is constant."""
    a, b = a - a.mean(), b - b.mean()
    denom = (a @ a) * (b @ b)
    if not float(denom) > 0:
        return torch.full((), torch.nan, dtype=a.dtype, device=a.device)
    return ((a @ b) / denom.sqrt()).clamp(-1.0, 1.0)


def rdm(x: Tensor, metric: str = "correlation") -> Tensor:
    """Representational dissimilarity matrix of the patterns (rows) of x, condensed.

    Args:
        x: ``(n, d)``: n >= 2 patterns (stimuli, conditions) of d features; float32, float64, float16
            or bfloat16. ``metric="correlation"`` needs d >= 2.
        metric: ``"correlation"``: 1 − Pearson r between patterns i and j (in [0, 2]);
            ``"euclidean"``: squared Euclidean distance / d (rsatoolbox's conventions).

    Returns:
        ``(n(n−1)/2,)`` float32 (float64 for float64 input): entry (i, j), i < j, at position
        n·i − i(i+1)/2 + j − i − 1 (scipy's ``pdist`` order; ``scipy.spatial.distance.squareform``
        gives the matrix). NaN in every pair that involves a pattern holding NaN/Inf, and (correlation)
        a constant pattern (its correlation is undefined). Values to float64 rounding: identical
        patterns give 0 up to ~1e-16 relative. No gradient.
    """
    check_rdm_args(x, metric)
    if _native.use_reference():
        return reference.rdm(x, metric)
    with torch.no_grad():
        out = condensed_dissimilarities(x, metric)
    return out.to(_common.stat_dtype(x.dtype))


def rsa(x: Tensor, y: Tensor, *, rdm: str = "correlation", compare: str = "spearman") -> Tensor:
    """Representational similarity analysis: the correlation of the RDMs of x and y.

    Args:
        x, y: ``(n, d1)``, ``(n, d2)``: the same n >= 3 patterns (rows) in the same order, same dtype
            and device.
        rdm: the dissimilarity of :func:`repkern.rdm` used for both (``"correlation"`` or
            ``"euclidean"``).
        compare: ``"spearman"`` (Pearson correlation of the ranks of the n(n−1)/2 dissimilarities, ties
            sharing their average rank: rsatoolbox's ``compare_spearman``, scipy's ``spearmanr``; ties
            are exact equality of the float64 dissimilarities) or ``"pearson"``.

    Returns:
        ``()`` float32 (float64 for float64 input) in [−1, 1]. NaN where an RDM holds NaN (NaN/Inf in
        an input, or a constant pattern with the correlation distance): no entries are dropped; NaN
        with a RuntimeWarning where an RDM is constant (all dissimilarities equal). No gradient.
        Works under ``torch.compile`` (fullgraph, dynamic shapes), without the warning.
    """
    check_rsa_args(x, y, rdm, compare)
    if _native.use_reference():
        return reference.rsa(x, y, rdm=rdm, compare=compare)
    value, flat = _rsa_op(x.detach(), y.detach(), rdm, compare)
    if not torch.compiler.is_compiling():  # no data-dependent Python under torch.compile
        so.warn_degenerate("rsa", so.flagged(flat),
                           "all dissimilarities of its RDM are equal; the RSA correlation is NaN")
    return value


# One opaque op under torch.compile: the NaN and constant-RDM branches depend on the data; eager and
# compiled calls run the same code.
@torch.library.custom_op("repkern::rsa", mutates_args=())
def _rsa_op(x: Tensor, y: Tensor, metric: str, compare: str) -> tuple[Tensor, Tensor]:
    """(the correlation in the statistics dtype, (2,) bool: the RDM of x, y finite and constant)."""
    stat = _common.stat_dtype(x.dtype)
    dx, dy = condensed_dissimilarities(x, metric), condensed_dissimilarities(y, metric)
    if not (bool(torch.isfinite(dx).all()) and bool(torch.isfinite(dy).all())):
        return torch.full((), torch.nan, dtype=stat, device=x.device), so.no_flags(x)
    if compare == "spearman":
        dx, dy = average_ranks(dx), average_ranks(dy)
    flat = torch.stack([(v == v[0]).all() for v in (dx, dy)])
    return pearson(dx, dy).to(stat), flat


@_rsa_op.register_fake
def _(x, y, metric, compare):
    return x.new_empty((), dtype=_common.stat_dtype(x.dtype)), so.no_flags(x)
