"""Alignment of many layers and its significance: ``repkern.similarity_matrix`` and
``repkern.similarity_test`` for every alignment metric (cka, the kNN family, the shape and CCA
family, rsa).

Each layer's expensive object is computed once and every pair (or every permutation) reuses it:

- kNN metrics: the layer's (n, k) neighbour lists (one :func:`repkern.knn`), compared as lists;
- rsa: the layer's condensed RDM, ranked once for Spearman;
- shape_distance, svcca, pwcca: the layer's centered float64 copy and the eigendecomposition of
  A = X̄ᵀX̄; a pair needs only its cross block C = X̄ᵀȲ;
- cka: :func:`repkern.cka_matrix` / :func:`repkern.cka_test`.

Permutation null (y's rows permuted by π, i.e. y' = y[π], row i of y' is row π(i) of y):

- kNN lists relabel: j is a neighbour of i in y' iff π(j) is a neighbour of π(i) in y, so
  N_y'(i) = π⁻¹(N_y(π(i))) with the same similarity values: O(n·k) gathers, no new search;
- RDMs permute: D_y'(i, j) = D_y(π(i), π(j)), an index gather of the condensed vector (ranks too);
  only the cross term of the correlation changes;
- second-order statistics: centering commutes with permuting rows, so A and B are unchanged and
  C_π = X̄ᵀ Ȳ[π], one batched GEMM per chunk of permutations.

Eager analysis functions (data-dependent Python control flow: numerical ranks, degenerate layers):
not meant for torch.compile.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from repkern import _common, _native, reference
from repkern._validation.similarity import (KNN_FAMILY, check_similarity_matrix_args, check_similarity_test_args,
                                            pair_options)
from repkern.ops import _second_order as so
from repkern.ops import knn as knn_ops
from repkern.ops.cca import pwcca_from_stats, svcca_from_stats
from repkern.ops.cka import cka_matrix, matrix_layout
from repkern.ops.cka_test import cka_test
from repkern.ops.rsa import average_ranks, condensed_dissimilarities, pearson
from repkern.ops.shape import shape_from_stats
from repkern.results.similarity import SimilarityTestResult, finish

__all__ = ["similarity_matrix", "similarity_test", "SimilarityTestResult"]

CHUNK_ELEMENTS = 1 << 22  # permutations per batch: about this many elements in the largest temporary

# the value of a layer against itself where it is defined (ys=None diagonal, or one tensor in xs and ys)
SELF_VALUE = {"mutual_knn": 1.0, "cknna": 1.0, "shape_distance": 0.0, "svcca": 1.0, "pwcca": 1.0, "rsa": 1.0}
RSA_FLAT = "all dissimilarities of its RDM are equal; the RSA correlation is NaN"
NAN_WHEN_CONSTANT = {"shape_distance": "the angular shape distance is NaN", "svcca": "SVCCA is NaN",
                     "pwcca": "PWCCA is NaN"}


def _symmetric(metric: str, options: dict) -> bool:
    """metric(a, b) = metric(b, a) up to rounding (cycle_knn, cknna and pwcca are not; svcca is not
    with different dims per side)."""
    if metric == "svcca":
        return options["dims"] is None or options["dims"][0] == options["dims"][1]
    return metric in ("mutual_knn", "shape_distance", "rsa")


def _chunks(total: int, per_permutation: int):
    step = max(1, CHUNK_ELEMENTS // max(1, per_permutation))
    return [(s, min(total, s + step)) for s in range(0, total, step)]


# ---- per-layer objects and per-pair values ----------------------------------------------------------


def _knn_pairs(layers: list[Tensor], metric: str, options: dict) -> Callable[[int, int], Tensor]:
    """Each layer's kNN lists once; the pair value from the lists (float64, 0-d)."""
    n, k = layers[0].shape[0], options["k"]
    knn_metric = options.get("knn_metric", "cosine")
    src = knn_ops.sources(n, k, layers[0].device)
    lists = []
    for t in layers:
        vals, idx = knn_ops.knn(t, k, metric=knn_metric, tile_bytes=options["tile_bytes"])
        vals, idx = vals.reshape(-1).double(), idx.reshape(-1)
        self_sim = knn_ops.sparse_hsic(n, src, idx, vals, vals) if metric == "cknna" else None
        lists.append((vals, idx, knn_ops.Edges(src, idx, n), self_sim))

    def pair(a: int, b: int) -> Tensor:
        va, _, ea, kk = lists[a]
        vb, ib, _, ll = lists[b]
        if metric == "mutual_knn":
            return knn_ops.mutual_from_lists(ea, src, ib, k)
        if metric == "cycle_knn":
            return knn_ops.cycle_from_lists(ea, src, ib, k)
        return knn_ops.cknna_value(knn_ops.cknna_cross(ea, va, src, ib, vb, n), kk, ll)

    return pair


