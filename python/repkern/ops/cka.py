"""HSIC and CKA: ``repkern.hsic``, ``repkern.cka``, ``repkern.cka_from_grams``,
``repkern.cka_matrix`` and ``repkern.cka_plan``.

Math (DESIGN.md §4): from the terms of ``repkern::hsic_terms`` (ops/hsic.py),
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

Scale: the linear paths center x and divide it by a power of two near max |x|
(exact in every float format), so neither float32 products nor 16-bit inputs
overflow; HSIC is scaled back in float64. RBF and cosine Grams are
bounded by 1 and need no scaling.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from repkern import _checks, _native, reference
from repkern.ops import hsic as hsic_ops

__all__ = ["hsic", "cka", "cka_from_grams", "cka_matrix", "cka_plan", "CkaPlan", "DEFAULT_MAX_GRAM_BYTES"]

DEFAULT_MAX_GRAM_BYTES = 1 << 30  # env REPKERN_MAX_GRAM_BYTES or argument max_gram_bytes override it
METHODS = ("auto", "feature", "gram", "tiled")
MAX_TILE = 2048  # a bigger tile only costs memory: GEMMs of 2048 rows already run near the matmul rate
TILE_COPIES = 3  # tile-sized buffers per matrix at the peak (forward block; backward K and G stacks)
MEDIAN_WORKING_COPIES = 3  # exact median selection: packed distances, kthvalue's copy, one pass's temporary


@dataclasses.dataclass(frozen=True)
class CkaPlan:
    """How :func:`cka` / :func:`hsic` / :func:`cka_matrix` compute (see :func:`cka_plan`).

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


# ---- planning ------------------------------------------------------------------------------


def _budget(max_gram_bytes) -> int:
    if max_gram_bytes is None:
        env = os.environ.get("REPKERN_MAX_GRAM_BYTES")
        if not env:
            return DEFAULT_MAX_GRAM_BYTES
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"REPKERN_MAX_GRAM_BYTES must be a positive integer (bytes), got {env!r}") from None
        if value <= 0:
            raise ValueError(f"REPKERN_MAX_GRAM_BYTES must be a positive integer (bytes), got {env!r}")
        return value
    if isinstance(max_gram_bytes, bool) or not isinstance(max_gram_bytes, int):
        raise TypeError(f"max_gram_bytes: expected an int (bytes), got {type(max_gram_bytes).__name__}")
    if max_gram_bytes <= 0:
        raise ValueError(f"max_gram_bytes: expected a positive number of bytes, got {max_gram_bytes}")
    return max_gram_bytes


