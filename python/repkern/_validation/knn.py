"""Arguments of :func:`repkern.knn`, :func:`repkern.mutual_knn`, :func:`repkern.cycle_knn` and
:func:`repkern.cknna` (and their references)."""

from __future__ import annotations

import numbers

from repkern._validation.common import choice, floating_tensor, same_device

KNN_METRICS = ("cosine", "ip", "euclidean")
CKNNA_MIN_SAMPLES = 4  # the unbiased HSIC divides by n(n − 3)


def samples(name: str, t) -> int:
    """A (n, d) float tensor with n >= 2 and d >= 1; returns n."""
    floating_tensor(name, t, min_dim=2, shape_hint="(n, d)")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected shape (n, d), got {tuple(t.shape)}")
    n, d = t.shape
    if n < 2:
        raise ValueError(f"{name}: needs n >= 2 samples (a row's neighbours exclude itself), got shape {tuple(t.shape)}")
    if d < 1:
        raise ValueError(f"{name}: needs d >= 1 features, got shape {tuple(t.shape)}")
    return n


def neighbour_count(k, n: int) -> int:
    """k as an int with 1 <= k < n (the row itself is never its own neighbour)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    k = int(k)
    if not 1 <= k < n:
        raise ValueError(f"k: expected 1 <= k < n = {n} (a row's neighbours exclude itself), got {k}")
    return k


def check_knn_args(x, k, metric) -> int:
    """Validates :func:`knn`'s arguments; returns k."""
    n = samples("x", x)
    choice("metric", metric, KNN_METRICS)
    return neighbour_count(k, n)


def check_knn_pair_args(x, y, k, metric) -> int:
    """Validates the arguments of :func:`mutual_knn` / :func:`cycle_knn`: x (n, d_x), y (n, d_y)
    on one device; returns k."""
    n = samples("x", x)
    n_y = samples("y", y)
    if n_y != n:
        raise ValueError(f"y: expected n = {n} rows (the samples of x), got shape {tuple(y.shape)}")
    same_device("y", y, x.device)
    choice("metric", metric, KNN_METRICS)
    return neighbour_count(k, n)


def check_cknna_args(x, y, k) -> int:
    """Validates :func:`cknna`'s arguments (n >= 4); returns k."""
    k = check_knn_pair_args(x, y, k, "cosine")
    n = x.shape[0]
    if n < CKNNA_MIN_SAMPLES:
        raise ValueError(f"x: cknna needs n >= {CKNNA_MIN_SAMPLES} samples (the unbiased HSIC divides by n(n − 3)), "
                         f"got n = {n}")
    return k