def _rsa_pairs(layers: list[Tensor], options: dict, names: list[str]) -> tuple[Callable, list[str]]:
    """Each layer's condensed RDM (ranked for Spearman) once; the pair value is their Pearson correlation.
    Also returns the names of the layers whose RDM is constant."""
    rdms, flat = [], []
    for t, name in zip(layers, names):
        d = condensed_dissimilarities(t, options["rdm"])
        finite = bool(torch.isfinite(d).all())
        if finite and options["compare"] == "spearman":
            d = average_ranks(d)
        if finite and bool((d == d[0]).all()):
            flat.append(name)
        rdms.append(d if finite else None)

    def pair(a: int, b: int) -> Tensor:
        if rdms[a] is None or rdms[b] is None:
            return torch.full((), torch.nan, dtype=torch.float64, device=layers[0].device)
        return pearson(rdms[a], rdms[b])

    return pair, flat


def _centered(t: Tensor) -> Tensor:
    """The float64 column-centered copy (as :func:`repkern.ops._second_order.centered_grams`)."""
    t64 = t.detach().double()
    return t64 - t64.mean(0)


def _from_stats(metric: str, options: dict, n: int, names: tuple[str, str]):
    """The metric as a function of (spectrum of A, spectrum of B, C); C may be batched (..., d1, d2)."""
    if metric == "shape_distance":
        return lambda sx, sy, c: shape_from_stats(n, sx, sy, c, options["alpha"], options["score"], names)
    if metric == "svcca":
        return lambda sx, sy, c: svcca_from_stats(sx, sy, c, options["dims"], options["keep"])
    return pwcca_from_stats


def _second_order_pairs(layers: list[Tensor], metric: str, options: dict,
                        names: list[str]) -> tuple[Callable, list[str]]:
    """Each layer's centered copy and spectrum once; the pair value from its cross block C. Also returns
    the names of the constant layers."""
    n = layers[0].shape[0]
    finite = [bool(_common.all_finite(t)) for t in layers]
    constant = [bool(_common.constant_rows(t)) for t in layers]
    centered = [_centered(t) if ok else None for t, ok in zip(layers, finite)]
    spectra = [so.spectrum(xc.T @ xc, const) if xc is not None else None for xc, const in zip(centered, constant)]

    def pair(a: int, b: int) -> Tensor:
        if not (finite[a] and finite[b]):
            return torch.full((), torch.nan, dtype=torch.float64, device=layers[0].device)
        value = _from_stats(metric, options, n, (names[a], names[b]))
        return value(spectra[a], spectra[b], centered[a].T @ centered[b])

    return pair, [name for name, f, c in zip(names, finite, constant) if f and c]


# ---- similarity_matrix -------------------------------------------------------------------------------


