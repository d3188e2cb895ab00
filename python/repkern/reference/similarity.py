"""similarity_matrix and similarity_test in plain PyTorch: every pair, and every permuted copy of y,
computed from scratch by the reference function of the metric."""

from __future__ import annotations

import torch

from repkern._common import replicate_indices, stat_dtype
from repkern._validation.similarity import (check_similarity_matrix_args, check_similarity_test_args, pair_options,
                                            reference_options)
from repkern.reference.cca import pwcca, svcca
from repkern.reference.cka import cka_matrix
from repkern.reference.cka_test import cka_test
from repkern.reference.knn import cknna, cycle_knn, mutual_knn
from repkern.reference.rsa import rsa
from repkern.reference.shape import shape_distance
from repkern.results.similarity import SimilarityTestResult, finish

PAIR_FUNCTIONS = {"mutual_knn": mutual_knn, "cycle_knn": cycle_knn, "cknna": cknna, "shape_distance": shape_distance,
                  "svcca": svcca, "pwcca": pwcca, "rsa": rsa}


def similarity_matrix(xs, ys=None, *, metric: str = "cka", **options) -> torch.Tensor:
    """The metric of every (xs[i], ys[j]) pair (ys=None: xs against itself), each pair computed by the
    reference function: (len(xs), len(ys)). cka: :func:`cka_matrix`. Takes the options of
    :func:`repkern.similarity_matrix`; the memory budgets (tile_bytes, method, max_gram_bytes) are
    checked and change nothing here."""
    xs, ys, options = check_similarity_matrix_args(xs, ys, metric, options)
    kwargs = reference_options(pair_options(metric, options))
    if metric == "cka":
        return cka_matrix(xs, ys, **kwargs)
    fn = PAIR_FUNCTIONS[metric]
    cols = xs if ys is None else ys
    dtype = stat_dtype(xs[0].dtype)
    return torch.stack([torch.stack([fn(x, y, **kwargs).to(dtype) for y in cols]) for x in xs])


def similarity_test(x: torch.Tensor, y: torch.Tensor, *, metric: str, n_permutations: int = 1000, seed: int = 0,
                    **options) -> SimilarityTestResult:
    """Permutation test of the metric of x (n, d1) against y (n, d2), the plain way: the metric of
    (x, y), then of (x, y[π]) from scratch for every permutation π of
    :func:`repkern._common.replicate_indices` (the permutations :func:`repkern.similarity_test` uses).
    cka: :func:`cka_test` without bootstrap."""
    options = check_similarity_test_args(x, y, metric, n_permutations, seed, options)
    kwargs = reference_options(pair_options(metric, options))
    dtype = stat_dtype(torch.promote_types(x.dtype, y.dtype))
    if metric == "cka":
        res = cka_test(x, y, n_permutations=n_permutations, n_bootstrap=0, seed=seed, **kwargs)
        return finish(metric, res.cka, res.null, dtype)
    fn = PAIR_FUNCTIONS[metric]
    perms, _ = replicate_indices(x.shape[0], n_permutations, 0, seed, x.device)
    observed = fn(x, y, **kwargs).double()
    null = [fn(x, y[p], **kwargs).double() for p in perms]
    null = torch.stack(null) if null else torch.empty(0, dtype=torch.float64, device=x.device)
    return finish(metric, observed, null, dtype)
