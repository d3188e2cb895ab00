"""Arguments of :func:`repkern.sparsity_stats` and :class:`repkern.SparsityAccumulator`."""

from __future__ import annotations

import numbers

from repkern._constants import SPARSITY_MAX_TOP_P
from repkern._validation.common import boolean, floating_tensor, integer, is_finite


def check_sparsity_args(a, eps, top_p, dense_threshold, density_bins, row_bins, ordered, *, name="a", min_rows=1):
    """Validates the arguments of :func:`sparsity_stats`; returns (eps, top_p tuple, dense_threshold)."""
    floating_tensor(name, a, min_dim=1, shape_hint="(..., d)")
    d = a.shape[-1]
    if d < 1:
        raise ValueError(f"{name}: needs d >= 1 features (last dim), got shape {tuple(a.shape)}")
    rows = a.numel() // d
    if rows < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} row(s) (shape (..., d)), got shape {tuple(a.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a real number, got {type(eps).__name__}")
    eps = float(eps)
    if not is_finite(eps) or eps < 0:
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
    integer("density_bins", density_bins, 1)
    integer("row_bins", row_bins, 1)
    boolean("ordered", ordered)
    return eps, top_p, dense_threshold