def similarity_matrix(xs: Sequence[Tensor], ys: Optional[Sequence[Tensor]] = None, *, metric: str = "cka",
                      **options) -> Tensor:
    """An alignment metric between every layer of ``xs`` and every layer of ``ys``.

    Each layer's expensive object is computed once, not once per pair: its kNN lists
    (``mutual_knn``, ``cycle_knn``, ``cknna``: one :func:`knn` per layer, then list lookups per
    pair), its condensed RDM ranked once (``rsa``), its centered float64 copy and the
    eigendecomposition of X̄ᵀX̄ (``shape_distance``, ``svcca``, ``pwcca``: a pair needs one GEMM for
    C = X̄ᵀȲ and one SVD), or the cka plan of :func:`cka_matrix` (``cka``). For symmetric metrics
    (cka, mutual_knn, shape_distance, svcca with the same dims per side, rsa) each unordered pair of
    layers is computed once, so ys=None costs the upper half; cycle_knn, cknna and pwcca are not
    symmetric and every entry is computed. A tensor passed in both xs and ys counts once.

    Args:
        xs, ys: sequences of ``(n, d_i)`` representations of the same n samples (rows), same dtype and
            device, widths may differ. ``ys=None``: xs against itself.
        metric: ``"cka"``, ``"mutual_knn"``, ``"cycle_knn"``, ``"cknna"``, ``"shape_distance"``,
            ``"svcca"``, ``"pwcca"`` or ``"rsa"``.
        **options: the per-pair function's keyword arguments. cka: ``kernel``, ``debiased``, ``sigma``,
            ``threshold``, ``median``, ``method``, ``max_gram_bytes`` (:func:`cka_matrix`);
            mutual_knn, cycle_knn: ``k`` (required), ``knn_metric`` (the kNN similarity, the
            ``metric`` argument of :func:`mutual_knn`; default ``"cosine"``), ``tile_bytes``; cknna:
            ``k`` (required), ``tile_bytes``; shape_distance: ``alpha``, ``score``; svcca: ``dims``
            (an int or a pair (xs side, ys side), at most every layer's width), ``keep``; pwcca: none
            (weights from the xs layer); rsa: ``rdm``, ``compare``. Any other name: TypeError naming it.

    Returns:
        ``(len(xs), len(ys))`` float32 (float64 for float64 inputs): entry (i, j) is the metric of
        (xs[i], ys[j]), equal to the per-pair function up to rounding, with each layer against itself
        exactly 1 (0 for shape_distance) where defined (cycle_knn: computed, it need not be 1).
        Degenerate layers as the per-pair functions: NaN entries (a RuntimeWarning naming the layers
        where a constant layer or a constant RDM makes the metric undefined), ValueError naming the
        layer for full whitening (alpha=0) of a rank-deficient one. No gradient except for cka.

    Memory: the kNN lists (n·k per layer), the RDMs (n(n−1)/2 float64 per layer) or the centered
    copies (n·d float64 per layer) of all layers at once.
    """
    xs, ys, options = check_similarity_matrix_args(xs, ys, metric, options)
    if _native.use_reference():
        return reference.similarity_matrix(xs, ys, metric=metric, **options)
    if metric == "cka":
        return cka_matrix(xs, ys, **pair_options(metric, options))
    layers, names, (x_idx, y_idx), _ = matrix_layout(xs, ys)
    warn: list[str] = []
    with torch.no_grad():
        if metric in KNN_FAMILY:
            pair = _knn_pairs(layers, metric, options)
        elif metric == "rsa":
            pair, warn = _rsa_pairs(layers, options, names)
        else:
            pair, warn = _second_order_pairs(layers, metric, options, names)
        symmetric = _symmetric(metric, options)
        done: dict[tuple[int, int], Tensor] = {}

        def entry(a: int, b: int) -> Tensor:
            key = (min(a, b), max(a, b)) if symmetric else (a, b)
            if key not in done:
                value = pair(*key)
                if a == b and metric in SELF_VALUE:  # a layer against itself: exact where defined
                    value = torch.where(torch.isnan(value), value, torch.full_like(value, SELF_VALUE[metric]))
                done[key] = value
            return done[key]

        out = torch.stack([torch.stack([entry(a, b) for b in y_idx]) for a in x_idx])
    if metric == "rsa":
        so.warn_degenerate("similarity_matrix", warn, RSA_FLAT)
    elif metric in NAN_WHEN_CONSTANT and not (metric == "shape_distance" and options["score"] != "angular"):
        so.warn_degenerate("similarity_matrix", warn, f"{so.CONSTANT}; {NAN_WHEN_CONSTANT[metric]}")
    return out.to(_common.stat_dtype(xs[0].dtype))


# ---- similarity_test ---------------------------------------------------------------------------------


