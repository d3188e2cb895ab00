"""Arguments of :func:`repkern.cca`, :func:`repkern.svcca` and :func:`repkern.pwcca`."""

from __future__ import annotations

import numbers
from typing import Optional

from repkern._validation.shape import check_pair


def check_cca_args(x, y, estimator: str = "cca") -> None:
    """x (n, d1), y (n, d2) with n >= 2 (the columns are centered)."""
    check_pair(x, y, min_samples=2, estimator=f"{estimator} (column centering)")


def check_svcca_options(dims, keep, widths: Optional[tuple[int, int]] = None, sides: tuple[str, str] = ("x", "y")):
    """dims: None, an int >= 1, or a pair (dims_x, dims_y); keep: a fraction in (0, 1].
    With ``widths`` (d1, d2) of the inputs named ``sides``, dims may not exceed them.
    Returns (dims pair or None, keep)."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise TypeError(f"keep: expected a fraction of the variance in (0, 1], got {type(keep).__name__}")
    keep = float(keep)
    if not 0.0 < keep <= 1.0:  # NaN fails it too (math.isnan cannot take a float traced by torch.compile)
        raise ValueError(f"keep: expected a fraction of the variance in (0, 1], got {keep}")
    if dims is None:
        return None, keep
    pair = tuple(dims) if isinstance(dims, (tuple, list)) else (dims, dims)
    if len(pair) != 2:
        raise ValueError(f"dims: expected an int or a pair (dims_x, dims_y), got {len(pair)} values")
    for value in pair:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"dims: expected an int or a pair of ints, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"dims: expected >= 1 directions per side, got {value}")
    pair = (int(pair[0]), int(pair[1]))
    if widths is not None:
        for side, value, width in ((sides[0], pair[0], widths[0]), (sides[1], pair[1], widths[1])):
            if value > width:
                raise ValueError(f"dims: {value} SVD directions requested from {side}, which has only d={width} "
                                 "columns")
    return pair, keep


def check_svcca_args(x, y, dims, keep):
    """Validates :func:`svcca`'s arguments; returns (dims pair or None, keep)."""
    check_cca_args(x, y, "svcca")
    return check_svcca_options(dims, keep, (x.shape[1], y.shape[1]))
