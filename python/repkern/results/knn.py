"""The result of :func:`repkern.knn` (and :func:`repkern.reference.knn`)."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Neighbors(NamedTuple):
    """Each row's k nearest other rows, best first (like ``torch.topk``'s result).

    Fields:

    - ``values``: (n, k) similarities (cosine, ip) or distances (euclidean), in the
      accumulation dtype (float32; float64 for float64 input).
    - ``indices``: (n, k) int64 row numbers of the neighbours.
    """

    values: Tensor
    indices: Tensor
