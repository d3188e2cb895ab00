"""The result of :func:`repkern.cka_test` (and of :func:`repkern.reference.cka_test`), and the
step both share: from the observed CKA, the permutation null and the bootstrap replicates
to the p-value and the percentile interval."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class CkaTestResult:
    """cka: observed CKA (0-d). p_value: (1 + #{null >= cka}) / (1 + n_permutations), one-sided
    (large CKA = dependence); NaN without permutations. ci_low, ci_high: percentile bootstrap
    interval at level ``ci`` (linear interpolation between order statistics, replicates with
    an undefined CKA left out; NaN without bootstrap). A percentile interval of CKA is biased
    upward near 0 (CKA of resampled data with duplicated rows is inflated): read it as an
    interval for strongly related representations, and use the p-value to test independence.
    null: (n_permutations,) CKA of x against permuted y. bootstrap: (n_bootstrap,) CKA of
    resampled (x, y) rows. All in float32 (float64 for float64 inputs)."""

    cka: Tensor
    p_value: Tensor
    ci_low: Tensor
    ci_high: Tensor
    null: Tensor
    bootstrap: Tensor
    ci: float

    def __repr__(self) -> str:
        return (f"CkaTestResult(cka={self.cka.item():.4g}, p_value={self.p_value.item():.4g}, "
                f"ci{self.ci:g}=[{self.ci_low.item():.4g}, {self.ci_high.item():.4g}], "
                f"n_permutations={self.null.numel()}, n_bootstrap={self.bootstrap.numel()})")


def finish(observed: Tensor, null: Tensor, bootstrap: Tensor, ci: float, dtype: torch.dtype) -> CkaTestResult:
    """observed (0-d), null (B,), bootstrap (R,) float64 -> the result in `dtype`."""
    nan = torch.full((), torch.nan, dtype=torch.float64, device=observed.device)
    if null.numel():
        p_value = (1 + (null >= observed).sum()).double() / (1 + null.numel())
        p_value = torch.where(torch.isnan(observed), nan, p_value)
    else:
        p_value = nan
    if bootstrap.numel():
        tail = (1 - ci) / 2
        # the quantiles of the defined (non-NaN) replicates, NaN when there are none; no boolean-mask
        # gather (a data-dependent shape would break a torch.compile graph)
        bounds = torch.nanquantile(bootstrap, torch.tensor([tail, 1 - tail], dtype=torch.float64,
                                                           device=bootstrap.device))
        ci_low, ci_high = bounds[0], bounds[1]
    else:
        ci_low = ci_high = nan
    return CkaTestResult(observed.to(dtype), p_value.to(dtype), ci_low.to(dtype), ci_high.to(dtype), null.to(dtype),
                         bootstrap.to(dtype), ci)