def _knn_null(x: Tensor, y: Tensor, metric: str, options: dict, perms: Tensor) -> tuple[Tensor, Tensor]:
    """(observed, null (B,)) float64 from one kNN search per input; y's lists relabelled per permutation."""
    n, k = x.shape[0], options["k"]
    knn_metric = options.get("knn_metric", "cosine")
    vx, ix = knn_ops.knn(x, k, metric=knn_metric, tile_bytes=options["tile_bytes"])
    vy, iy = knn_ops.knn(y, k, metric=knn_metric, tile_bytes=options["tile_bytes"])
    src = knn_ops.sources(n, k, x.device)
    vx, ix, vy, iy = vx.reshape(-1).double(), ix.reshape(-1), vy.reshape(-1).double(), iy.reshape(-1)
    ex = knn_ops.Edges(src, ix, n)
    if metric == "cknna":
        # HSIC is invariant under relabelling the samples: sim(L, L) of y[π] is that of y
        kk, ll = knn_ops.sparse_hsic(n, src, ix, vx, vx), knn_ops.sparse_hsic(n, src, iy, vy, vy)

    def value(ny: Tensor, nv: Tensor) -> Tensor:
        if metric == "mutual_knn":
            return knn_ops.mutual_from_lists(ex, src, ny, k)
        if metric == "cycle_knn":
            return knn_ops.cycle_from_lists(ex, src, ny, k)
        return knn_ops.cknna_value(knn_ops.cknna_cross(ex, vx, src, ny, nv, n), kk, ll)

    null = []
    for s0, s1 in _chunks(perms.shape[0], n * k):
        p = perms[s0:s1]
        inv = torch.empty_like(p).scatter_(1, p, torch.arange(n, device=p.device).expand_as(p))  # π⁻¹
        # row i of y[π] is row π(i) of y: its neighbours are π⁻¹(N_y(π(i))), with the same similarities
        relabelled = inv.gather(1, iy.view(n, k)[p].reshape(p.shape[0], n * k))
        null.append(value(relabelled, vy.view(n, k)[p].reshape(p.shape[0], n * k)))
    return value(iy, vy), _cat(null, x.device)


def _rsa_null(x: Tensor, y: Tensor, options: dict, perms: Tensor) -> tuple[Tensor, Tensor]:
    """(observed, null (B,)) float64 from one RDM per input; y's RDM gathered per permutation."""
    n = x.shape[0]
    nan = torch.full((), torch.nan, dtype=torch.float64, device=x.device)
    dx, dy = condensed_dissimilarities(x, options["rdm"]), condensed_dissimilarities(y, options["rdm"])
    if not (bool(torch.isfinite(dx).all()) and bool(torch.isfinite(dy).all())):
        return nan, nan.repeat(perms.shape[0])
    if options["compare"] == "spearman":
        dx, dy = average_ranks(dx), average_ranks(dy)  # the ranks of y[π]'s RDM are y's, permuted
    flat = [name for name, v in (("x", dx), ("y", dy)) if bool((v == v[0]).all())]
    so.warn_degenerate("similarity_test", flat, RSA_FLAT)
    observed = pearson(dx, dy)
    zx, zy = dx - dx.mean(), dy - dy.mean()  # a permutation of y's entries keeps their mean and norm
    denom = (zx @ zx) * (zy @ zy)
    if not float(denom) > 0:
        return observed, nan.repeat(perms.shape[0])
    rows, cols = torch.triu_indices(n, n, 1, device=x.device)  # condensed order
    null = []
    for s0, s1 in _chunks(perms.shape[0], 4 * rows.numel()):
        p = perms[s0:s1]
        a, b = p[:, rows], p[:, cols]
        lo, hi = torch.minimum(a, b), torch.maximum(a, b)
        pos = lo * n - lo * (lo + 1) // 2 + hi - lo - 1  # D_y(π(i), π(j)) in the condensed vector
        null.append(((zy[pos] @ zx) / denom.sqrt()).clamp(-1.0, 1.0))
    return observed, _cat(null, x.device)


