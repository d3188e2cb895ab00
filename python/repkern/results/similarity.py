"""The result of :func:`repkern.similarity_test` (and of :func:`repkern.reference.similarity_test`), and
the step both share: from the observed value and the permutation null to the p-value."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

# distances: small values mean aligned, so the test counts the null values at or below the observed one
DISTANCE_METRICS = ("shape_distance",)


@dataclasses.dataclass(frozen=True)
class SimilarityTestResult:
    """metric: the alignment metric tested. value: its observed value for (x, y) (0-d).
    p_value: one-sided permutation p-value, (1 + #{null >= value}) / (1 + n_permutations) for the
    similarities, (1 + #{null <= value}) / (1 + n_permutations) for the distance shape_distance
    (small p: more aligned than x against y with its rows shuffled); NaN without permutations or
    when value is NaN. null: (n_permutations,) the metric of x against y with its rows permuted.
    All float32 (float64 when an input is float64)."""

    metric: str
    value: Tensor
    p_value: Tensor
    null: Tensor

    def __repr__(self) -> str:
        return (f"SimilarityTestResult(metric={self.metric!r}, value={self.value.item():.4g}, "
                f"p_value={self.p_value.item():.4g}, n_permutations={self.null.numel()})")


def finish(metric: str, observed: Tensor, null: Tensor, dtype: torch.dtype) -> SimilarityTestResult:
    """observed (0-d), null (B,) float64 -> the result in `dtype`."""
    nan = torch.full((), torch.nan, dtype=torch.float64, device=observed.device)
    observed, null = observed.double(), null.double()
    if null.numel():
        extreme = null <= observed if metric in DISTANCE_METRICS else null >= observed
        p_value = (1 + extreme.sum()).double() / (1 + null.numel())
        p_value = torch.where(torch.isnan(observed), nan, p_value)
    else:
        p_value = nan
    return SimilarityTestResult(metric, observed.to(dtype), p_value.to(dtype), null.to(dtype))
