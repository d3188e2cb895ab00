"""HSIC and CKA: ``repkern.hsic``, ``repkern.cka``, ``repkern.cka_from_grams``,
``repkern.cka_matrix`` and ``repkern.cka_plan``.

Math: from the terms of ``repkern::hsic_terms`` (below),
for a pair of matrices with Σ K∘L = S, row sums r_K, r_L, diagonals δ_K, δ_L:

    biased    h = S − (2/n) r_K·r_L + (Σ r_K)(Σ r_L)/n²              = tr(KHLH)
    unbiased  h = S̃ + (Σ r̃_K)(Σ r̃_L)/((n−1)(n−2)) − (2/(n−2)) r̃_K·r̃_L  = n(n−3)·HSIC₁
              with S̃ = S − δ_K·δ_L, r̃ = r − δ  (K̃ = K with its diagonal zeroed)

HSIC = h/(n−1)² (biased) or h/(n(n−3)) (unbiased); CKA = h_KL / sqrt(h_KK h_LL),
the same estimator in all three places (Kornblith et al.'s ``debiased``). All of
it in float64, differentiable (the terms op has a backward).

Linear kernel in feature space (cost n·d1·d2 instead of n²(d1+d2)), X, Y
column-centered: h = ‖YᵀX‖²_F, unbiased h = ‖YᵀX‖²_F − (n/(n−2)) aᵀb +
(Σa)(Σb)/((n−1)(n−2)) with a_i = ‖x_i‖², b_i = ‖y_i‖².

Scale: the linear paths divide x by a power of two near max |x| (exact in every
float format, applied as two factors so that even a subnormal peak scales up),
then center it twice: the second pass removes the rounding error of the first
mean, which would otherwise stay behind as a common offset of every row (the
feature path assumes exactly centered columns; data with |mean| ≫ std lost
~1e-4 of CKA to it). Neither float32 products nor 16-bit inputs overflow or
underflow; HSIC is scaled back in float64. Cosine rows are rescaled by powers of
two (exact, cosine is invariant) so that their products stay in range; RBF
Grams need no scaling.

The HSIC terms, the custom ops every estimator is built on: for m symmetric n×n Gram matrices K_a and requested pairs p = (a, b), the op
``repkern::hsic_terms`` returns, in float64:

    cross[p] = Σ_ij K_a,ij K_b,ij      row_sums[a] = K_a 1      diag[a] = diag(K_a)

from which every estimator below is O(n). One native kernel reads each
Gram block once and turns inner products into kernel values on the fly (the
Gram epilogue math), so no K, HKH or K̃ is written. Two drivers:

- untiled (tile >= n): each matrix's upper-triangle inner products by the Gram
  op's row-strip GEMM (one n×n buffer per matrix), one kernel call for all pairs;
  RBF median: distances in place, exact selection (same as ``repkern.gram``).
- tiled (tile < n, O(n) memory): tile pairs (i, j >= i) of every matrix by
  torch.mm into tile-sized buffers, one kernel call per tile pair accumulating
  into the same float64 outputs. RBF median: exact (packed upper-triangle
  distances, by row strips) when ``median_sample_rows == 0``, else the
  sampled estimate of :func:`_median_sampled`.

Matrix a of ``xs`` (a list of (B, n, d_i) tensors) is xs[a // B][a % B].

Backward (``repkern::hsic_terms_backward``) recomputes Gram tiles of at most
``tile`` rows instead of storing any n×n matrix.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from repkern import _common, _native, _validation, reference
from repkern._constants import GramKind, GramPass
from repkern.ops import gram as gram_ops
from repkern.results.cka import CkaPlan

__all__ = ["hsic", "cka", "cka_from_grams", "cka_matrix", "cka_plan", "CkaPlan", "DEFAULT_MAX_GRAM_BYTES",
           "MEDIAN_MIN_SAMPLE_ROWS", "MEDIAN_SAMPLE_ROWS", "MEDIAN_SEED"]

HSIC_TERMS = _native.kernel("hsic_terms")

DEFAULT_MAX_GRAM_BYTES = 1 << 30  # env REPKERN_MAX_GRAM_BYTES or argument max_gram_bytes override it
METHODS = ("auto", "feature", "gram", "tiled")
MAX_TILE = 2048  # a bigger tile only costs memory: GEMMs of 2048 rows already run near the matmul rate
TILE_COPIES = 3  # tile-sized buffers per matrix at the peak (forward block; backward K and G stacks)
MEDIAN_WORKING_COPIES = 3  # exact median selection: packed distances, kthvalue's copy, one pass's temporary

# ---- HSIC terms: repkern::hsic_terms, repkern::hsic_terms_backward, repkern::hsic_terms_from_grams ----

# Sampled RBF median (tiled path, when the n(n−1)/2 distances exceed the memory
# budget): all distances among this many rows drawn without replacement by a
# torch.Generator seeded with MEDIAN_SEED (same rows for the same n, every call).
MEDIAN_SAMPLE_ROWS = 4096
MEDIAN_SEED = 0
# Fewest sampled rows (64·63/2 = 2016 distances) that make a median estimate: a budget that allows fewer
# (and not the exact median) is a ValueError naming max_gram_bytes, not a median of a handful of pairs.
MEDIAN_MIN_SAMPLE_ROWS = 64



def _matrices(xs: list[Tensor]) -> list[Tensor]:
    """Matrix a -> its (n, d) samples xs[a // B][a % B]."""
    return [x[b] for x in xs for b in range(x.shape[0])]


def _pairs_tensor(pairs: list[int]) -> Tensor:
    return torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)  # host memory: the launchers plan from it


def _native_terms(kind, blocks, aux, scale, pairs_t, cross, row_sums, diag, r0, c0, diagonal) -> None:
    _native.call(HSIC_TERMS, cross.device, int(kind), [_native.view(b) for b in blocks], aux, scale, pairs_t,
                 cross, row_sums, diag, r0, c0, diagonal)


def _row_aux(kind: GramKind, mats: list[Tensor]) -> Optional[Tensor]:
    """(m, n) per-row factor of the tiled path (gram_math.h): ‖x_i‖² for RBF,
    1/‖x_i‖ for cosine (0 for a zero row, NaN stays NaN)."""
    if kind == GramKind.LINEAR:
        return None
    sq = torch.stack([(x * x).sum(-1) for x in mats])
    if kind == GramKind.RBF:
        return sq
    return torch.where(sq > 0, sq.rsqrt(), torch.where(sq == 0, torch.zeros_like(sq), sq))


# ---- RBF median bandwidth on the tiled path ------------------------------------------------


def _packed_start(r: int, n: int) -> int:
    """Packed row-major index of (r, r + 1) in the strict upper triangle of n×n."""
    return r * (n - 1) - r * (r - 1) // 2


