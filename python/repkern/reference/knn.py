"""k-nearest-neighbour alignment in plain PyTorch: :func:`knn`, :func:`mutual_knn`,
:func:`cycle_knn`, :func:`cknna`. Each builds the n × n similarity matrix (the fast ops
never do); the definitions are those of :mod:`repkern.ops.knn`.

Ranking, everywhere: best first (largest similarity, smallest distance), NaN after every
number, equal values in increasing index order; a row is never its own neighbour."""

from __future__ import annotations

import torch

from repkern._common import acc_dtype, stat_dtype
from repkern._validation.knn import check_cknna_args, check_knn_args, check_knn_pair_args
from repkern.results.knn import Neighbors


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x (n, d) with each row divided by its L2 norm; zero rows stay zero (similarity 0 to
    every row), rows holding NaN stay NaN."""
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / torch.where(norms > 0, norms, torch.ones_like(norms))


def similarities(x: torch.Tensor, metric: str) -> torch.Tensor:
    """(n, n) in the accumulation dtype: cosine similarities, inner products, or Euclidean
    distances ‖x_i − x_j‖ (computed from the differences, not from inner products)."""
    xa = x.to(acc_dtype(x.dtype))
    if metric == "cosine":
        u = unit_rows(xa)
        return u @ u.T
    if metric == "ip":
        return xa @ xa.T
    return torch.cdist(xa, xa, compute_mode="donot_use_mm_for_euclid_dist")


def rank_order(s: torch.Tensor, descending: bool) -> torch.Tensor:
    """(n, n) int64: each row's columns in rank order: best value first (largest when
    `descending`), NaN after every number, ties in increasing column order, the diagonal
    (the row itself) last."""
    nan = torch.isnan(s)
    order = torch.sort(s.masked_fill(nan, 0), dim=1, descending=descending, stable=True).indices
    cls = nan.to(torch.int8)
    cls.fill_diagonal_(2)
    return order.gather(1, torch.sort(cls.gather(1, order), dim=1, stable=True).indices)


def knn(x: torch.Tensor, k: int, *, metric: str = "cosine") -> Neighbors:
    """The k nearest other rows of x (n, d): Neighbors(values (n, k) in the accumulation
    dtype, indices (n, k) int64), best first. See :func:`repkern.knn`."""
    k = check_knn_args(x, k, metric)
    s = similarities(x, metric)
    idx = rank_order(s, descending=metric != "euclidean")[:, :k]
    return Neighbors(s.gather(1, idx), idx)


def neighbour_mask(idx: torch.Tensor) -> torch.Tensor:
    """(n, n) bool: mask[i, j] = j is among the neighbours idx[i] of row i."""
    n = idx.shape[0]
    return torch.zeros(n, n, dtype=torch.bool, device=idx.device).scatter_(1, idx, True)


def _pair_dtype(x: torch.Tensor, y: torch.Tensor) -> torch.dtype:
    return stat_dtype(torch.promote_types(x.dtype, y.dtype))


def mutual_knn(x: torch.Tensor, y: torch.Tensor, k: int, *, metric: str = "cosine") -> torch.Tensor:
    """mean over i of ``|N_x(i) ∩ N_y(i)| / k``. See :func:`repkern.mutual_knn`."""
    k = check_knn_pair_args(x, y, k, metric)
    shared = neighbour_mask(knn(x, k, metric=metric)[1]) & neighbour_mask(knn(y, k, metric=metric)[1])
    return (shared.sum(dtype=torch.float64) / (x.shape[0] * k)).to(_pair_dtype(x, y))


def cycle_knn(x: torch.Tensor, y: torch.Tensor, k: int, *, metric: str = "cosine") -> torch.Tensor:
    """Fraction of rows i that are among the x-neighbours of some y-neighbour of i
    (``knn_x[knn_y]`` contains i). See :func:`repkern.cycle_knn`."""
    k = check_knn_pair_args(x, y, k, metric)
    nx, ny = knn(x, k, metric=metric)[1], knn(y, k, metric=metric)[1]
    n = x.shape[0]
    hit = (nx[ny] == torch.arange(n, device=x.device)[:, None, None]).reshape(n, -1).any(1)
    return hit.to(torch.float64).mean().to(_pair_dtype(x, y))


def hsic_unbiased(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Song et al.'s unbiased HSIC of (n, n) matrices a, b, written for matrices that need
    not be symmetric: [Σ_ij Ã_ij B̃_ji + ΣÃ ΣB̃ / ((n−1)(n−2)) − 2 Σ(Ã B̃) / (n−2)] / (n(n−3)),
    Ã, B̃ = a, b with the diagonal set to 0."""
    n = a.shape[0]
    at, bt = a.clone(), b.clone()
    at.fill_diagonal_(0)
    bt.fill_diagonal_(0)
    value = (at * bt.T).sum() + at.sum() * bt.sum() / ((n - 1) * (n - 2)) - 2 * (at @ bt).sum() / (n - 2)
    return value / (n * (n - 3))


def cknna(x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Centered kernel nearest-neighbour alignment: K = x̂x̂ᵀ, L = ŷŷᵀ on L2-normalized rows,
    sim(A, B) = HSIC₁(m∘A, m∘B) with m = mask_A ∘ mask_B (kNN masks, diagonal excluded);
    cknna = sim(K, L) / sqrt(sim(K, K)·sim(L, L)), NaN where that product is <= 0. The HSIC
    terms are summed in float64. See :func:`repkern.cknna`."""
    k = check_cknna_args(x, y, k)
    sk, sl = similarities(x, "cosine"), similarities(y, "cosine")
    mk = neighbour_mask(rank_order(sk, descending=True)[:, :k])
    ml = neighbour_mask(rank_order(sl, descending=True)[:, :k])
    kd, ld = sk.double(), sl.double()

    def sim(a, b, mask):
        zero = torch.zeros((), dtype=torch.float64, device=a.device)
        return hsic_unbiased(torch.where(mask, a, zero), torch.where(mask, b, zero))

    kl, kk, ll = sim(kd, ld, mk & ml), sim(kd, kd, mk), sim(ld, ld, ml)
    denom = kk * ll
    value = torch.where(denom > 0, kl / denom.clamp_min(torch.finfo(torch.float64).tiny).sqrt(),
                        torch.full_like(kl, float("nan")))
    return value.to(_pair_dtype(x, y))
