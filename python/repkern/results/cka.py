"""How the CKA family computes a problem: :class:`CkaPlan`, returned by :func:`repkern.cka_plan`."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class CkaPlan:
    """How :func:`cka` / :func:`hsic` / :func:`cka_matrix` compute (see :func:`cka_plan`).

    Attributes:
        method: ``"feature"`` (linear kernel, d×d products), ``"gram"`` (one n×n
            inner-product buffer per matrix) or ``"tiled"`` (Gram tiles, O(n) memory).
        tile: rows of a Gram tile (tiled forward; every backward recomputes tiles of this size).
        median: RBF without sigma: ``"exact"`` (numpy median of all distances) or
            ``"sampled"`` (tiled, when selecting among the n(n−1)/2 distances would
            exceed the budget — the packed distances plus two working copies: the
            distances among ``median_sample_rows`` rows drawn with seed ``median_seed``).
        gram_bytes: bytes of the n×n matrices the "gram" method holds at once.
        max_gram_bytes: the memory budget in force.
    """

    method: str
    tile: int
    median: Optional[str]
    median_sample_rows: Optional[int]
    median_seed: Optional[int]
    gram_bytes: int
    max_gram_bytes: int