def _median_exact_tiled(x: Tensor, offdiag: bool, tile: int) -> tuple[Tensor, Tensor]:
    """Exact numpy-style median of ‖x_i − x_j‖² for x (n, d) without an n×n matrix:
    row strips of about tile² entries write the strict upper triangle into one packed
    n(n−1)/2 buffer. Returns (median (), flat positions i·n + j (2,))."""
    n = x.shape[0]
    values = x.new_empty(n * (n - 1) // 2)
    sq = (x * x).sum(-1)
    rows = max(1, tile * tile // n)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        d = ((sq[r0:r1, None] + sq[None, r0:]) - 2 * (x[r0:r1] @ x[r0:].T)).clamp_min_(0)
        for i in range(r0, min(r1, n - 1)):  # row slices (a boolean-mask gather is several times slower)
            start = _packed_start(i, n)
            values[start : start + n - 1 - i] = d[i - r0, i + 1 - r0 :]
    med, positions = gram_ops.median_from_upper(values[None], n, offdiag)
    return med[0], positions[0]


def _median_sampled(x: Tensor, offdiag: bool, sample_rows: int) -> tuple[Tensor, Tensor]:
    """Estimate of the median of ‖x_i − x_j‖² for x (n, d): the distances among
    `sample_rows` rows (seeded, MEDIAN_SEED) stand for the n(n−1)/2 distinct ones,
    and each rank of the full convention (n diagonal zeros among n², or the n(n−1)
    off-diagonal entries) is taken at the same quantile of the sample. Returns
    (median (), flat positions (2,) in x's row numbering)."""
    n = x.shape[0]
    generator = torch.Generator().manual_seed(MEDIAN_SEED)
    rows = torch.randperm(n, generator=generator)[:sample_rows].sort().values.to(x.device)
    s = rows.numel()
    d = gram_ops.inner_products(x[rows][None])
    gram_ops.epilogue(GramKind.SQDIST, GramPass.WRITE, d, d)
    upper = torch.ones(s, s, dtype=torch.bool, device=x.device).triu_(1)
    values = d[0][upper]
    del d
    distinct, sampled = n * (n - 1) // 2, values.numel()
    total, zeros = (n * (n - 1), 0) if offdiag else (n * n, n)
    meds, positions = [], []
    for rank in ((total + 1) // 2, total // 2 + 1):  # 1-based ranks in the full multiset
        if rank <= zeros:
            meds.append(values.new_zeros(()))
            positions.append(torch.zeros((), dtype=torch.int64, device=x.device))
            continue
        k = (rank - zeros + 1) // 2  # rank among the distinct off-diagonal values
        k_sample = min(sampled, max(1, round(k * sampled / distinct)))
        value, index = torch.kthvalue(values, k_sample)
        flat = gram_ops.upper_to_flat(index[None], s)[0]
        meds.append(value)
        positions.append(rows[flat // s] * n + rows[flat % s])
    return (meds[0] + meds[1]) / 2, torch.stack(positions)


# ---- forward drivers -------------------------------------------------------------------


def _untiled(xs, kernel, scale, median, threshold, pairs_t, cross, row_sums, diag):
    """One n×n inner-product buffer per matrix (upper tiles filled), one kernel call."""
    kind = gram_ops.KINDS[kernel]
    blocks, aux, scales, positions = [], [], [], []
    for x in xs:
        inner = gram_ops.inner_products(x)
        if kind == GramKind.RBF and scale is None:
            gram_ops.epilogue(GramKind.SQDIST, GramPass.WRITE, inner, inner)  # distances, in place
            med, pos = gram_ops.median_sq_dist(inner, median == "offdiag")
            scales.append(-0.5 / (threshold**2 * med))
            positions.append(pos)
        elif kind != GramKind.LINEAR:
            aux.append(gram_ops.row_factors(kind, inner))
        blocks += list(inner.unbind(0))
    if scales:
        kind, scale = GramKind.RBF_FROM_SQDIST, torch.cat(scales)
    aux_t = torch.cat(aux) if aux else None
    _native_terms(kind, blocks, aux_t, scale, pairs_t, cross, row_sums, diag, 0, 0, True)
    return scale, torch.cat(positions) if positions else None


def _tiled(xs, kernel, scale, median, threshold, pairs_t, tile, median_sample_rows, cross, row_sums, diag):
    """Tile pairs (i, j >= i) of all matrices, tile-sized buffers only."""
    kind = gram_ops.KINDS[kernel]
    mats = _matrices(xs)
    n = mats[0].shape[0]
    positions = None
    if kind == GramKind.RBF and scale is None:
        meds, pos = [], []
        for x in mats:
            if median_sample_rows:
                med, p = _median_sampled(x, median == "offdiag", median_sample_rows)
            else:
                med, p = _median_exact_tiled(x, median == "offdiag", tile)
            meds.append(med)
            pos.append(p)
        scale = -0.5 / (threshold**2 * torch.stack(meds))
        positions = torch.stack(pos)
    aux = _row_aux(kind, mats)
    buffers = [x.new_empty(tile * tile) for x in mats]
    for r0 in range(0, n, tile):
        for c0 in range(r0, n, tile):
            rows, cols = min(tile, n - r0), min(tile, n - c0)
            blocks = [buf[: rows * cols].view(rows, cols) for buf in buffers]
            for x, block in zip(mats, blocks):
                torch.mm(x[r0 : r0 + rows], x[c0 : c0 + cols].T, out=block)
            _native_terms(kind, blocks, aux, scale, pairs_t, cross, row_sums, diag, r0, c0, r0 == c0)
    return scale, positions


# ---- repkern::hsic_terms -------------------------------------------------------------------


@torch.library.custom_op("repkern::hsic_terms", mutates_args=())
def _hsic_terms_op(
    xs: list[Tensor],
    kernel: str,
    scale: Optional[Tensor],
    median: str,
    threshold: float,
    pairs: list[int],
    tile: int,
    median_sample_rows: int,
    backward_tile: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """xs: (B, n, d_i) float32/float64, m = B·len(xs) matrices; pairs: flat (a, b, a, b, ...).
    rbf: scale (m,) = −1/(2σ²), or None for the median heuristic (threshold, median).
    tile >= n: untiled; else tiled with tile×tile blocks (median_sample_rows: 0 for
    the exact median, else the sampled estimate). backward_tile: tile rows of the
    backward's recomputation. Returns (cross (P,), row_sums (m, n), diag (m, n)) in float64, the scale used (m,)
    and the median positions (m, 2) (flat i·n + j; −1 without a median)."""
    mats_per_input = xs[0].shape[0]
    n = xs[0].shape[1]
    m = mats_per_input * len(xs)
    device, acc = xs[0].device, xs[0].dtype
    pairs_t = _pairs_tensor(pairs)
    cross = torch.zeros(pairs_t.shape[0], dtype=torch.float64, device=device)
    row_sums = torch.zeros((m, n), dtype=torch.float64, device=device)
    diag = torch.zeros((m, n), dtype=torch.float64, device=device)
    if tile >= n:
        scale_used, positions = _untiled(xs, kernel, scale, median, threshold, pairs_t, cross, row_sums, diag)
    else:
        scale_used, positions = _tiled(xs, kernel, scale, median, threshold, pairs_t, tile, median_sample_rows,
                                       cross, row_sums, diag)
    scale_used = scale_used.clone() if scale_used is not None else torch.zeros(m, dtype=acc, device=device)
    if positions is None:
        positions = torch.full((m, 2), -1, dtype=torch.int64, device=device)
    return cross, row_sums, diag, scale_used, positions


@_hsic_terms_op.register_fake
def _(xs, kernel, scale, median, threshold, pairs, tile, median_sample_rows, backward_tile):
    m, n = xs[0].shape[0] * len(xs), xs[0].shape[1]
    x = xs[0]
    f64 = torch.float64
    return (x.new_empty(len(pairs) // 2, dtype=f64), x.new_empty((m, n), dtype=f64), x.new_empty((m, n), dtype=f64),
            x.new_empty(m), x.new_empty((m, 2), dtype=torch.int64))


def _hsic_terms_setup_context(ctx, inputs, output):
    xs, kernel, scale, median, threshold, pairs, _, _, backward_tile = inputs
    _, _, _, scale_used, positions = output
    ctx.kernel, ctx.threshold, ctx.pairs, ctx.tile = kernel, threshold, pairs, backward_tile
    ctx.from_median = kernel == "rbf" and scale is None
    ctx.num_inputs = len(xs)
    ctx.mark_non_differentiable(scale_used, positions)
    ctx.save_for_backward(*xs, scale_used, positions)


def _hsic_terms_backward(ctx, grad_cross, grad_row_sums, grad_diag, _grad_scale, _grad_positions):
    saved = ctx.saved_tensors
    xs, scale_used, positions = list(saved[: ctx.num_inputs]), saved[-2], saved[-1]
    grads = torch.ops.repkern.hsic_terms_backward(
        xs, ctx.kernel, scale_used, positions, ctx.from_median, ctx.threshold, ctx.pairs, ctx.tile,
        grad_cross, grad_row_sums, grad_diag)
    return grads, None, None, None, None, None, None, None, None


_hsic_terms_op.register_autograd(_hsic_terms_backward, setup_context=_hsic_terms_setup_context)


# ---- repkern::hsic_terms_backward ------------------------------------------------------------


def _pair_coefficients(pairs: list[int], grad_cross: Tensor, m: int, dtype: torch.dtype) -> Tensor:
    """c (m, m) with dL/dK_a = Σ_b c_ab K_b from the cross terms: pair (a, b) adds its
    gradient to c_ab and c_ba (so a self pair, Σ K_a∘K_a, adds it twice)."""
    pairs_t = _pairs_tensor(pairs).to(grad_cross.device)
    coef = torch.zeros((m, m), dtype=dtype, device=grad_cross.device)
    g = grad_cross.to(dtype)
    coef.index_put_((pairs_t[:, 0], pairs_t[:, 1]), g, accumulate=True)
    return coef.index_put_((pairs_t[:, 1], pairs_t[:, 0]), g, accumulate=True)


def _kernel_tile(kind: GramKind, xi: Tensor, xj: Tensor, aux_i, aux_j, scale, diagonal: bool):
    """K block (rows of xi × rows of xj) with the forward's semantics (gram_math.h,
    hsic_diag_entry); for RBF also the squared distances."""
    g = xi @ xj.T
    if kind == GramKind.LINEAR:
        return g, None
    if kind == GramKind.COSINE:
        k = g * aux_i[:, None] * aux_j[None, :]
        if diagonal:
            k.diagonal().copy_((aux_i > 0).to(k.dtype))
        return k, None
    d = (aux_i[:, None] + aux_j[None, :] - 2 * g).clamp_min(0)
    if diagonal:
        d.diagonal().zero_()
    k = torch.where(d == 0, torch.ones_like(d), torch.exp(scale * d))  # σ = 0 limit: 1 where rows coincide
    return k, d


@torch.library.custom_op("repkern::hsic_terms_backward", mutates_args=())
def _hsic_terms_backward_op(
    xs: list[Tensor],
    kernel: str,
    scale: Tensor,
    positions: Tensor,
    from_median: bool,
    threshold: float,
    pairs: list[int],
    tile: int,
    grad_cross: Tensor,
    grad_row_sums: Tensor,
    grad_diag: Tensor,
) -> list[Tensor]:
    """Gradient of the terms w.r.t. xs, recomputing Gram tiles of at most `tile` rows.

    For matrix a, dL/dK_a = G_a = Σ_b c_ab K_b + (grad_row_sums_a) 1ᵀ + diag(grad_diag_a)
    (c_ab: grad_cross of pair (a, b), doubled for a = b). On a tile pair i < j both
    K_ij and its mirror K_ji depend on the same rows, so the tile carries
    Ĝ = 2 Σ_b c_ab K_b + r_i + r_j; a diagonal tile carries G itself. Then the chain
    through the kernel function: linear K = x xᵀ; cosine through u = x/‖x‖; RBF
    K = exp(s D) with dD_ij/dx_i = 2(x_i − x_j), plus the median bandwidth's path
    (s = −1/(2 t² median)) when it came from the median."""
    kind = gram_ops.KINDS[kernel]
    mats = _matrices(xs)
    m, n = len(mats), mats[0].shape[0]
    acc = mats[0].dtype
    coef = _pair_coefficients(pairs, grad_cross, m, acc)
    grad_rows, grad_diag_a = grad_row_sums.to(acc), grad_diag.to(acc)

    if kind == GramKind.COSINE:
        norms = torch.stack([x.norm(dim=-1) for x in mats])
        nonzero = norms > 0
        safe = torch.where(nonzero, norms, torch.ones_like(norms))
        points = [x / s[:, None] for x, s in zip(mats, safe)]  # u; the chain to x at the end
    else:
        points = mats
    aux = _row_aux(kind, mats)
    finite = torch.isfinite(scale)
    step = torch.where(finite, scale, torch.zeros_like(scale))  # σ = 0 limit: zero gradient
    grads = [torch.zeros_like(p) for p in points]
    grad_scale = torch.zeros(m, dtype=acc, device=mats[0].device)
    tile = min(tile, n)
    for r0 in range(0, n, tile):
        for c0 in range(r0, n, tile):
            i_sl, j_sl = slice(r0, min(n, r0 + tile)), slice(c0, min(n, c0 + tile))
            diagonal = r0 == c0
            tiles = [
                _kernel_tile(kind, mats[a][i_sl], mats[a][j_sl], None if aux is None else aux[a, i_sl],
                             None if aux is None else aux[a, j_sl], scale[a], diagonal)
                for a in range(m)
            ]
            ks = torch.stack([k for k, _ in tiles])
            rows, cols = ks.shape[1], ks.shape[2]
            g_all = (coef @ ks.reshape(m, -1)).reshape(m, rows, cols)
            for a in range(m):
                k, d = tiles[a]
                if diagonal:
                    gt = g_all[a] + grad_rows[a, i_sl, None]
                    gt.diagonal().add_(grad_diag_a[a, i_sl])
                else:
                    gt = 2 * g_all[a] + grad_rows[a, i_sl, None] + grad_rows[a, None, j_sl]
                p_i, p_j = points[a][i_sl], points[a][j_sl]
                if kind == GramKind.RBF:
                    grad_scale[a] += (gt * k * d).sum()
                    w = gt * k * step[a]  # dL/dD
                    grads[a][i_sl] += 2 * (w.sum(1, keepdim=True) * p_i - w @ p_j)
                    grads[a][j_sl] += 2 * (w.sum(0)[:, None] * p_j - w.T @ p_i)
                else:
                    grads[a][i_sl] += gt @ p_j
                    grads[a][j_sl] += gt.T @ p_i
    if kind == GramKind.COSINE:
        for a, (u, gu) in enumerate(zip(points, grads)):
            projected = (gu - (gu * u).sum(-1, keepdim=True) * u) / safe[a][:, None]
            grads[a] = torch.where(nonzero[a][:, None], projected, torch.zeros_like(gu))
    if from_median:  # scale = −1/(2 t² m): dscale/dm = 2 t² scale²
        grad_median = torch.where(finite, grad_scale * 2 * threshold**2 * scale * scale, torch.zeros_like(scale))
        for a in range(m):
            grads[a] = grads[a] + gram_ops.median_backward(mats[a][None], positions[a][None], grad_median[a][None])[0]
    out, offset = [], 0
    for x in xs:
        out.append(torch.stack(grads[offset : offset + x.shape[0]]))
        offset += x.shape[0]
    return out


@_hsic_terms_backward_op.register_fake
def _(xs, kernel, scale, positions, from_median, threshold, pairs, tile, grad_cross, grad_row_sums, grad_diag):
    return [torch.empty_like(x) for x in xs]


# ---- repkern::hsic_terms_from_grams ---------------------------------------------------------


@torch.library.custom_op("repkern::hsic_terms_from_grams", mutates_args=())
def _hsic_terms_from_grams_op(grams: list[Tensor], pairs: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """grams: (B, n, n) float32/float64 Gram matrices, symmetric: only the upper
    triangle and the diagonal are read (the lower triangle is taken as their mirror).
    Returns (cross (P,), row_sums (m, n), diag (m, n)) in float64, matrix a = grams[a // B][a % B]."""
    mats = _matrices([g.contiguous() for g in grams])
    m, n = len(mats), mats[0].shape[0]
    device = mats[0].device
    pairs_t = _pairs_tensor(pairs)
    cross = torch.zeros(pairs_t.shape[0], dtype=torch.float64, device=device)
    row_sums = torch.zeros((m, n), dtype=torch.float64, device=device)
    diag = torch.zeros((m, n), dtype=torch.float64, device=device)
    _native_terms(GramKind.LINEAR, mats, None, None, pairs_t, cross, row_sums, diag, 0, 0, True)
    return cross, row_sums, diag


@_hsic_terms_from_grams_op.register_fake
def _(grams, pairs):
    g = grams[0]
    m, n = g.shape[0] * len(grams), g.shape[1]
    f64 = torch.float64
    return g.new_empty(len(pairs) // 2, dtype=f64), g.new_empty((m, n), dtype=f64), g.new_empty((m, n), dtype=f64)


def _from_grams_setup_context(ctx, inputs, output):
    grams, pairs = inputs
    ctx.pairs = pairs
    ctx.save_for_backward(*grams)


def _from_grams_backward(ctx, grad_cross, grad_row_sums, grad_diag):
    """The op reads the symmetric matrix S(K) built from K's upper triangle and
    diagonal; dL/dS = G as in hsic_terms_backward, folded back onto the entries read:
    G_ij + G_ji above the diagonal, G_ii on it, 0 below."""
    grams = ctx.saved_tensors
    mats = _matrices(list(grams))
    m = len(mats)
    acc = mats[0].dtype
    upper = torch.ones_like(mats[0], dtype=torch.bool).triu_(1)
    sym = torch.stack([torch.where(upper, k, k.T) for k in mats])  # S(K): lower taken from upper
    coef = _pair_coefficients(ctx.pairs, grad_cross, m, acc)
    n = sym.shape[-1]
    gs = (coef @ sym.reshape(m, -1)).reshape(m, n, n) + grad_row_sums.to(acc)[:, :, None]
    gs.diagonal(dim1=1, dim2=2).add_(grad_diag.to(acc))
    folded = torch.where(upper, gs + gs.mT, torch.zeros_like(gs))
    folded.diagonal(dim1=1, dim2=2).copy_(gs.diagonal(dim1=1, dim2=2))
    out, offset = [], 0
    for k in grams:
        out.append(folded[offset : offset + k.shape[0]].to(k.dtype))
        offset += k.shape[0]
    return out, None


_hsic_terms_from_grams_op.register_autograd(_from_grams_backward, setup_context=_from_grams_setup_context)


# ---- planning ------------------------------------------------------------------------------


def gram_budget(max_gram_bytes) -> int:
    """The memory budget: the argument, else REPKERN_MAX_GRAM_BYTES, else 1 GiB."""
    return _validation.byte_budget("max_gram_bytes", max_gram_bytes, env="REPKERN_MAX_GRAM_BYTES",
                                   default=DEFAULT_MAX_GRAM_BYTES)


def make_plan(n: int, dims: Sequence[int], pair_dims: Sequence[tuple[int, int]], kernel: str, sigma, method: str,
          budget: int, elem: int) -> CkaPlan:
    """dims: d of each matrix; pair_dims: (d_a, d_b) of each pair computed.

    Cost model of method="auto": the linear kernel goes to feature space when its
    GEMMs, 2n·Σ_pairs d_a·d_b FLOPs, are no more than the Gram path's n²·Σ_a d_a
    (upper-triangle GEMMs) + n²·P (the pass over the Grams); every other case uses
    the Gram path, untiled while its m n×n buffers fit in the budget, else tiled."""
    _validation.choice("method", method, METHODS)
    if method == "feature" and kernel != "linear":
        raise ValueError(f"method: 'feature' needs kernel='linear', got kernel={kernel!r}")
    gram_bytes = len(dims) * n * n * elem
    if method == "auto":
        fits = gram_bytes <= budget
        if kernel == "linear" and 2 * n * sum(a * b for a, b in pair_dims) <= n * n * (sum(dims) + len(pair_dims)):
            method = "feature"
        else:
            method = "gram" if fits else "tiled"
    tile = int(math.isqrt(budget // (TILE_COPIES * len(dims) * elem)))
    tile = max(64, min(MAX_TILE, tile // 64 * 64))
    if method == "tiled" and tile >= n:
        tile = max(1, (n + 1) // 2)  # forced tiling of a small problem: two tiles per edge
    median = rows = seed = None
    if kernel == "rbf" and sigma is None and method != "feature":
        median = "exact"
        exact_bytes = MEDIAN_WORKING_COPIES * (n * (n - 1) // 2) * elem
        if method == "tiled" and exact_bytes > budget:
            rows = min(MEDIAN_SAMPLE_ROWS, int(math.isqrt(budget // (2 * MEDIAN_WORKING_COPIES * elem))))
            if rows < n:
                if rows < MEDIAN_MIN_SAMPLE_ROWS:
                    least = 2 * MEDIAN_WORKING_COPIES * elem * MEDIAN_MIN_SAMPLE_ROWS**2
                    sampled = (f", a sampled estimate at least {least} ({MEDIAN_MIN_SAMPLE_ROWS} of the rows; this "
                               f"budget allows {rows})" if n > MEDIAN_MIN_SAMPLE_ROWS else "")
                    raise ValueError(
                        f"max_gram_bytes: {budget} bytes is too small for the RBF median bandwidth of n={n} "
                        f"samples: the exact median needs {exact_bytes} bytes{sampled}; raise max_gram_bytes or "
                        "pass sigma")
                median, seed = "sampled", MEDIAN_SEED
            else:
                rows = None
    return CkaPlan(method, tile, median, rows, seed, gram_bytes, budget)


def cka_plan(x, y=None, kernel: str = "linear", *, sigma: Optional[float] = None, method: str = "auto",
             max_gram_bytes: Optional[int] = None) -> CkaPlan:
    """The plan :func:`cka`/:func:`hsic` (``x``, ``y`` tensors; ``y=None``: y = x) or
    :func:`cka_matrix` (``x``, ``y`` sequences of layers) follow for these inputs:
    method, tile size, and whether an RBF median bandwidth is exact or sampled."""
    budget = gram_budget(max_gram_bytes)
    if isinstance(x, torch.Tensor):
        y = x if y is None else y
        _validation.check_hsic_args(x, y, kernel, False, sigma, 1.0, "full")
        batch = math.prod(x.shape[:-2])
        d1, d2 = x.shape[-1], y.shape[-1]
        dims = [d1] * batch + [d2] * batch
        pair_dims = [(d1, d2), (d1, d1), (d2, d2)] * batch
        n, dtype = x.shape[-2], x.dtype
    else:
        xs, ys, _, _ = _validation.check_cka_matrix_args(x, y, kernel, False, sigma, 1.0, "full")
        layers, _, _, pairs = matrix_layout(xs, ys)
        dims = [t.shape[1] for t in layers]
        pair_dims = [(dims[a], dims[b]) for a, b in pairs]
        n, dtype = xs[0].shape[0], xs[0].dtype
    return make_plan(n, dims, pair_dims, kernel, sigma, method, budget, acc_itemsize(dtype))


def acc_itemsize(dtype: torch.dtype) -> int:
    return _common.acc_dtype(dtype).itemsize


# ---- inputs ---------------------------------------------------------------------------------


def prepare(x: Tensor, kernel: str, peak: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """x (B, n, d) -> (x in the accumulation dtype ready for the Gram/feature path,
    log2 of the factor it was divided by (B,) float64). Linear: divided by
    2^round(log2(max |x|)) — exact (a power of two, as two factors so that a subnormal
    peak's 2^149 is representable), which bounds the entries by 2, so float32 products
    x̂ᵀx̂ and Σ K∘K stay far from overflow and underflow — then centered twice: the
    first mean's rounding (an offset shared by every row, large against the spread when
    |mean| ≫ std) is removed by the second, whose own rounding is relative to the
    spread. Cosine: each row rescaled by a power of two (gram_ops.unit_rows). One
    copy of x; min/max (skipped when the caller has max |x| (B,) as `peak`), two
    multiplies, two mean passes, two subtractions."""
    xa = x.to(_common.acc_dtype(x.dtype))
    zero = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    if kernel == "cosine":
        return gram_ops.unit_rows(xa)[0], zero
    if kernel != "linear":
        return xa, zero
    with torch.no_grad():
        if peak is None:
            flat = xa.detach().reshape(xa.shape[0], -1)
            peak = torch.maximum(-flat.amin(1), flat.amax(1))
        exponent = gram_ops.pow2_exponent(peak)
    f1, f2 = gram_ops.pow2_factors(exponent[:, None, None], xa.dtype)
    xs = xa * f1  # a new tensor: the in-place steps below never touch x
    xs.mul_(f2)
    xs.sub_(xs.mean(-2, keepdim=True))  # exact where the values lie within 2x of their mean (Sterbenz)
    xs.sub_(xs.mean(-2, keepdim=True))  # the first mean's rounding error, shared by every row
    return xs, -exponent


def _numerators(cross: Tensor, row_sums: Tensor, diag: Tensor, pairs: Tensor, n: int, debiased: bool) -> Tensor:
    """h per pair (module docstring) from the float64 terms; pairs (P, 2) matrix indices."""
    ra, rb = row_sums[pairs[:, 0]], row_sums[pairs[:, 1]]
    if not debiased:
        return cross - (2 / n) * (ra * rb).sum(-1) + ra.sum(-1) * rb.sum(-1) / (n * n)
    da, db = diag[pairs[:, 0]], diag[pairs[:, 1]]
    s = cross - (da * db).sum(-1)
    ra, rb = ra - da, rb - db
    return s + ra.sum(-1) * rb.sum(-1) / ((n - 1) * (n - 2)) - (2 / (n - 2)) * (ra * rb).sum(-1)


def normalizer(n: int, debiased: bool) -> float:
    return n * (n - 3) if debiased else (n - 1) ** 2


def gram_numerators(inputs: list[Tensor], kernel, sigma, median, threshold, pairs, plan: CkaPlan, debiased):
    """h for each pair of matrices of `inputs` (list of prepared (B, n, d)) through
    repkern::hsic_terms; also Σ K_a∘K_a of each pair's first matrix (its self term
    when the pair is a self pair: the zero-variance test)."""
    n = inputs[0].shape[1]
    m = inputs[0].shape[0] * len(inputs)
    scale = None
    if kernel == "rbf" and sigma is not None:
        scale = torch.full((m,), _common.rbf_scale(sigma, inputs[0].dtype), dtype=inputs[0].dtype,
                           device=inputs[0].device)
    tile = n if plan.method == "gram" else plan.tile
    flat = [int(v) for ab in pairs for v in ab]
    cross, row_sums, diag, _, _ = torch.ops.repkern.hsic_terms(
        inputs, kernel, scale, median, threshold, flat, tile, plan.median_sample_rows or 0, plan.tile)
    pairs_t = torch.tensor(pairs, dtype=torch.int64, device=cross.device).reshape(-1, 2)
    return _numerators(cross, row_sums, diag, pairs_t, n, debiased), cross


def _feature_numerators(p: Tensor, q: Tensor, n: int, debiased: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(h_xy, h_xx, h_yy) from centered features p (B, n, d1), q (B, n, d2)."""
    dot = _common.square_sum64(q.mT @ p, (-2, -1))
    self_p, self_q = gram_ops.xtx_sq_norm(p), gram_ops.xtx_sq_norm(q)
    if not debiased:
        return dot, self_p, self_q
    a, b = _common.square_sum64(p, -1), _common.square_sum64(q, -1)  # once each
    sa, sb = a.sum(-1), b.sum(-1)

    def correct(s, u, v, su, sv):
        return s - n / (n - 2) * (u * v).sum(-1) + su * sv / ((n - 1) * (n - 2))

    return correct(dot, a, b, sa, sb), correct(self_p, a, a, sa, sa), correct(self_q, b, b, sb, sb)


# ---- results -----------------------------------------------------------------------------------


def degenerate(h_self: Tensor, s_self: Optional[Tensor], dtype: torch.dtype, constant: Tensor,
                finite: Tensor) -> Tensor:
    """True where a representation has no usable variance: all rows equal
    (`constant`), its self-HSIC numerator <= 0, or (Gram path, s_self = Σ K∘K) at
    most rounding noise of its Gram entries (_common.zero_variance_tolerance).
    Inputs with NaN/Inf are not counted (their result is NaN without a warning)."""
    bad = constant | ~(h_self > 0)
    if s_self is not None:
        bad = bad | (h_self <= _common.zero_variance_tolerance(dtype) * s_self)
    return bad & finite


def warn_degenerate(op: str, names: list[str]) -> None:
    if not names or torch.compiler.is_compiling():  # no data-dependent Python under torch.compile
        return
    warnings.warn(
        f"repkern.{op}: {', '.join(names)}: zero variance (constant representation, or a self-HSIC <= 0 or at "
        "the rounding level of its Gram entries); CKA is NaN there", RuntimeWarning, stacklevel=3)


def _batch_names(name: str, mask: Tensor, batch_shape) -> list[str]:
    if not batch_shape:
        return [name] if bool(mask.reshape(-1)[0]) else []
    idx = mask.reshape(batch_shape).nonzero().tolist()
    return [f"{name}[{', '.join(map(str, i))}]" for i in idx]


def ratio(h_xy: Tensor, h_xx: Tensor, h_yy: Tensor, ok: Tensor) -> Tensor:
    """h_xy / sqrt(h_xx h_yy) where ok, else NaN (no NaN or inf in the other branch's gradient)."""
    denom = torch.where(ok, h_xx * h_yy, torch.ones_like(h_xx))
    return torch.where(ok, h_xy / denom.sqrt(), torch.full_like(h_xy, torch.nan))


def _input_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(finite, constant, max |x|), each (B,), of x (B, n, d) from one read (per-column min and max,
    instead of three passes): all entries finite (min/max propagate NaN); all rows equal exactly
    (every column's min == max; NaN compares unequal, as in _common.constant_rows)."""
    with torch.no_grad():
        lo, hi = x.detach().amin(-2), x.detach().amax(-2)  # 7x faster than torch.aminmax on the CPU
        finite = (torch.isfinite(lo) & torch.isfinite(hi)).all(-1)
        constant = (lo == hi).all(-1)
        peak = torch.maximum(-lo.amin(-1), hi.amax(-1))
    return finite, constant, peak


def _pair(x, y, kernel, debiased, sigma, threshold, median, method, max_gram_bytes):
    """(h_xy, h_xx, h_yy, degenerate x, degenerate y, finite, log2 scales of x and y), each (B,)."""
    batch = x.shape[0]
    n = x.shape[1]
    plan = make_plan(n, [x.shape[2]] * batch + [y.shape[2]] * batch,
                 [(x.shape[2], y.shape[2]), (x.shape[2], x.shape[2]), (y.shape[2], y.shape[2])] * batch,
                 kernel, sigma, method, gram_budget(max_gram_bytes), acc_itemsize(x.dtype))
    (finite_x, constant_x, peak_x), (finite_y, constant_y, peak_y) = _input_stats(x), _input_stats(y)
    xp, x_log2 = prepare(x, kernel, peak_x)
    yp, y_log2 = prepare(y, kernel, peak_y)
    if plan.method == "feature":
        h_xy, h_xx, h_yy = _feature_numerators(xp, yp, n, debiased)
        s_xx = s_yy = None
    else:
        pairs = [p for b in range(batch) for p in ((b, batch + b), (b, b), (batch + b, batch + b))]
        h, cross = gram_numerators([xp, yp], kernel, sigma, median, threshold, pairs, plan, debiased)
        h_xy, h_xx, h_yy = h.reshape(batch, 3).unbind(1)
        cross = cross.reshape(batch, 3)
        s_xx, s_yy = cross[:, 1], cross[:, 2]
    bad_x = degenerate(h_xx, s_xx, x.dtype, constant_x, finite_x)
    bad_y = degenerate(h_yy, s_yy, y.dtype, constant_y, finite_y)
    return h_xy, h_xx, h_yy, bad_x, bad_y, finite_x & finite_y, x_log2, y_log2


def _as_batches(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-2], t.shape[-1])


# ---- public API --------------------------------------------------------------------------------


def hsic(
    x: Tensor,
    y: Tensor,
    kernel: str = "linear",
    *,
    debiased: bool = False,
    sigma: Optional[float] = None,
    threshold: float = 1.0,
    median: str = "full",
    method: str = "auto",
    max_gram_bytes: Optional[int] = None,
) -> Tensor:
    """Hilbert–Schmidt independence criterion of x and y.

    Args:
        x, y: ``(..., n, d1)``, ``(..., n, d2)``: the same n samples, same batch dims,
            dtype (float32/float64/float16/bfloat16) and device.
        kernel: ``"linear"``, ``"cosine"`` or ``"rbf"`` (as :func:`repkern.gram`;
            the RBF median heuristic is applied to x and y separately).
        debiased: the unbiased estimator of Song et al. 2012 (n >= 4) instead of
            the biased tr(KHLH)/(n−1)² (n >= 2).
        sigma, threshold, median: RBF bandwidth, as :func:`repkern.gram`.
        method, max_gram_bytes: see :func:`cka`.

    Returns:
        ``(...)`` float32 (float64 for float64 inputs). NaN where x or y holds NaN/Inf.
        Differentiable w.r.t. x and y.
    """
    sigma, threshold = _validation.check_hsic_args(x, y, kernel, debiased, sigma, threshold, median)
    if _native.use_reference():
        return reference.hsic(x, y, kernel, debiased=debiased, sigma=sigma, threshold=threshold, median=median)
    stat = _common.stat_dtype(x.dtype)
    if x.numel() == 0:
        return torch.empty(x.shape[:-2], dtype=stat, device=x.device)
    h_xy, _, _, _, _, finite, x_log2, y_log2 = _pair(
        _as_batches(x), _as_batches(y), kernel, debiased, sigma, threshold, median, method, max_gram_bytes)
    n = x.shape[-2]
    value = h_xy / normalizer(n, debiased) * torch.exp2(2 * (x_log2 + y_log2))
    value = torch.where(finite, value, torch.full_like(value, torch.nan))
    return value.reshape(x.shape[:-2]).to(stat)


def cka(
    x: Tensor,
    y: Tensor,
    kernel: str = "linear",
    *,
    debiased: bool = False,
    sigma: Optional[float] = None,
    threshold: float = 1.0,
    median: str = "full",
    method: str = "auto",
    max_gram_bytes: Optional[int] = None,
) -> Tensor:
    """Centered kernel alignment HSIC(K, L) / sqrt(HSIC(K, K)·HSIC(L, L)).

    Args:
        x, y: ``(..., n, d1)``, ``(..., n, d2)``: the same n samples, same batch dims,
            dtype (float32/float64/float16/bfloat16) and device.
        kernel: ``"linear"``, ``"cosine"`` or ``"rbf"``.
        debiased: the unbiased HSIC estimator in all three places (Kornblith et
            al.'s ``cka(gram_x, gram_y, debiased=True)``); needs n >= 4.
        sigma: RBF bandwidth; ``None``: median heuristic σ² = threshold² · median
            squared distance (``median="full"``: over all n² entries, diagonal
            zeros included, Kornblith's ``gram_rbf``; ``"offdiag"``: i ≠ j only).
        method: ``"auto"`` (the cost model of :func:`cka_plan`), ``"feature"``
            (linear only: ‖YᵀX‖²-type products, cost n·d1·d2, memory d1·d2),
            ``"gram"`` (one n×n inner-product buffer per matrix) or ``"tiled"``
            (Gram tiles, O(n·(d1+d2) + tile²) memory; RBF median exact while the
            n(n−1)/2 distances fit in the budget, else sampled: see ``CkaPlan``).
        max_gram_bytes: memory budget for n×n-sized storage; default
            ``REPKERN_MAX_GRAM_BYTES`` or 1 GiB. "auto" tiles when the Gram path
            would exceed it.

    Returns:
        ``(...)`` float32 (float64 for float64 inputs), scale-invariant in x and y.
        NaN, with a ``RuntimeWarning`` naming the input (and batch index), where x or
        y is constant (all rows equal) or its self-HSIC is at the rounding level of
        its Gram entries (both self-HSICs are squared norms, ‖HKH‖²_F and ‖Ũ_K‖²_F
        for the U-centered K, so only rounding makes them <= 0); NaN without a
        warning where an input holds NaN/Inf. Differentiable w.r.t. x and y on every path (``1 - cka(x, y)`` is a loss);
        works under ``torch.compile`` (without the warning).
    """
    sigma, threshold = _validation.check_hsic_args(x, y, kernel, debiased, sigma, threshold, median)
    if _native.use_reference():
        return reference.cka(x, y, kernel, debiased=debiased, sigma=sigma, threshold=threshold, median=median)
    stat = _common.stat_dtype(x.dtype)
    if x.numel() == 0:
        return torch.empty(x.shape[:-2], dtype=stat, device=x.device)
    h_xy, h_xx, h_yy, bad_x, bad_y, finite, _, _ = _pair(
        _as_batches(x), _as_batches(y), kernel, debiased, sigma, threshold, median, method, max_gram_bytes)
    value = ratio(h_xy, h_xx, h_yy, finite & ~bad_x & ~bad_y)
    if not torch.compiler.is_compiling() and bool((bad_x | bad_y).any()):
        batch_shape = x.shape[:-2]
        warn_degenerate("cka", _batch_names("x", bad_x, batch_shape) + _batch_names("y", bad_y, batch_shape))
    return value.reshape(x.shape[:-2]).to(stat)


def cka_from_grams(k: Tensor, l: Tensor, *, debiased: bool = False) -> Tensor:
    """CKA of Gram matrices k, l ``(..., n, n)`` (Kornblith et al.'s ``cka(k, l, debiased)``).

    The matrices must be symmetric: only the upper triangle and the diagonal are
    read (one pass, no centered copies). Returns ``(...)`` float32 (float64 for
    float64 input); NaN with a ``RuntimeWarning`` where k or l has zero variance
    (constant, or a self-HSIC at rounding level); NaN where it holds NaN/Inf.
    Differentiable w.r.t. k and l (the gradient lands on the entries read).
    """
    _validation.check_grams(k, l, debiased)
    if _native.use_reference():
        return reference.cka_from_grams(k, l, debiased=debiased)
    stat = _common.stat_dtype(k.dtype)
    if k.numel() == 0:
        return torch.empty(k.shape[:-2], dtype=stat, device=k.device)
    acc = _common.acc_dtype(k.dtype)
    k3, l3 = _as_batches(k).to(acc), _as_batches(l).to(acc)
    batch, n = k3.shape[0], k3.shape[1]
    pairs = [p for b in range(batch) for p in ((b, batch + b), (b, b), (batch + b, batch + b))]
    cross, row_sums, diag = torch.ops.repkern.hsic_terms_from_grams([k3, l3], [v for p in pairs for v in p])
    pairs_t = torch.tensor(pairs, dtype=torch.int64, device=cross.device)
    h_xy, h_kk, h_ll = _numerators(cross, row_sums, diag, pairs_t, n, debiased).reshape(batch, 3).unbind(1)
    s = cross.reshape(batch, 3)
    tol = _common.zero_variance_tolerance(k.dtype)
    finite = torch.isfinite(s[:, 1]) & torch.isfinite(s[:, 2])
    bad_k = ~(h_kk > tol * s[:, 1]) & finite
    bad_l = ~(h_ll > tol * s[:, 2]) & finite
    value = ratio(h_xy, h_kk, h_ll, finite & ~bad_k & ~bad_l)
    if not torch.compiler.is_compiling() and bool((bad_k | bad_l).any()):
        batch_shape = k.shape[:-2]
        warn_degenerate("cka_from_grams", _batch_names("k", bad_k, batch_shape) + _batch_names("l", bad_l, batch_shape))
    return value.reshape(k.shape[:-2]).to(stat)


def matrix_layout(xs: list[Tensor], ys: Optional[list[Tensor]]):
    """Distinct layers (the same tensor object in xs and ys counts once), their names,
    the layer index of each xs / ys entry, and the pairs to compute: upper pairs
    (self pairs included) among xs for ys=None, else every (xs, ys) pair and every
    self pair. Pairs come in 4×4 blocks of layers (CUDA launches stage 8 matrices)."""
    layers, names, index = [], [], {}

    def slot(t, name):
        if id(t) not in index:
            index[id(t)] = len(layers)
            layers.append(t)
            names.append(name)
        return index[id(t)]

    x_idx = [slot(t, f"xs[{i}]") for i, t in enumerate(xs)]
    y_idx = x_idx if ys is None else [slot(t, f"ys[{j}]") for j, t in enumerate(ys)]
    wanted = {(a, a) for a in range(len(layers))}
    wanted |= {(min(a, b), max(a, b)) for a in x_idx for b in y_idx}
    pairs = sorted(wanted, key=lambda p: (p[0] // 4, p[1] // 4, p))
    return layers, names, (x_idx, y_idx), pairs


def cka_matrix(
    xs: Sequence[Tensor],
    ys: Optional[Sequence[Tensor]] = None,
    kernel: str = "linear",
    *,
    debiased: bool = False,
    sigma: Optional[float] = None,
    threshold: float = 1.0,
    median: str = "full",
    method: str = "auto",
    max_gram_bytes: Optional[int] = None,
) -> Tensor:
    """CKA between every layer of ``xs`` and every layer of ``ys``.

    Args:
        xs, ys: sequences of ``(n, d_i)`` activations of the same n samples (d may
            differ per layer; same dtype and device). ``ys=None``: xs against itself.
        kernel, debiased, sigma, threshold, median, method, max_gram_bytes: as :func:`cka`.

    Each layer's Gram matrix (feature path: its centered features) is computed
    once, not once per pair; a tensor passed in both xs and ys counts once; with
    ``ys=None`` only the upper half of the pairs is computed.

    Returns:
        ``(len(xs), len(ys))`` float32 (float64 for float64 inputs); for ``ys=None``
        exactly symmetric with unit diagonal. A constant layer (zero variance, see
        :func:`cka`) gives NaN in its row/column with a ``RuntimeWarning`` naming
        it; all other entries are still computed. Differentiable.
    """
    xs, ys, sigma, threshold = _validation.check_cka_matrix_args(xs, ys, kernel, debiased, sigma, threshold, median)
    if _native.use_reference():
        return reference.cka_matrix(xs, ys, kernel, debiased=debiased, sigma=sigma, threshold=threshold,
                                    median=median)
    layers, names, (x_idx, y_idx), pairs = matrix_layout(xs, ys)
    n = xs[0].shape[0]
    dims = [t.shape[1] for t in layers]
    plan = make_plan(n, dims, [(dims[a], dims[b]) for a, b in pairs], kernel, sigma, method, gram_budget(max_gram_bytes),
                 acc_itemsize(xs[0].dtype))
    prepared = [prepare(t[None], kernel)[0] for t in layers]
    if plan.method == "feature":
        h, s_self = feature_matrix_numerators(prepared, pairs, n, debiased), None
    else:
        h, cross = gram_numerators(prepared, kernel, sigma, median, threshold, pairs, plan, debiased)
        s_self = cross
    pair_index = {p: i for i, p in enumerate(pairs)}
    self_h = torch.stack([h[pair_index[(a, a)]] for a in range(len(layers))])
    self_s = None if s_self is None else torch.stack([s_self[pair_index[(a, a)]] for a in range(len(layers))])
    finite = torch.stack([_common.all_finite(t) for t in layers])
    constant = torch.stack([_common.constant_rows(t) for t in layers])
    bad = degenerate(self_h, self_s, xs[0].dtype, constant, finite)
    ok = finite & ~bad

    rows, cols = torch.tensor(x_idx), torch.tensor(y_idx)
    a, b = torch.minimum(rows[:, None], cols[None, :]), torch.maximum(rows[:, None], cols[None, :])
    lookup = torch.tensor([[pair_index.get((i, j), 0) for j in range(len(layers))] for i in range(len(layers))])
    idx = lookup[a, b].to(h.device)
    a, b = a.to(h.device), b.to(h.device)
    out = ratio(h[idx], self_h[a], self_h[b], ok[a] & ok[b])
    same = a == b
    out = torch.where(same & ok[a], torch.ones_like(out), out)  # unit diagonal, exactly
    if not torch.compiler.is_compiling() and bool(bad.any()):
        warn_degenerate("cka_matrix", [names[i] for i in bad.nonzero().flatten().tolist()])
    return out.to(_common.stat_dtype(xs[0].dtype))


def column_runs(partners: list[int]) -> list[tuple[int, int]]:
    """The partners (ascending layer indices) as runs [first, last] of consecutive layers: the column
    ranges one GEMM covers where the layers sit side by side."""
    runs = [[partners[0], partners[0]]]
    for b in partners[1:]:
        if b == runs[-1][1] + 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    return [(first, last) for first, last in runs]


def feature_matrix_numerators(prepared: list[Tensor], pairs, n: int, debiased: bool) -> Tensor:
    """h of every pair from centered features: all layers side by side in one
    (n, Σd) matrix; per layer a, one GEMM x_aᵀ [x_b ...] over each contiguous run
    of the other layers b it pairs with, then squared-entry sums per (a, b) block;
    a self pair by gram_ops.xtx_sq_norm."""
    feats = torch.cat([p[0] for p in prepared], dim=1)
    dims = [p.shape[2] for p in prepared]
    offsets = [0]
    for d in dims:
        offsets.append(offsets[-1] + d)
    sq_rows = [_common.square_sum64(p[0], -1) for p in prepared] if debiased else None
    partners: dict[int, list[int]] = {}
    for a, b in pairs:
        partners.setdefault(a, []).append(b)
    dots = {}
    for a, bs in partners.items():
        if a in bs:  # a self pair: xᵀx is symmetric (gram_ops.xtx_sq_norm: half the FLOPs)
            dots[(a, a)] = gram_ops.xtx_sq_norm(prepared[a])[0]
            bs = [b for b in bs if b != a]
            if not bs:
                continue
        xa = feats[:, offsets[a] : offsets[a + 1]]
        for first, last in column_runs(sorted(bs)):
            # squared-entry sums per column of xaᵀ x_b (rows of its transpose)
            col_sq = _common.square_sum64((xa.T @ feats[:, offsets[first] : offsets[last + 1]]).T, -1)
            for b, block in zip(range(first, last + 1), col_sq.split(dims[first : last + 1])):
                dots[(a, b)] = block.sum()
    out = []
    for a, b in pairs:
        h = dots[(a, b)]
        if debiased:
            ra, rb = sq_rows[a], sq_rows[b]
            h = h - n / (n - 2) * (ra * rb).sum() + ra.sum() * rb.sum() / ((n - 1) * (n - 2))
        out.append(h)
    return torch.stack(out)
