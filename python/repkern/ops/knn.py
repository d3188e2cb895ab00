"""k-nearest-neighbour alignment: ``repkern.knn``, ``repkern.mutual_knn``, ``repkern.cycle_knn``,
``repkern.cknna`` and the custom op ``repkern::knn``.

Definitions (one rule everywhere): a row's neighbours are the other rows, best first: the
largest similarity (cosine, ip) or the smallest distance (euclidean); NaN ranks after every
number; equal values rank in increasing index order; a row is never its own neighbour.

Path, never n × n: the rows are cut into blocks of t rows (t² scores in the accumulation dtype
within ``tile_bytes``, default 16 MiB, env ``REPKERN_KNN_TILE_BYTES``); for each pair of blocks
I <= J torch.matmul computes one tile x_I x_Jᵀ and ONE native call (``knn_topk_merge``, the SAE
top-k machinery: csrc/cpu/topk.h, csrc/cuda/warp_topk.cuh) streams it into the running top-k of
the rows of I (tile rows) and of the rows of J (tile columns, i.e. its transpose). The
similarity is symmetric, so the GEMM work is about half of x xᵀ; diagonal tiles (I = J) merge
their rows only, skipping the pair (i, i). Memory: O(n·k + t²) plus a normalized (cosine) or
centered (euclidean) copy of x. The candidates of every row arrive in increasing index order
(block by block), which the merge does not rely on but the k > 256 torch fallback keeps.

Euclidean ranking uses the score x̃_i·x̃_j − ½‖x̃_j‖² = ½(‖x̃_i‖² − ‖x̃_i − x̃_j‖²) on x̃ = x minus
the column medians of its finite rows (translation changes no distance and removes the common
offset that would cancel in the score; a median is a data value, so data on a grid stays on it
and exact ties stay ties); the k returned values are the distances ‖x_i − x_j‖ of the
selected pairs recomputed from the differences, and each row is sorted by them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from repkern import _common, _native, _validation, reference
from repkern._constants import KNN_MAX_K
from repkern._validation.knn import check_cknna_args, check_knn_args, check_knn_pair_args
from repkern.reference.knn import unit_rows
from repkern.results.knn import Neighbors

__all__ = ["knn", "mutual_knn", "cycle_knn", "cknna", "DEFAULT_TILE_BYTES"]

KNN_TOPK_MERGE = _native.kernel("knn_topk_merge")

DEFAULT_TILE_BYTES = 16 << 20
TILE_ALIGN = 16  # tile edges are multiples of this (vector loads of the tile rows stay aligned)


def tile_budget(tile_bytes: Optional[int]) -> int:
    """The tile budget in bytes: the argument, else REPKERN_KNN_TILE_BYTES, else 16 MiB."""
    return _validation.byte_budget("tile_bytes", tile_bytes, env="REPKERN_KNN_TILE_BYTES",
                                   default=DEFAULT_TILE_BYTES)


def tile_rows(budget: int, acc_size: int) -> int:
    """Rows per block: the largest multiple of TILE_ALIGN whose square tile fits `budget`
    (at least TILE_ALIGN)."""
    return max(TILE_ALIGN, math.isqrt(budget // acc_size) // TILE_ALIGN * TILE_ALIGN)


# ---- scores and the tiled top-k ------------------------------------------------------------


def ranking_rows(xa: Tensor, metric: str, block: int) -> tuple[Tensor, Tensor]:
    """(rows the GEMM multiplies (n, d), per-candidate bias (n,)), both in xa's dtype: the
    score of candidate j for row i is rows_i·rows_j + bias_j (larger ranks first)."""
    if metric == "cosine":
        return unit_rows(xa), xa.new_zeros(xa.shape[0])
    if metric == "ip":
        return xa, xa.new_zeros(xa.shape[0])
    centered = xa - _common.finite_row_median(xa)
    return centered, -0.5 * centered.square().sum(1)


def _merge_native(tile, col_bias, row_bias, vals, idx, col_vals, col_idx, i0, j0):
    _native.call(KNN_TOPK_MERGE, tile.device, tile, col_bias, row_bias, vals, idx, col_vals, col_idx, i0, j0)


def lexicographic_order(values: Tensor, index: Tensor, cls: Tensor, descending: bool) -> Tensor:
    """Per row of (r, m) entries: the order by class (0 before 1 before 2), then value (largest
    first when `descending`; ignored outside class 0), then index."""
    order = torch.argsort(index, dim=1, stable=True)
    v = values.gather(1, order).masked_fill(cls.gather(1, order) != 0, 0)
    order = order.gather(1, torch.argsort(v, dim=1, descending=descending, stable=True))
    return order.gather(1, torch.argsort(cls.gather(1, order), dim=1, stable=True))


def _merge_torch_side(scores, cand, selves, vals, idx):
    """Merges scores (r, c) of candidates cand (c,) for rows selves (r,) into the state
    vals/idx (r, k) in place (the native merge's contract, for k > KNN_MAX_K)."""
    k = vals.shape[1]
    all_v = torch.cat([vals, scores], 1)
    all_i = torch.cat([idx, cand.expand(scores.shape[0], -1)], 1)
    dead = torch.cat([idx < 0, cand[None, :] == selves[:, None]], 1)  # empty slot, or the row itself
    cls = torch.where(dead, 2, torch.isnan(all_v).to(torch.int64))
    keep = lexicographic_order(all_v, torch.where(dead, torch.iinfo(torch.int64).max, all_i), cls, True)[:, :k]
    vals.copy_(all_v.gather(1, keep))
    idx.copy_(torch.where(dead.gather(1, keep), -1, all_i.gather(1, keep)))


def _merge_torch(tile, col_bias, row_bias, vals, idx, col_vals, col_idx, i0, j0):
    rows = torch.arange(i0, i0 + tile.shape[0], device=tile.device)
    cols = torch.arange(j0, j0 + tile.shape[1], device=tile.device)
    _merge_torch_side(tile + col_bias, cols, rows, vals, idx)
    if col_vals is not None:
        _merge_torch_side((tile + row_bias[:, None]).T, rows, cols, col_vals, col_idx)


def scores_topk(rows: Tensor, bias: Tensor, k: int, t: int) -> tuple[Tensor, Tensor]:
    """Each row's k best candidates by score rows_i·rows_j + bias_j (j ≠ i), without the n × n
    scores: (values (n, k), indices (n, k) int64), best first. Tiles of t × t over the block
    pairs I <= J, each merged into both blocks' rows."""
    n = rows.shape[0]
    vals = rows.new_empty((n, k))
    idx = torch.full((n, k), -1, dtype=torch.int64, device=rows.device)
    merge = _merge_native if k <= KNN_MAX_K else _merge_torch
    edge = min(t, n)
    buffer = rows.new_empty(edge * edge)
    for i0 in range(0, n, t):
        i1 = min(n, i0 + t)
        for j0 in range(i0, n, t):
            j1 = min(n, j0 + t)
            tile = buffer[: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0)
            torch.matmul(rows[i0:i1], rows[j0:j1].T, out=tile)
            if j0 == i0:  # diagonal tile: its rows only (its columns are the same rows)
                merge(tile, bias[j0:j1], None, vals[i0:i1], idx[i0:i1], None, None, i0, j0)
            else:
                merge(tile, bias[j0:j1], bias[i0:i1], vals[i0:i1], idx[i0:i1], vals[j0:j1], idx[j0:j1], i0, j0)
    return vals, idx


def pair_distances(xa: Tensor, idx: Tensor, budget: int) -> Tensor:
    """‖x_i − x_idx[i, s]‖ (n, k) from the differences, in row blocks of about `budget` bytes."""
    n, k = idx.shape
    out = xa.new_empty((n, k))
    rows = max(1, budget // max(1, k * xa.shape[1] * xa.element_size()))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        out[r0:r1] = torch.linalg.vector_norm(xa[r0:r1, None, :] - xa[idx[r0:r1]], dim=2)
    return out


@torch.library.custom_op("repkern::knn", mutates_args=())
def _knn_op(x: Tensor, k: int, metric: str, tile: int) -> tuple[Tensor, Tensor]:
    xa = x.to(_common.acc_dtype(x.dtype)).contiguous()
    rows, bias = ranking_rows(xa, metric, tile)
    vals, idx = scores_topk(rows.contiguous(), bias, k, tile)
    if metric == "euclidean":
        del rows, bias
        dist = pair_distances(xa, idx, tile * tile * xa.element_size())
        order = lexicographic_order(dist, idx, torch.isnan(dist).to(torch.int64), False)
        vals, idx = dist.gather(1, order), idx.gather(1, order)
    return vals, idx


@_knn_op.register_fake
def _(x, k, metric, tile):
    n = x.shape[0]
    return x.new_empty((n, k), dtype=_common.acc_dtype(x.dtype)), x.new_empty((n, k), dtype=torch.int64)


# ---- public functions -------------------------------------------------------------------------


def knn(x: Tensor, k: int, *, metric: str = "cosine", tile_bytes: Optional[int] = None) -> Neighbors:
    """The k nearest other rows of each row of x, best first.

    Args:
        x: (n, d) samples in rows, float32/float64/float16/bfloat16, CPU or CUDA; n >= 2.
        k: 1 <= k < n.
        metric: ``"cosine"`` (similarity of the L2-normalized rows; a zero row has similarity
            0 to every row), ``"ip"`` (x_i·x_j) or ``"euclidean"`` (‖x_i − x_j‖, smallest first).
        tile_bytes: budget of one score tile (env ``REPKERN_KNN_TILE_BYTES``, default 16 MiB);
            the blocks have t rows, t² · 4 (8 for float64) <= tile_bytes, t a multiple of 16.

    Returns:
        :class:`~repkern.results.knn.Neighbors` (values, indices), both (n, k): values in the accumulation dtype (float32, float64 for
        float64 input): the similarities, or the distances for euclidean; indices int64, the
        neighbours' row numbers. Row i lists its neighbours best first: largest similarity
        (smallest distance) first, equal values in increasing index order; i itself never
        appears (a duplicate of row i does, first: similarity maximal, distance 0).

    Ties are broken by index among values that are equal as computed. Each tile comes from one
    GEMM, so two mathematically equal similarities (e.g. to two duplicate rows) compare equal
    when the arithmetic is exact, and otherwise may differ in the last bits. For euclidean the
    selection ranks by x̃_i·x̃_j − ½‖x̃_j‖² (x̃: x minus the column medians of its finite rows) and the
    values are then recomputed as ‖x_i − x_j‖ from the differences, each row re-sorted by them.

    NaN: NaN ranks after every number. Similarities involving a row that holds NaN are NaN, so
    such rows come last among every other row's neighbours, and a NaN row's own neighbours all
    tie at NaN: they are the k lowest other indices, with NaN values. Rows holding ±inf follow
    IEEE arithmetic (cosine: such a row normalizes to NaN entries).

    Not differentiable: the results carry no gradient. Never builds the n × n similarity
    matrix (see the module docstring: tiles of the upper block triangle, each merged into the
    rows of both blocks by the native top-k merge).
    """
    k = check_knn_args(x, k, metric)
    budget = tile_budget(tile_bytes)
    if _native.use_reference():
        return reference.knn(x, k, metric=metric)
    return Neighbors(*_knn_op(x.detach(), k, metric, tile_rows(budget, _common.acc_dtype(x.dtype).itemsize)))


class Edges:
    """The directed edges (rows[e], cols[e]) of a kNN graph on n nodes, each at most once, as
    sorted keys row·n + col for lookups. Batched: with (B, E) edge lists (rows may broadcast),
    B independent graphs, each queried by its own row of (B, Q) queries."""

    def __init__(self, rows: Tensor, cols: Tensor, n: int):
        self.n = n
        self.keys, self.order = torch.sort(rows * n + cols)

    def find(self, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
        """(found, position): whether each (rows[q], cols[q]) is an edge, and where it is in the
        edge list given to the constructor (meaningless where not found). One graph answers
        queries of any shape; B graphs answer (B, Q) queries."""
        query = rows * self.n + cols
        pos = torch.searchsorted(self.keys, query).clamp_max(self.keys.shape[-1] - 1)
        if self.keys.dim() == 1:
            return self.keys[pos] == query, self.order[pos]
        return self.keys.gather(-1, pos) == query, self.order.gather(-1, pos)


def sources(n: int, k: int, device) -> Tensor:
    """(n·k,) row i repeated k times: the source of each entry of a flattened (n, k) list."""
    return torch.arange(n, device=device).repeat_interleave(k)


def _pair_stat_dtype(x: Tensor, y: Tensor) -> torch.dtype:
    return _common.stat_dtype(torch.promote_types(x.dtype, y.dtype))


def mutual_knn(x: Tensor, y: Tensor, k: int, *, metric: str = "cosine",
               tile_bytes: Optional[int] = None) -> Tensor:
    """Mutual k-nearest-neighbour alignment of two representations of the same n samples.

    mean over i of ``|N_x(i) ∩ N_y(i)| / k``, with N_x(i), N_y(i) the k neighbours of row i in x
    (n, d_x) and in y (n, d_y) by :func:`knn` (same metric; default cosine, i.e. on
    L2-normalized rows as platonic-rep's ``mutual_knn``). 1 when the neighbour sets agree
    everywhere; about k/(n − 1) for unrelated representations. 0-dim tensor, float32 (float64
    when x or y is float64). NaN rows follow :func:`knn` (their neighbours are the lowest
    indices). Computed from the two (n, k) lists: O(n·k log(n·k)), no n × n mask.
    """
    k = check_knn_pair_args(x, y, k, metric)
    tile_budget(tile_bytes)
    if _native.use_reference():
        return reference.mutual_knn(x, y, k, metric=metric)
    return _from_both_lists(mutual_from_lists, x, y, k, metric, tile_bytes)


def _from_both_lists(stat, x: Tensor, y: Tensor, k: int, metric: str, tile_bytes) -> Tensor:
    """stat (mutual_from_lists or cycle_from_lists) of x's and y's kNN lists, in the pair's result dtype."""
    nx = knn(x, k, metric=metric, tile_bytes=tile_bytes)[1].reshape(-1)
    ny = knn(y, k, metric=metric, tile_bytes=tile_bytes)[1].reshape(-1)
    n = x.shape[0]
    src = sources(n, k, x.device)
    return stat(Edges(src, nx, n), src, ny, k).to(_pair_stat_dtype(x, y))


def mutual_from_lists(ex: Edges, src: Tensor, ny: Tensor, k: int) -> Tensor:
    """mutual_knn from x's kNN edges and y's flattened lists ny (..., n·k): float64 (...)."""
    shared, _ = ex.find(src, ny)
    return shared.sum(-1, dtype=torch.float64) / ny.shape[-1]


def cycle_from_lists(ex: Edges, src: Tensor, ny: Tensor, k: int) -> Tensor:
    """cycle_knn from x's kNN edges and y's flattened lists ny (..., n·k): float64 (...)."""
    back, _ = ex.find(ny, src)  # for each y-edge i -> j: is there an x-edge j -> i?
    return back.unflatten(-1, (-1, k)).any(-1).to(torch.float64).mean(-1)


def cycle_knn(x: Tensor, y: Tensor, k: int, *, metric: str = "cosine",
              tile_bytes: Optional[int] = None) -> Tensor:
    """Cycle k-nearest-neighbour alignment: the fraction of samples i that are among the
    x-neighbours of at least one y-neighbour of i (platonic-rep's ``cycle_knn``: i in
    ``knn_x[knn_y][i]``), i.e. some j in N_y(i) has i in N_x(j). Neighbours by :func:`knn`
    (same metric, default cosine). 0-dim tensor, float32 (float64 when x or y is float64).
    Computed from the two (n, k) lists (edge lookups), no (n, k, k) or n × n array.
    """
    k = check_knn_pair_args(x, y, k, metric)
    tile_budget(tile_bytes)
    if _native.use_reference():
        return reference.cycle_knn(x, y, k, metric=metric)
    return _from_both_lists(cycle_from_lists, x, y, k, metric, tile_bytes)


def sparse_hsic(n: int, rows: Tensor, cols: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Unbiased HSIC (as :func:`repkern.reference.knn.hsic_unbiased`) of two n × n matrices A, B
    that are zero except at the entries (rows[e], cols[e]) (distinct, off the diagonal), where
    they hold a[e], b[e]: Σ_ij A_ij B_ji by transposed-pair lookups, ΣA·ΣB, and
    1ᵀAB1 = Σ_j (Σ_i A_ij)(Σ_l B_jl) from column and row sums. float64. Batched: a, b, cols
    (B, E) and rows (E,) or (B, E) give B values."""
    shape = a.shape[:-1] + (n,)
    col_a = a.new_zeros(shape).scatter_add_(-1, cols.expand(a.shape), a)
    row_b = b.new_zeros(shape).scatter_add_(-1, rows.expand(b.shape), b)
    found, pos = Edges(rows, cols, n).find(cols, rows)  # (j, i) for each entry (i, j)
    trace_ab = (a * torch.where(found, b.gather(-1, pos), 0)).sum(-1)
    value = trace_ab + a.sum(-1) * b.sum(-1) / ((n - 1) * (n - 2)) - 2 * (col_a * row_b).sum(-1) / (n - 2)
    return value / (n * (n - 3))


def cknna_cross(ek: Edges, vk: Tensor, src: Tensor, il: Tensor, vl: Tensor, n: int) -> Tensor:
    """sim(K, L) of cknna from x's kNN edges ek with their similarities vk (n·k,) float64 and
    y's flattened lists il, vl (..., n·k): the masked entries are the L entries that are also
    K edges. float64 (...)."""
    in_k, pos = ek.find(src, il)
    a = torch.where(in_k, vk[pos], 0)
    b = torch.where(in_k, vl, 0)
    return sparse_hsic(n, src, il, a, b)


def cknna_value(kl: Tensor, kk: Tensor, ll: Tensor) -> Tensor:
    """sim(K, L) / sqrt(sim(K, K)·sim(L, L)); NaN where that product is <= 0."""
    denom = kk * ll
    return torch.where(denom > 0, kl / denom.clamp_min(torch.finfo(torch.float64).tiny).sqrt(),
                       torch.full_like(kl, math.nan))


def cknna(x: Tensor, y: Tensor, k: int, *, tile_bytes: Optional[int] = None) -> Tensor:
    """Centered kernel nearest-neighbour alignment (platonic-rep's ``cknna``, unbiased, without
    its +1e-6 in the denominator).

    K = x̂x̂ᵀ, L = ŷŷᵀ on L2-normalized rows of x (n, d_x), y (n, d_y); mask_K[i, j] = 1 when j
    is among the k neighbours of i (:func:`knn`, cosine: diagonal excluded, ties → lower index),
    likewise mask_L. sim(A, B) = HSIC₁(m∘A, m∘B), m = mask_A ∘ mask_B, with Song et al.'s
    unbiased estimator written (as platonic-rep does) for matrices that need not be symmetric:
    [Σ_ij Ã_ij B̃_ji + ΣÃ·ΣB̃/((n−1)(n−2)) − 2·1ᵀÃB̃1/(n−2)] / (n(n−3)), Ã = A with a zero
    diagonal. cknna = sim(K, L) / sqrt(sim(K, K)·sim(L, L)); NaN when that product is <= 0
    (e.g. k = 1 can make a self-similarity 0) and when x or y holds a NaN row.

    Only the n·k masked entries are ever non-zero, so every term comes from the two kNN lists
    and their similarity values (sparse sums, row/column sums, transposed-pair lookups), summed
    in float64: O(n·k log(n·k)) after the two kNN searches, no n × n array. Needs n >= 4.
    0-dim tensor, float32 (float64 when x or y is float64).
    """
    k = check_cknna_args(x, y, k)
    tile_budget(tile_bytes)
    if _native.use_reference():
        return reference.cknna(x, y, k)
    n = x.shape[0]
    vk, ik = knn(x, k, metric="cosine", tile_bytes=tile_bytes)
    vl, il = knn(y, k, metric="cosine", tile_bytes=tile_bytes)
    src = sources(n, k, x.device)
    ik, il = ik.reshape(-1), il.reshape(-1)
    vk, vl = vk.reshape(-1).double(), vl.reshape(-1).double()
    kl = cknna_cross(Edges(src, ik, n), vk, src, il, vl, n)
    kk = sparse_hsic(n, src, ik, vk, vk)
    ll = sparse_hsic(n, src, il, vl, vl)
    return cknna_value(kl, kk, ll).to(_pair_stat_dtype(x, y))
