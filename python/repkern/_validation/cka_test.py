"""Arguments of :func:`repkern.cka_test`."""

from __future__ import annotations

from repkern._validation.cka import check_hsic_args, check_samples
from repkern._validation.common import generator_seed, integer, positive_number


def check_cka_test_args(x, y, kernel, debiased, n_permutations, n_bootstrap, seed, ci, sigma, threshold, median):
    """Validates :func:`cka_test` arguments (x, y: (n, d)); returns (sigma, threshold, ci)."""
    for name, t in (("x", x), ("y", y)):
        check_samples(name, t, min_dim=2, shape_hint="(shape (n, d))")
        if t.dim() != 2:
            raise ValueError(f"{name}: expected shape (n, d), got {tuple(t.shape)}")
    sigma, threshold = check_hsic_args(x, y, kernel, debiased, sigma, threshold, median)
    integer("n_permutations", n_permutations, 0)
    integer("n_bootstrap", n_bootstrap, 0)
    generator_seed(seed)
    ci = positive_number("ci", ci)
    if not ci < 1:
        raise ValueError(f"ci: expected a level in (0, 1), got {ci}")
    if x.shape[0] > 2**31 - 1:
        raise ValueError(f"x: n={x.shape[0]} exceeds the int32 permutation indices")
    return sigma, threshold, ci

