"""Arguments of :func:`repkern.shape_distance`, and the (x, y) pair checks that the CCA and RSA families
share with it."""

from __future__ import annotations

import numbers

import torch

from repkern._validation.cka import check_same_kind
from repkern._validation.common import choice, floating_tensor

SHAPE_SCORES = ("angular", "euclidean")


def check_matrix(name: str, t, *, min_samples: int, estimator: str) -> torch.Tensor:
    """A floating 2-D ``(n, d)`` tensor with n >= min_samples rows and d >= 1 columns."""
    floating_tensor(name, t, min_dim=2, shape_hint="(shape (n, d))")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (n, d) tensor, got shape {tuple(t.shape)}")
    if t.shape[1] < 1:
        raise ValueError(f"{name}: needs d >= 1 features, got shape {tuple(t.shape)}")
    if t.shape[0] < min_samples:
        raise ValueError(f"{name}: {estimator} needs n >= {min_samples} samples (rows), got n={t.shape[0]}")
    return t


def check_pair(x, y, *, min_samples: int, estimator: str) -> None:
    """x (n, d1), y (n, d2): 2-D, same n, dtype and device, n >= min_samples."""
    floating_tensor("x", x, min_dim=2, shape_hint="(shape (n, d1))")
    floating_tensor("y", y, min_dim=2, shape_hint="(shape (n, d2))")
    for name, t in (("x", x), ("y", y)):
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D (n, d) tensor, got shape {tuple(t.shape)}")
    check_same_kind("y", y, "x", x)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y: has n={y.shape[0]} samples (rows) but x has n={x.shape[0]} (shapes {tuple(x.shape)}, "
                         f"{tuple(y.shape)})")
    check_matrix("x", x, min_samples=min_samples, estimator=estimator)
    check_matrix("y", y, min_samples=min_samples, estimator=estimator)


def alpha_value(alpha) -> float:
    """The partial-whitening parameter: a real number in [0, 1]."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha: expected a real number in [0, 1], got {type(alpha).__name__}")
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:  # NaN fails it too (math.isnan cannot take a float traced by torch.compile)
        raise ValueError(f"alpha: expected a number in [0, 1] (1: rotations only, 0: full whitening), got {alpha}")
    return alpha


def check_shape_options(alpha, score) -> float:
    """alpha and score of :func:`shape_distance` (also the streaming ``compute`` options); returns alpha."""
    alpha = alpha_value(alpha)
    choice("score", score, SHAPE_SCORES)
    return alpha


def check_shape_args(x, y, alpha, score) -> float:
    """Validates :func:`shape_distance`'s arguments; returns alpha as a float."""
    check_pair(x, y, min_samples=2, estimator="shape_distance (column centering)")
    return check_shape_options(alpha, score)


def rank_deficient_error(name: str, rank: int, width: int, padded: int, n: int) -> ValueError:
    """The error of full whitening (alpha=0) of a representation without full column rank."""
    if padded > width:
        why = (f"it is zero-padded from {width} to {padded} columns to match the wider input (padded columns have "
               "no variance)")
    else:
        why = f"its centered columns have numerical rank {rank} < d={width} (n={n} samples)"
    return ValueError(f"{name}: full whitening (alpha=0) needs full column rank, but {why}; the whitened distance is "
                      "not defined there. Use partial whitening, alpha > 0 (e.g. alpha=0.01)")