def _second_order_null(x: Tensor, y: Tensor, metric: str, options: dict, perms: Tensor) -> tuple[Tensor, Tensor]:
    """(observed, null (B,)) float64 from one spectrum per input; C = X̄ᵀȲ[π] per permutation."""
    nan = torch.full((), torch.nan, dtype=torch.float64, device=x.device)
    if not (bool(_common.all_finite(x)) and bool(_common.all_finite(y))):
        return nan, nan.repeat(perms.shape[0])
    constant = [bool(_common.constant_rows(t)) for t in (x, y)]
    xc, yc = _centered(x), _centered(y)
    sx, sy = so.spectrum(xc.T @ xc, constant[0]), so.spectrum(yc.T @ yc, constant[1])
    value = _from_stats(metric, options, x.shape[0], ("x", "y"))
    observed = value(sx, sy, xc.T @ yc)
    null = [value(sx, sy, torch.matmul(xc.T, yc[perms[s0:s1]]))
            for s0, s1 in _chunks(perms.shape[0], y.shape[0] * y.shape[1])]
    if metric != "shape_distance" or options["score"] == "angular":
        so.warn_degenerate("similarity_test", [name for name, c in zip("xy", constant) if c],
                           f"{so.CONSTANT}; {NAN_WHEN_CONSTANT[metric]}")
    return observed, _cat(null, x.device)


def _cat(parts: list[Tensor], device) -> Tensor:
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64, device=device)


def similarity_test(x: Tensor, y: Tensor, *, metric: str, n_permutations: int = 1000, seed: int = 0,
                    **options) -> SimilarityTestResult:
    """Permutation test of an alignment metric: is x more aligned with y than with y's rows shuffled?

    The null distribution is the metric of x against y[π] for ``n_permutations`` permutations π of
    the rows, batched without recomputing the expensive part: kNN metrics relabel y's neighbour lists
    (N_y[π](i) = π⁻¹(N_y(π(i))), O(n·k) per permutation, no new kNN search); rsa gathers y's condensed
    RDM (and its ranks) at (π(i), π(j)); shape_distance, svcca, pwcca keep A = X̄ᵀX̄ and B = ȲᵀȲ
    (and their eigendecompositions) and form C = X̄ᵀȲ[π] by batched GEMMs (plus one small SVD each);
    cka is :func:`cka_test` without bootstrap.

    Args:
        x, y: ``(n, d1)``, ``(n, d2)``: the same n samples, as the per-pair function of ``metric``
            accepts them.
        metric: ``"cka"``, ``"mutual_knn"``, ``"cycle_knn"``, ``"cknna"``, ``"shape_distance"``,
            ``"svcca"``, ``"pwcca"`` or ``"rsa"``.
        n_permutations: B >= 0 permutations of y's rows (0: no p-value).
        seed: the permutations, :func:`repkern._common.replicate_indices` drawn on the CPU from
            ``torch.Generator().manual_seed(seed)`` (those of :func:`cka_test`): the same
            permutations on every device; a seed gives the same null on every run of a device.
        **options: the metric's options, as :func:`similarity_matrix` (``k`` required for the kNN
            metrics, ``knn_metric`` for their similarity).

    Returns:
        :class:`~repkern.SimilarityTestResult` with ``value`` (the per-pair function's value up to
        rounding), ``p_value`` = (1 + #{null >= value}) / (1 + B), for shape_distance (a distance:
        small is aligned) (1 + #{null <= value}) / (1 + B), and ``null`` (B,); float32 (float64 when
        an input is float64). NaN value, null and p-value where the metric is undefined (NaN/Inf input;
        with a RuntimeWarning for a constant input or RDM, as the per-pair function).

    The relabelled kNN lists are those a new search on y[π] would return, except where y has ties
    at the k-th neighbour (the tie rule, lower index first, follows the indices, which π changes).
    Eager only (not for torch.compile); no gradient.
    """
    options = check_similarity_test_args(x, y, metric, n_permutations, seed, options)
    if _native.use_reference():
        return reference.similarity_test(x, y, metric=metric, n_permutations=n_permutations, seed=seed, **options)
    dtype = _common.stat_dtype(torch.promote_types(x.dtype, y.dtype))
    if metric == "cka":
        res = cka_test(x, y, n_permutations=n_permutations, n_bootstrap=0, seed=seed, **pair_options(metric, options))
        return finish(metric, res.cka, res.null, dtype)
    perms, _ = _common.replicate_indices(x.shape[0], n_permutations, 0, seed, x.device)
    with torch.no_grad():
        x, y = x.detach(), y.detach()
        if metric in KNN_FAMILY:
            observed, null = _knn_null(x, y, metric, options, perms)
        elif metric == "rsa":
            observed, null = _rsa_null(x, y, options, perms)
        else:
            observed, null = _second_order_null(x, y, metric, options, perms)
    return finish(metric, observed, null, dtype)
