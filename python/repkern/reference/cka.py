"""HSIC and CKA in plain PyTorch: Gram matrices built, centered and compared the careful way."""

from __future__ import annotations

from typing import Optional

import torch

from repkern._common import acc_dtype, all_finite, constant_rows, zero_variance_tolerance
from repkern._validation import check_cka_matrix_args, check_grams, check_hsic_args
from repkern.reference.gram import gram


def center_gram(k: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """k (..., n, n) -> H K H (H = I − 11ᵀ/n), or with ``unbiased`` the U-centering
    of Song et al. 2012 (Kornblith et al.'s ``center_gram(k, unbiased=True)``): the
    diagonal is zeroed, rows/columns centered with the 1/(n−2) correction, the
    diagonal zeroed again; then ⟨Ũ_K, Ũ_L⟩ = n(n−3)·HSIC₁."""
    if not unbiased:
        return k - k.mean(-1, keepdim=True) - k.mean(-2, keepdim=True) + k.mean((-2, -1), keepdim=True)
    n = k.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=k.device)
    k = k.masked_fill(eye, 0)
    means = k.sum(-2) / (n - 2)
    means = means - means.sum(-1, keepdim=True) / (2 * (n - 1))
    k = k - means[..., :, None] - means[..., None, :]
    return k.masked_fill(eye, 0)


def hsic_from_grams(k: torch.Tensor, l: torch.Tensor, *, debiased: bool = False) -> torch.Tensor:
    """HSIC of Gram matrices k, l (..., n, n) -> (...): biased tr(KHLH)/(n−1)², or
    (debiased) the unbiased estimator of Song et al. 2012 (n >= 4)."""
    check_grams(k, l, debiased)
    n = k.shape[-1]
    ka, la = k.to(acc_dtype(k.dtype)), l.to(acc_dtype(l.dtype))
    scaled = (center_gram(ka, debiased) * center_gram(la, debiased)).sum((-2, -1))
    return scaled / (n * (n - 3) if debiased else (n - 1) ** 2)


def _cka_of_centered(kc, lc, k, l, tol):
    """⟨Kc, Lc⟩ / sqrt(⟨Kc, Kc⟩⟨Lc, Lc⟩); NaN where a self term is <= 0 or rounding
    noise (<= tol · Σ K∘K, see :func:`zero_variance_tolerance`)."""
    kk, ll = (kc * kc).sum((-2, -1)), (lc * lc).sum((-2, -1))
    ok = (kk > tol * (k * k).sum((-2, -1))) & (ll > tol * (l * l).sum((-2, -1)))
    ok = ok & all_finite(k) & all_finite(l)
    denom = torch.where(ok, kk * ll, torch.ones_like(kk))
    return torch.where(ok, (kc * lc).sum((-2, -1)) / denom.sqrt(), torch.full_like(kk, torch.nan))


def cka_from_grams(k: torch.Tensor, l: torch.Tensor, *, debiased: bool = False) -> torch.Tensor:
    """CKA of Gram matrices (..., n, n) -> (...) (Kornblith et al.'s ``cka(k, l, debiased)``):
    HSIC(K, L)/sqrt(HSIC(K, K)·HSIC(L, L)), the same estimator in all three places.
    NaN where K or L has zero variance (a self term at rounding level; both are
    squared norms, ‖HKH‖²_F and ‖Ũ_K‖²_F, so never negative otherwise) or holds NaN/Inf."""
    check_grams(k, l, debiased)
    ka, la = k.to(acc_dtype(k.dtype)), l.to(acc_dtype(l.dtype))
    kc, lc = center_gram(ka, debiased), center_gram(la, debiased)
    return _cka_of_centered(kc, lc, ka, la, zero_variance_tolerance(k.dtype))


def kernel_gram(x, kernel, sigma, threshold, median):
    """Gram matrix in the accumulation dtype (16-bit inputs are upcast first)."""
    return gram(x.to(acc_dtype(x.dtype)), kernel, sigma=sigma, threshold=threshold, median=median)


def hsic(
    x: torch.Tensor,
    y: torch.Tensor,
    kernel: str = "linear",
    *,
    debiased: bool = False,
    sigma: Optional[float] = None,
    threshold: float = 1.0,
    median: str = "full",
) -> torch.Tensor:
    """HSIC of x (..., n, d1) and y (..., n, d2) -> (...) with Gram matrices of
    ``kernel`` (see :func:`gram`; the RBF median heuristic per input); NaN where an
    input holds NaN/Inf."""
    sigma, threshold = check_hsic_args(x, y, kernel, debiased, sigma, threshold, median)
    k = kernel_gram(x, kernel, sigma, threshold, median)
    l = kernel_gram(y, kernel, sigma, threshold, median)
    h = hsic_from_grams(k, l, debiased=debiased)
    return torch.where(all_finite(x) & all_finite(y), h, torch.full_like(h, torch.nan))


def cka(
    x: torch.Tensor,
    y: torch.Tensor,
    kernel: str = "linear",
    *,
    debiased: bool = False,
    sigma: Optional[float] = None,
    threshold: float = 1.0,
    median: str = "full",
) -> torch.Tensor:
    """CKA of x (..., n, d1) and y (..., n, d2) -> (...) through Gram matrices.
    NaN where x or y is constant (all rows equal), a self-HSIC is <= 0 or rounding
    noise, or an input holds NaN/Inf."""
    sigma, threshold = check_hsic_args(x, y, kernel, debiased, sigma, threshold, median)
    k = kernel_gram(x, kernel, sigma, threshold, median)
    l = kernel_gram(y, kernel, sigma, threshold, median)
    c = cka_from_grams(k, l, debiased=debiased)
    ok = all_finite(x) & all_finite(y) & ~constant_rows(x) & ~constant_rows(y)
    return torch.where(ok, c, torch.full_like(c, torch.nan))


