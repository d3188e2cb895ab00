"""Arguments of :func:`repkern.gram`."""

from __future__ import annotations

import math
import sys

from repkern._validation.common import boolean, choice, floating_tensor, positive_number


GRAM_KERNELS = ("linear", "cosine", "rbf")
MEDIANS = ("full", "offdiag")


# threshold² (the median heuristic's σ² = threshold² · median) must be a float64 number
MAX_THRESHOLD = math.sqrt(sys.float_info.max)


def rbf_threshold(threshold) -> float:
    """The median heuristic's threshold: finite, > 0, with a finite square (< 1.34e154)."""
    threshold = positive_number("threshold", threshold)
    if not threshold < MAX_THRESHOLD:
        raise ValueError(f"threshold: {threshold} is too large: the median heuristic's σ² = threshold² · median "
                         f"needs threshold² finite (threshold < {MAX_THRESHOLD:.3g})")
    return threshold


def check_gram_args(x, kernel, sigma, threshold, center, median):
    """Validates the arguments of :func:`gram`; returns (sigma, threshold)."""
    floating_tensor("x", x, min_dim=2, shape_hint="(..., n, d)")
    n, d = x.shape[-2], x.shape[-1]
    if n < 1:
        raise ValueError(f"x: needs n >= 1 samples (shape (..., n, d)), got shape {tuple(x.shape)}")
    if d < 1:
        raise ValueError(f"x: needs d >= 1 features (shape (..., n, d)), got shape {tuple(x.shape)}")
    choice("kernel", kernel, GRAM_KERNELS)
    sigma = positive_number("sigma", sigma, allow_none=True)
    threshold = rbf_threshold(threshold)
    boolean("center", center)
    choice("median", median, MEDIANS)
    if kernel == "rbf" and sigma is None and median == "offdiag" and n < 2:
        raise ValueError("median='offdiag' needs n >= 2 samples (there is no off-diagonal distance)")
    return sigma, threshold