def _plan(n: int, dims: Sequence[int], pair_dims: Sequence[tuple[int, int]], kernel: str, sigma, method: str,
          budget: int, elem: int) -> CkaPlan:
    """dims: d of each matrix; pair_dims: (d_a, d_b) of each pair computed.

    Cost model of method="auto": the linear kernel goes to feature space when its
    GEMMs, 2n·Σ_pairs d_a·d_b FLOPs, are no more than the Gram path's n²·Σ_a d_a
    (upper-triangle GEMMs) + n²·P (the pass over the Grams); every other case uses
    the Gram path, untiled while its m n×n buffers fit in the budget, else tiled."""
    _checks.choice("method", method, METHODS)
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
        if method == "tiled" and MEDIAN_WORKING_COPIES * (n * (n - 1) // 2) * elem > budget:
            rows = min(hsic_ops.MEDIAN_SAMPLE_ROWS, int(math.isqrt(budget // (2 * MEDIAN_WORKING_COPIES * elem))))
            if rows < n:
                median, seed = "sampled", hsic_ops.MEDIAN_SEED
            else:
                rows = None
    return CkaPlan(method, tile, median, rows, seed, gram_bytes, budget)


def cka_plan(x, y=None, kernel: str = "linear", *, sigma: Optional[float] = None, method: str = "auto",
             max_gram_bytes: Optional[int] = None) -> CkaPlan:
    """The plan :func:`cka`/:func:`hsic` (``x``, ``y`` tensors; ``y=None``: y = x) or
    :func:`cka_matrix` (``x``, ``y`` sequences of layers) follow for these inputs:
    method, tile size, and whether an RBF median bandwidth is exact or sampled."""
    budget = _budget(max_gram_bytes)
    if isinstance(x, torch.Tensor):
        y = x if y is None else y
        reference.check_hsic_args(x, y, kernel, False, sigma, 1.0, "full")
        batch = math.prod(x.shape[:-2])
        d1, d2 = x.shape[-1], y.shape[-1]
        dims = [d1] * batch + [d2] * batch
        pair_dims = [(d1, d2), (d1, d1), (d2, d2)] * batch
        n, dtype = x.shape[-2], x.dtype
    else:
        xs, ys, _, _ = reference.check_cka_matrix_args(x, y, kernel, False, sigma, 1.0, "full")
        layers, _, _, pairs = _matrix_layout(xs, ys)
        dims = [t.shape[1] for t in layers]
        pair_dims = [(dims[a], dims[b]) for a, b in pairs]
        n, dtype = xs[0].shape[0], xs[0].dtype
    return _plan(n, dims, pair_dims, kernel, sigma, method, budget, _elem(dtype))


def _elem(dtype: torch.dtype) -> int:
    return _native.acc_dtype(dtype).itemsize


# ---- inputs ---------------------------------------------------------------------------------


def _prepare(x: Tensor, kernel: str) -> tuple[Tensor, Tensor]:
    """x (B, n, d) -> (x in the accumulation dtype ready for the Gram/feature path,
    log2 of the factor it was divided by (B,) float64). Linear: centered and divided
    by 2^round(log2(max |x|)) — exact (a power of two), and it bounds the entries of
    x̂ by 2, so float32 products x̂ᵀx̂ and Σ K∘K stay far from overflow. Three passes:
    min/max, mean, then centering and scaling fused."""
    xa = x.to(_native.acc_dtype(x.dtype))
    zero = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    if kernel != "linear":
        return xa, zero
    with torch.no_grad():
        lo, hi = torch.aminmax(xa.detach().reshape(xa.shape[0], -1), dim=1)
        peak = torch.maximum(-lo, hi).double()
        log2 = torch.where(torch.isfinite(peak) & (peak > 0), torch.log2(peak).round(), zero)
    scale = torch.exp2(-log2).to(xa.dtype)[:, None, None]
    return torch.addcmul(-xa.mean(-2, keepdim=True) * scale, xa, scale), log2


def _numerators(cross: Tensor, row_sums: Tensor, diag: Tensor, pairs: Tensor, n: int, debiased: bool) -> Tensor:
    """h per pair (module docstring) from the float64 terms; pairs (P, 2) matrix indices."""
    ra, rb = row_sums[pairs[:, 0]], row_sums[pairs[:, 1]]
    if not debiased:
        return cross - (2 / n) * (ra * rb).sum(-1) + ra.sum(-1) * rb.sum(-1) / (n * n)
    da, db = diag[pairs[:, 0]], diag[pairs[:, 1]]
    s = cross - (da * db).sum(-1)
    ra, rb = ra - da, rb - db
    return s + ra.sum(-1) * rb.sum(-1) / ((n - 1) * (n - 2)) - (2 / (n - 2)) * (ra * rb).sum(-1)


def _normalizer(n: int, debiased: bool) -> float:
    return n * (n - 3) if debiased else (n - 1) ** 2


def _gram_numerators(inputs: list[Tensor], kernel, sigma, median, threshold, pairs, plan: CkaPlan, debiased):
    """h for each pair of matrices of `inputs` (list of prepared (B, n, d)) through
    repkern::hsic_terms; also Σ K_a∘K_a of each pair's first matrix (its self term
    when the pair is a self pair: the zero-variance test)."""
    n = inputs[0].shape[1]
    m = inputs[0].shape[0] * len(inputs)
    scale = None
    if kernel == "rbf" and sigma is not None:
        scale = torch.full((m,), -0.5 / sigma**2, dtype=inputs[0].dtype, device=inputs[0].device)
    tile = n if plan.method == "gram" else plan.tile
    flat = [int(v) for ab in pairs for v in ab]
    cross, row_sums, diag, _, _ = torch.ops.repkern.hsic_terms(
        inputs, kernel, scale, median, threshold, flat, tile, plan.median_sample_rows or 0, plan.tile)
    pairs_t = torch.tensor(pairs, dtype=torch.int64, device=cross.device).reshape(-1, 2)
    return _numerators(cross, row_sums, diag, pairs_t, n, debiased), cross


def _feature_numerator(p: Tensor, q: Tensor, n: int, debiased: bool) -> Tensor:
    """h from centered features p (B, n, d1), q (B, n, d2)."""
    dot = (q.mT @ p).square().sum((-2, -1), dtype=torch.float64)
    if not debiased:
        return dot
    a, b = p.square().sum(-1, dtype=torch.float64), q.square().sum(-1, dtype=torch.float64)
    return dot - n / (n - 2) * (a * b).sum(-1) + a.sum(-1) * b.sum(-1) / ((n - 1) * (n - 2))


# ---- results -----------------------------------------------------------------------------------


def _degenerate(h_self: Tensor, s_self: Optional[Tensor], dtype: torch.dtype, constant: Tensor,
                finite: Tensor) -> Tensor:
    """True where a representation has no usable variance: all rows equal
    (`constant`), its self-HSIC numerator <= 0, or (Gram path, s_self = Σ K∘K) at
    most rounding noise of its Gram entries (reference.zero_variance_tolerance).
    Inputs with NaN/Inf are not counted (their result is NaN without a warning)."""
    bad = constant | ~(h_self > 0)
    if s_self is not None:
        bad = bad | (h_self <= reference.zero_variance_tolerance(dtype) * s_self)
    return bad & finite


def _warn(op: str, names: list[str]) -> None:
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


def _ratio(h_xy: Tensor, h_xx: Tensor, h_yy: Tensor, ok: Tensor) -> Tensor:
    """h_xy / sqrt(h_xx h_yy) where ok, else NaN (no NaN or inf in the other branch's gradient)."""
    denom = torch.where(ok, h_xx * h_yy, torch.ones_like(h_xx))
    return torch.where(ok, h_xy / denom.sqrt(), torch.full_like(h_xy, torch.nan))


def _pair(x, y, kernel, debiased, sigma, threshold, median, method, max_gram_bytes):
    """(h_xy, h_xx, h_yy, degenerate x, degenerate y, finite, log2 scales of x and y), each (B,)."""
    batch = x.shape[0]
    n = x.shape[1]
    plan = _plan(n, [x.shape[2]] * batch + [y.shape[2]] * batch,
                 [(x.shape[2], y.shape[2]), (x.shape[2], x.shape[2]), (y.shape[2], y.shape[2])] * batch,
                 kernel, sigma, method, _budget(max_gram_bytes), _elem(x.dtype))
    xp, x_log2 = _prepare(x, kernel)
    yp, y_log2 = _prepare(y, kernel)
    if plan.method == "feature":
        h_xy = _feature_numerator(xp, yp, n, debiased)
        h_xx = _feature_numerator(xp, xp, n, debiased)
        h_yy = _feature_numerator(yp, yp, n, debiased)
        s_xx = s_yy = None
    else:
        pairs = [p for b in range(batch) for p in ((b, batch + b), (b, b), (batch + b, batch + b))]
        h, cross = _gram_numerators([xp, yp], kernel, sigma, median, threshold, pairs, plan, debiased)
        h_xy, h_xx, h_yy = h.reshape(batch, 3).unbind(1)
        cross = cross.reshape(batch, 3)
        s_xx, s_yy = cross[:, 1], cross[:, 2]
    finite_x, finite_y = reference.all_finite(x), reference.all_finite(y)
    bad_x = _degenerate(h_xx, s_xx, x.dtype, reference.constant_rows(x), finite_x)
    bad_y = _degenerate(h_yy, s_yy, y.dtype, reference.constant_rows(y), finite_y)
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
    sigma, threshold = reference.check_hsic_args(x, y, kernel, debiased, sigma, threshold, median)
    if _native.use_reference():
        return reference.hsic(x, y, kernel, debiased=debiased, sigma=sigma, threshold=threshold, median=median)
    stat = _native.stat_dtype(x.dtype)
    if x.numel() == 0:
        return torch.empty(x.shape[:-2], dtype=stat, device=x.device)
    h_xy, _, _, _, _, finite, x_log2, y_log2 = _pair(
        _as_batches(x), _as_batches(y), kernel, debiased, sigma, threshold, median, method, max_gram_bytes)
    n = x.shape[-2]
    value = h_xy / _normalizer(n, debiased) * torch.exp2(2 * (x_log2 + y_log2))
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
    sigma, threshold = reference.check_hsic_args(x, y, kernel, debiased, sigma, threshold, median)
    if _native.use_reference():
        return reference.cka(x, y, kernel, debiased=debiased, sigma=sigma, threshold=threshold, median=median)
    stat = _native.stat_dtype(x.dtype)
    if x.numel() == 0:
        return torch.empty(x.shape[:-2], dtype=stat, device=x.device)
    h_xy, h_xx, h_yy, bad_x, bad_y, finite, _, _ = _pair(
        _as_batches(x), _as_batches(y), kernel, debiased, sigma, threshold, median, method, max_gram_bytes)
    value = _ratio(h_xy, h_xx, h_yy, finite & ~bad_x & ~bad_y)
    if not torch.compiler.is_compiling() and bool((bad_x | bad_y).any()):
        batch_shape = x.shape[:-2]
        _warn("cka", _batch_names("x", bad_x, batch_shape) + _batch_names("y", bad_y, batch_shape))
    return value.reshape(x.shape[:-2]).to(stat)


def cka_from_grams(k: Tensor, l: Tensor, *, debiased: bool = False) -> Tensor:
    """CKA of Gram matrices k, l ``(..., n, n)`` (Kornblith et al.'s ``cka(k, l, debiased)``).

    The matrices must be symmetric: only the upper triangle and the diagonal are
    read (one pass, no centered copies). Returns ``(...)`` float32 (float64 for
    float64 input); NaN with a ``RuntimeWarning`` where k or l has zero variance
    (constant, or a self-HSIC at rounding level); NaN where it holds NaN/Inf.
    Differentiable w.r.t. k and l (the gradient lands on the entries read).
    """
    reference._check_grams(k, l, debiased)
    if _native.use_reference():
        return reference.cka_from_grams(k, l, debiased=debiased)
    stat = _native.stat_dtype(k.dtype)
    if k.numel() == 0:
        return torch.empty(k.shape[:-2], dtype=stat, device=k.device)
    acc = _native.acc_dtype(k.dtype)
    k3, l3 = _as_batches(k).to(acc), _as_batches(l).to(acc)
    batch, n = k3.shape[0], k3.shape[1]
    pairs = [p for b in range(batch) for p in ((b, batch + b), (b, b), (batch + b, batch + b))]
    cross, row_sums, diag = torch.ops.repkern.hsic_terms_from_grams([k3, l3], [v for p in pairs for v in p])
    pairs_t = torch.tensor(pairs, dtype=torch.int64, device=cross.device)
    h_xy, h_kk, h_ll = _numerators(cross, row_sums, diag, pairs_t, n, debiased).reshape(batch, 3).unbind(1)
    s = cross.reshape(batch, 3)
    tol = reference.zero_variance_tolerance(k.dtype)
    finite = torch.isfinite(s[:, 1]) & torch.isfinite(s[:, 2])
    bad_k = ~(h_kk > tol * s[:, 1]) & finite
    bad_l = ~(h_ll > tol * s[:, 2]) & finite
    value = _ratio(h_xy, h_kk, h_ll, finite & ~bad_k & ~bad_l)
    if not torch.compiler.is_compiling() and bool((bad_k | bad_l).any()):
        batch_shape = k.shape[:-2]
        _warn("cka_from_grams", _batch_names("k", bad_k, batch_shape) + _batch_names("l", bad_l, batch_shape))
    return value.reshape(k.shape[:-2]).to(stat)


def _matrix_layout(xs: list[Tensor], ys: Optional[list[Tensor]]):
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
    xs, ys, sigma, threshold = reference.check_cka_matrix_args(xs, ys, kernel, debiased, sigma, threshold, median)
    if _native.use_reference():
        return reference.cka_matrix(xs, ys, kernel, debiased=debiased, sigma=sigma, threshold=threshold,
                                    median=median)
    layers, names, (x_idx, y_idx), pairs = _matrix_layout(xs, ys)
    n = xs[0].shape[0]
    dims = [t.shape[1] for t in layers]
    plan = _plan(n, dims, [(dims[a], dims[b]) for a, b in pairs], kernel, sigma, method, _budget(max_gram_bytes),
                 _elem(xs[0].dtype))
    prepared = [_prepare(t[None], kernel)[0] for t in layers]
    if plan.method == "feature":
        h, s_self = _feature_matrix_numerators(prepared, pairs, n, debiased), None
    else:
        h, cross = _gram_numerators(prepared, kernel, sigma, median, threshold, pairs, plan, debiased)
        s_self = cross
    pair_index = {p: i for i, p in enumerate(pairs)}
    self_h = torch.stack([h[pair_index[(a, a)]] for a in range(len(layers))])
    self_s = None if s_self is None else torch.stack([s_self[pair_index[(a, a)]] for a in range(len(layers))])
    finite = torch.stack([reference.all_finite(t) for t in layers])
    constant = torch.stack([reference.constant_rows(t) for t in layers])
    bad = _degenerate(self_h, self_s, xs[0].dtype, constant, finite)
    ok = finite & ~bad

    rows, cols = torch.tensor(x_idx), torch.tensor(y_idx)
    a, b = torch.minimum(rows[:, None], cols[None, :]), torch.maximum(rows[:, None], cols[None, :])
    lookup = torch.tensor([[pair_index.get((i, j), 0) for j in range(len(layers))] for i in range(len(layers))])
    idx = lookup[a, b].to(h.device)
    a, b = a.to(h.device), b.to(h.device)
    out = _ratio(h[idx], self_h[a], self_h[b], ok[a] & ok[b])
    same = a == b
    out = torch.where(same & ok[a], torch.ones_like(out), out)  # unit diagonal, exactly
    if not torch.compiler.is_compiling() and bool(bad.any()):
        _warn("cka_matrix", [names[i] for i in bad.nonzero().flatten().tolist()])
    return out.to(_native.stat_dtype(xs[0].dtype))


def _feature_matrix_numerators(prepared: list[Tensor], pairs, n: int, debiased: bool) -> Tensor:
    """h of every pair from centered features: all layers side by side in one
    (n, Σd) matrix; per layer a, one GEMM x_aᵀ [x_b ...] over each contiguous run
    of the layers b it pairs with, then squared-entry sums per (a, b) block."""
    feats = torch.cat([p[0] for p in prepared], dim=1)
    dims = [p.shape[2] for p in prepared]
    offsets = [0]
    for d in dims:
        offsets.append(offsets[-1] + d)
    sq_rows = [p[0].square().sum(-1, dtype=torch.float64) for p in prepared] if debiased else None
    partners: dict[int, list[int]] = {}
    for a, b in pairs:
        partners.setdefault(a, []).append(b)
    dots = {}
    for a, bs in partners.items():
        bs = sorted(bs)
        runs, start = [], bs[0]
        for prev, cur in zip(bs, bs[1:] + [None]):
            if cur != prev + 1:
                runs.append((start, prev))
                start = cur
        xa = feats[:, offsets[a] : offsets[a + 1]]
        for first, last in runs:
            col_sq = (xa.T @ feats[:, offsets[first] : offsets[last + 1]]).square().sum(0, dtype=torch.float64)
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