def feature_space_linear_cka(x: torch.Tensor, y: torch.Tensor, *, debiased: bool = False) -> torch.Tensor:
    """Linear CKA from features, cost n·d1·d2 (Kornblith et al.'s
    ``feature_space_linear_cka``): with X, Y column-centered,
    ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F); debiased: each ‖·‖² term replaced by
    h(X, Y) = ‖YᵀX‖²_F − (n/(n−2)) aᵀb + (Σa)(Σb)/((n−1)(n−2)), a_i = ‖x_i‖², b_i = ‖y_i‖².
    Same NaN rules as :func:`cka`."""
    check_hsic_args(x, y, "linear", debiased, None, 1.0, "full")
    n = x.shape[-2]
    xa, ya = x.to(acc_dtype(x.dtype)), y.to(acc_dtype(y.dtype))
    xa = xa - xa.mean(-2, keepdim=True)
    ya = ya - ya.mean(-2, keepdim=True)

    def h(p, q):
        dot = (q.mT @ p).square().sum((-2, -1))
        if not debiased:
            return dot
        a, b = p.square().sum(-1), q.square().sum(-1)
        return dot - n / (n - 2) * (a * b).sum(-1) + a.sum(-1) * b.sum(-1) / ((n - 1) * (n - 2))

    hxy, hxx, hyy = h(xa, ya), h(xa, xa), h(ya, ya)
    ok = (hxx > 0) & (hyy > 0) & all_finite(x) & all_finite(y) & ~constant_rows(x) & ~constant_rows(y)
    denom = torch.where(ok, hxx * hyy, torch.ones_like(hxx))
    return torch.where(ok, hxy / denom.sqrt(), torch.full_like(hxy, torch.nan))


def cka_matrix(
    xs,
    ys=None,
    kernel: str = "linear",
    *,
    debiased: bool = False,
    sigma: Optional[float] = None,
    threshold: float = 1.0,
    median: str = "full",
) -> torch.Tensor:
    """CKA between layers: xs, ys sequences of (n, d_i) activations of the same n
    samples -> (len(xs), len(ys)). The careful plain-PyTorch way: each layer's Gram is
    built and centered once, then every pair is one inner product. ys=None: the
    symmetric matrix of xs with itself (unit diagonal; half the pairs computed).
    Entries of constant layers are NaN."""
    xs, ys, sigma, threshold = check_cka_matrix_args(xs, ys, kernel, debiased, sigma, threshold, median)
    tol = zero_variance_tolerance(xs[0].dtype)

    def prepare(x):
        k = kernel_gram(x, kernel, sigma, threshold, median)
        kc = center_gram(k, debiased)
        self_term = (kc * kc).sum()
        ok = bool(self_term > tol * (k * k).sum()) and bool(all_finite(x)) and not bool(constant_rows(x))
        return kc, self_term, ok

    px = [prepare(x) for x in xs]
    py = px if ys is None else [prepare(y) for y in ys]
    out = torch.full((len(px), len(py)), torch.nan, dtype=acc_dtype(xs[0].dtype), device=xs[0].device)
    for i, (kc, kk, ok_i) in enumerate(px):
        for j, (lc, ll, ok_j) in enumerate(py):
            if ys is None and j < i:
                out[i, j] = out[j, i]
            elif ys is None and j == i:
                out[i, j] = 1.0 if ok_i else torch.nan
            elif ok_i and ok_j:
                out[i, j] = (kc * lc).sum() / (kk * ll).sqrt()
    return out


def minibatch_cka(
    batches,
    kernel: str = "linear",
    *,
    debiased: bool = True,
    sigma: Optional[float] = None,
    threshold: float = 1.0,
    median: str = "full",
) -> torch.Tensor:
    """Minibatch CKA (Nguyen, Raghu & Kornblith 2021) in plain PyTorch.

    batches: a sequence of ``(xs, ys)``, one per batch; xs a list of (b, d_i) layers,
    ys a list of (b, e_j) layers or None (xs against itself); b may differ between batches.
    Per batch, HSIC of every pair from centered Grams (U-centered for ``debiased``: the
    unbiased HSIC₁); then Σ_b HSIC(K_b, L_b) / sqrt(Σ_b HSIC(K_b, K_b) · Σ_b HSIC(L_b, L_b))
    -> (len(xs), len(ys)). NaN where a layer's summed self-HSIC is <= 0 or it holds NaN/Inf."""
    cross = selfs_x = selfs_y = None
    for xs, ys in batches:
        xs, ys, s, t = check_cka_matrix_args(xs, ys, kernel, debiased, sigma, threshold, median)
        n = xs[0].shape[0]
        norm = n * (n - 3) if debiased else (n - 1) ** 2
        kx = [center_gram(kernel_gram(x, kernel, s, t, median), debiased) for x in xs]
        ky = kx if ys is None else [center_gram(kernel_gram(y, kernel, s, t, median), debiased) for y in ys]
        h = torch.stack([torch.stack([(k * l).sum() for l in ky]) for k in kx]) / norm
        hx = torch.stack([(k * k).sum() for k in kx]) / norm
        hy = torch.stack([(l * l).sum() for l in ky]) / norm
        cross, selfs_x, selfs_y = (h, hx, hy) if cross is None else (cross + h, selfs_x + hx, selfs_y + hy)
    ok = (selfs_x[:, None] > 0) & (selfs_y[None, :] > 0)
    denom = torch.where(ok, selfs_x[:, None] * selfs_y[None, :], torch.ones_like(cross))
    return torch.where(ok, cross / denom.sqrt(), torch.full_like(cross, torch.nan))

