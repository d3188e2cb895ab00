"""cka_test in plain PyTorch: the permutation null and bootstrap interval by explicit resampling."""

from __future__ import annotations

from typing import Optional

import torch

from repkern._common import acc_dtype, all_finite, constant_rows, replicate_indices
from repkern._validation import check_cka_test_args
from repkern.reference.cka import kernel_gram, cka_from_grams
from repkern.results.cka_test import finish


def cka_test(
    x: torch.Tensor,
    y: torch.Tensor,
    kernel: str = "linear",
    *,
    debiased: bool = False,
    n_permutations: int = 1000,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    sigma: Optional[float] = None,
    threshold: float = 1.0,
    median: str = "full",
):
    """Permutation test and bootstrap interval of CKA(x, y), x (n, d1), y (n, d2), the plain way:
    Gram matrices once, then for every permutation π of :func:`replicate_indices` the CKA of
    K and L[π][:, π], and for every bootstrap draw b the CKA of K[b][:, b] and L[b][:, b]
    (the kernel bandwidth stays the one of the full data). Returns a CkaTestResult."""
    sigma, threshold, ci = check_cka_test_args(x, y, kernel, debiased, n_permutations, n_bootstrap, seed, ci, sigma,
                                               threshold, median)
    n = x.shape[0]
    k = kernel_gram(x, kernel, sigma, threshold, median).double()
    l = kernel_gram(y, kernel, sigma, threshold, median).double()
    perms, boots = replicate_indices(n, n_permutations, n_bootstrap, seed, x.device)
    ok = bool(all_finite(x) & all_finite(y) & ~constant_rows(x) & ~constant_rows(y))
    nan = torch.full((), torch.nan, dtype=torch.float64, device=x.device)
    observed = cka_from_grams(k, l, debiased=debiased) if ok else nan
    null = [cka_from_grams(k, l[p][:, p], debiased=debiased) for p in perms]
    boot = [cka_from_grams(k[b][:, b], l[b][:, b], debiased=debiased) for b in boots]
    empty = torch.empty(0, dtype=torch.float64, device=x.device)
    null = torch.stack(null) if null else empty
    boot = torch.stack(boot) if boot else empty
    if not ok:
        null, boot = torch.full_like(null, torch.nan), torch.full_like(boot, torch.nan)
    return finish(observed, null, boot, ci, acc_dtype(x.dtype))

