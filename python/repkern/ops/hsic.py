"""HSIC terms: the custom ops every HSIC/CKA estimator is built on.

For m symmetric n×n Gram matrices K_a and requested pairs p = (a, b), the op
``repkern::hsic_terms`` returns, in float64 (DESIGN.md §4):

    cross[p] = Σ_ij K_a,ij K_b,ij      row_sums[a] = K_a 1      diag[a] = diag(K_a)

from which every estimator is O(n) (ops/cka.py). One native kernel reads each
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

from typing import Optional

import torch
from torch import Tensor

from repkern import _native
from repkern.ops import gram as gram_ops
from repkern.ops.gram import GramKind, GramPass

__all__ = ["MEDIAN_SAMPLE_ROWS", "MEDIAN_SEED"]

# Sampled RBF median (tiled path, when the n(n−1)/2 distances exceed the memory
# budget): all distances among this many rows drawn without replacement by a
# torch.Generator seeded with MEDIAN_SEED (same rows for the same n, every call).
MEDIAN_SAMPLE_ROWS = 4096
MEDIAN_SEED = 0

_KIND = {"linear": GramKind.LINEAR, "cosine": GramKind.COSINE, "rbf": GramKind.RBF}


def _matrices(xs: list[Tensor]) -> list[Tensor]:
    """Matrix a -> its (n, d) samples xs[a // B][a % B]."""
    return [x[b] for x in xs for b in range(x.shape[0])]


def _pairs_tensor(pairs: list[int]) -> Tensor:
    return torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)  # host memory: the launchers plan from it


def _native_terms(kind, blocks, aux, scale, pairs_t, cross, row_sums, diag, r0, c0, diagonal) -> None:
    _native.call("hsic_terms", cross.device, int(kind), [_native.view(b) for b in blocks], aux, scale, pairs_t,
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
    med, positions = gram_ops._median_from_upper(values[None], n, offdiag)
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
    d = gram_ops._inner_products(x[rows][None])
    gram_ops._epilogue(GramKind.SQDIST, GramPass.WRITE, d, d)
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
        flat = gram_ops._upper_to_flat(index[None], s)[0]
        meds.append(value)
        positions.append(rows[flat // s] * n + rows[flat % s])
    return (meds[0] + meds[1]) / 2, torch.stack(positions)


# ---- forward drivers -------------------------------------------------------------------


def _untiled(xs, kernel, scale, median, threshold, pairs_t, cross, row_sums, diag):
    """One n×n inner-product buffer per matrix (upper tiles filled), one kernel call."""
    kind = _KIND[kernel]
    blocks, aux, scales, positions = [], [], [], []
    for x in xs:
        inner = gram_ops._inner_products(x)
        if kind == GramKind.RBF and scale is None:
            gram_ops._epilogue(GramKind.SQDIST, GramPass.WRITE, inner, inner)  # distances, in place
            med, pos = gram_ops._median_sq_dist(inner, median == "offdiag")
            scales.append(-0.5 / (threshold**2 * med))
            positions.append(pos)
        elif kind != GramKind.LINEAR:
            aux.append(gram_ops._row_factors(kind, inner))
        blocks += list(inner.unbind(0))
    if scales:
        kind, scale = GramKind.RBF_FROM_SQDIST, torch.cat(scales)
    aux_t = torch.cat(aux) if aux else None
    _native_terms(kind, blocks, aux_t, scale, pairs_t, cross, row_sums, diag, 0, 0, True)
    return scale, torch.cat(positions) if positions else None


def _tiled(xs, kernel, scale, median, threshold, pairs_t, tile, median_sample_rows, cross, row_sums, diag):
    """Tile pairs (i, j >= i) of all matrices, tile-sized buffers only."""
    kind = _KIND[kernel]
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
    kind = _KIND[kernel]
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
            grads[a] = grads[a] + gram_ops._median_backward(mats[a][None], positions[a][None], grad_median[a][None])[0]
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
