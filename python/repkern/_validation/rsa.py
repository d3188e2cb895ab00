"""Arguments of :func:`repkern.rdm` and :func:`repkern.rsa`."""

from __future__ import annotations

from repkern._validation.common import choice
from repkern._validation.shape import check_matrix, check_pair

RDM_METRICS = ("correlation", "euclidean")
RSA_COMPARISONS = ("spearman", "pearson")


def _check_features(name: str, t, metric: str) -> None:
    if metric == "correlation" and t.shape[1] < 2:
        raise ValueError(f"{name}: the correlation distance between patterns (rows) needs d >= 2 features, got "
                         f"shape {tuple(t.shape)}")


def check_rdm_args(x, metric: str) -> None:
    """x (n, d): n >= 2 patterns (rows); the correlation distance needs d >= 2 features per pattern."""
    choice("metric", metric, RDM_METRICS)
    check_matrix("x", x, min_samples=2, estimator="an RDM (one pair of patterns)")
    _check_features("x", x, metric)


def check_rsa_args(x, y, rdm: str, compare: str) -> None:
    """x (n, d1), y (n, d2): the same n >= 3 patterns (conditions) as rows."""
    choice("rdm", rdm, RDM_METRICS)
    choice("compare", compare, RSA_COMPARISONS)
    check_pair(x, y, min_samples=3, estimator="rsa (a correlation of >= 3 dissimilarities)")
    _check_features("x", x, rdm)
    _check_features("y", y, rdm)
