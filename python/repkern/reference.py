"""Pure-PyTorch implementations of every repkern op.

Readable first: these are the oracle of the tests and the baseline of the
benchmarks (written the way a careful user would, not as a strawman). Math
conventions: DESIGN.md §4. Results are computed in float32 (float64 for float64
inputs) and returned in the dtypes the fast ops use.
"""

from __future__ import annotations

from typing import Optional

import torch

from repkern import _checks
from repkern._native import acc_dtype
from repkern.codes import CsrCodes, SparseCodes

GRAM_KERNELS = ("linear", "cosine", "rbf")
MEDIANS = ("full", "offdiag")


def check_gram_args(x, kernel, sigma, threshold, center, median):
    """Validates the arguments of :func:`gram`; returns (sigma, threshold)."""
    _checks.floating_tensor("x", x, min_dim=2, shape_hint="(..., n, d)")
    n, d = x.shape[-2], x.shape[-1]
    if n < 1:
        raise ValueError(f"x: needs n >= 1 samples (shape (..., n, d)), got shape {tuple(x.shape)}")
    if d < 1:
        raise ValueError(f"x: needs d >= 1 features (shape (..., n, d)), got shape {tuple(x.shape)}")
    _checks.choice("kernel", kernel, GRAM_KERNELS)
    sigma = _checks.positive_number("sigma", sigma, allow_none=True)
    threshold = _checks.positive_number("threshold", threshold)
    _checks.boolean("center", center)
    _checks.choice("median", median, MEDIANS)
    if kernel == "rbf" and sigma is None and median == "offdiag" and n < 2:
        raise ValueError("median='offdiag' needs n >= 2 samples (there is no off-diagonal distance)")
    return sigma, threshold


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    """x (..., n, d) -> (..., n, n) ‖x_i − x_j‖², clamped at 0; the diagonal is
    exactly 0 (NaN for a row holding NaN)."""
    sq = (x * x).sum(-1)
    d = sq[..., :, None] + sq[..., None, :] - 2 * (x @ x.mT)
    d = d.clamp_min(0)
    eye = torch.eye(x.shape[-2], dtype=torch.bool, device=x.device)
    return torch.where(eye, (0 * sq)[..., :, None], d)


def median_squared_distance(d: torch.Tensor, median: str = "full") -> torch.Tensor:
    """numpy-style median over the last two dims of distances d (..., n, n):
    the mean of the two middle values for an even count. 'full' includes the
    diagonal as n exact zeros (Kornblith et al.; also for a row holding NaN);
    'offdiag' uses the n(n−1) entries i ≠ j. NaN sorts last (as in torch.sort)."""
    n = d.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=d.device)
    if median == "offdiag":
        values = d[..., ~eye]
    else:
        values = torch.where(eye, torch.zeros((), dtype=d.dtype, device=d.device), d).reshape(*d.shape[:-2], n * n)
    values, _ = torch.sort(values, dim=-1)
    count = values.shape[-1]
    lo, hi = (count - 1) // 2, count // 2
    return (values[..., lo] + values[..., hi]) / 2


def gram(
    x: torch.Tensor,
    kernel: str = "linear",
    *,
    sigma: Optional[float] = None,
    threshold: float = 1.0,
    center: bool = False,
    median: str = "full",
) -> torch.Tensor:
    """Gram matrix K (..., n, n) of the rows of x (..., n, d).

    linear: K = x xᵀ. cosine: K_ij = x_i·x_j / (‖x_i‖‖x_j‖), 0 for zero rows.
    rbf: K_ij = exp(−‖x_i − x_j‖² / (2σ²)), σ given or σ² = threshold² · median
    of the squared distances. center: H K H with H = I − 11ᵀ/n.
    """
    sigma, threshold = check_gram_args(x, kernel, sigma, threshold, center, median)
    xa = x.to(acc_dtype(x.dtype))
    if kernel == "linear":
        k = xa @ xa.mT
    elif kernel == "cosine":
        norms = xa.norm(dim=-1, keepdim=True)
        u = xa / norms.clamp_min(torch.finfo(xa.dtype).tiny)
        k = u @ u.mT
    else:
        d = squared_distances(xa)
        if sigma is None:
            sigma_sq = threshold**2 * median_squared_distance(d, median)[..., None, None]
        else:
            sigma_sq = torch.full((), sigma**2, dtype=xa.dtype, device=xa.device)
        k = torch.exp(-d / (2 * sigma_sq))
        k = torch.where(d == 0, torch.ones((), dtype=k.dtype, device=k.device), k)  # σ = 0 limit
    if center:
        k = k - k.mean(-1, keepdim=True) - k.mean(-2, keepdim=True) + k.mean((-2, -1), keepdim=True)
    return k.to(x.dtype)


# ---- SAE encode / decode (DESIGN.md §4) ----------------------------------------------

SAE_ACTIVATIONS = ("relu", "topk", "jumprelu", "batchtopk")
SAE_OUTPUTS = ("dense", "sparse")


def _same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (where x is), got {t.device}")


def _threshold_tensor(threshold, d_sae: int, device: torch.device, *, per_feature: bool) -> torch.Tensor:
    """threshold as a float32 tensor: (d_sae,) per feature, or () for a scalar. Must be
    finite and >= 0 (a negative threshold is meaningless after the ReLU)."""
    if isinstance(threshold, torch.Tensor):
        if threshold.dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"threshold: expected a floating tensor, got {threshold.dtype}")
        _same_device("threshold", threshold, device)
        allowed = ((), (1,), (d_sae,)) if per_feature else ((), (1,))
        if tuple(threshold.shape) not in allowed:
            want = "(d_sae,) or a scalar" if per_feature else "a scalar"
            raise ValueError(f"threshold: expected {want} (d_sae={d_sae}), got shape {tuple(threshold.shape)}")
        theta = threshold.to(torch.float32)
    elif isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold: expected a float or a tensor, got {type(threshold).__name__}")
    else:
        theta = torch.tensor(float(threshold), dtype=torch.float32, device=device)
    detached = theta.detach()
    if torch.compiler.is_compiling():  # a value check would break the graph
        return theta
    if not bool(torch.isfinite(detached).all()) or bool((detached < 0).any()):
        raise ValueError("threshold: must be finite and >= 0 (a negative threshold is meaningless after the ReLU)")
    return theta


def check_sae_encode_args(x, W_enc, b_enc, b_dec, activation, k, threshold, relu_first, output, bandwidth):
    """Validates :func:`sae_encode`'s arguments. Returns (k, theta): k an int (topk),
    a float (batchtopk training) or None; theta a float32 tensor ((d_sae,) for
    jumprelu, () for batchtopk inference) or None."""
    _checks.floating_tensor("x", x, min_dim=1, shape_hint="(..., d_in)")
    _checks.floating_tensor("W_enc", W_enc, min_dim=2, shape_hint="(d_in, d_sae)")
    if W_enc.dim() != 2:
        raise ValueError(f"W_enc: expected shape (d_in, d_sae), got {tuple(W_enc.shape)}")
    d_in, d_sae = W_enc.shape
    if d_in < 1 or d_sae < 1:
        raise ValueError(f"W_enc: needs d_in >= 1 and d_sae >= 1, got shape {tuple(W_enc.shape)}")
    if x.shape[-1] != d_in:
        raise ValueError(f"x: last dimension {x.shape[-1]} does not match d_in={d_in} of W_enc (d_in, d_sae)")
    _same_device("W_enc", W_enc, x.device)
    _checks.floating_tensor("b_enc", b_enc)
    if tuple(b_enc.shape) != (d_sae,):
        raise ValueError(f"b_enc: expected shape (d_sae,) = ({d_sae},), got {tuple(b_enc.shape)}")
    _same_device("b_enc", b_enc, x.device)
    if b_dec is not None:
        _checks.floating_tensor("b_dec", b_dec)
        if tuple(b_dec.shape) != (d_in,):
            raise ValueError(f"b_dec: expected shape (d_in,) = ({d_in},), got {tuple(b_dec.shape)}")
        _same_device("b_dec", b_dec, x.device)
    _checks.choice("activation", activation, SAE_ACTIVATIONS)
    _checks.choice("output", output, SAE_OUTPUTS)
    _checks.boolean("relu_first", relu_first)
    _checks.positive_number("bandwidth", bandwidth)
    if relu_first and activation != "topk":
        raise ValueError("relu_first: only meaningful with activation='topk'")
    theta = None
    if activation == "topk":
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k: activation='topk' needs an int k, got {type(k).__name__}")
        if not 1 <= k <= d_sae:
            raise ValueError(f"k: must be in [1, d_sae={d_sae}], got {k}")
    elif activation == "batchtopk":
        if (k is None) == (threshold is None):
            raise ValueError("k, threshold: activation='batchtopk' needs exactly one: k (training, k·N codes over "
                             "the batch) or threshold (inference)")
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, (int, float)):
                raise TypeError(f"k: expected a number, got {type(k).__name__}")
            if not (0 < k <= d_sae):
                raise ValueError(f"k: must be in (0, d_sae={d_sae}], got {k}")
            k = float(k)
    elif k is not None:
        raise ValueError(f"k: only used by 'topk' and 'batchtopk', not {activation!r}")
    if activation == "jumprelu":
        if threshold is None:
            raise ValueError("threshold: activation='jumprelu' needs a threshold (d_sae,) or scalar")
        theta = _threshold_tensor(threshold, d_sae, x.device, per_feature=True)
        theta = theta.reshape(-1).expand(d_sae) if theta.numel() == 1 else theta
    elif activation == "batchtopk" and threshold is not None:
        theta = _threshold_tensor(threshold, d_sae, x.device, per_feature=False).reshape(())
    elif threshold is not None and activation != "batchtopk":
        raise ValueError(f"threshold: only used by 'jumprelu' and 'batchtopk', not {activation!r}")
    return k, theta


def batch_topk_count(k: float, n_rows: int) -> int:
    """Codes kept by BatchTopK over n_rows rows: int(k · n_rows) (SAELens)."""
    return int(k * n_rows)


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLU(torch.autograd.Function):
    """relu(h)·[h > θ] with the straight-through estimator of Rajamanoharan et al.
    (Gemma Scope; SAELens): dh = g·[h > θ]; dθ = Σ_rows −(θ/ε)·rect((h − θ)/ε)·g,
    rect(u) = [−½ < u < ½], ε the bandwidth. θ (d_sae,) float32."""

    @staticmethod
    def forward(h, theta, bandwidth):
        return torch.relu(h) * (h > theta)

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, theta, bandwidth = inputs
        ctx.save_for_backward(h, theta)
        ctx.bandwidth = bandwidth

    @staticmethod
    def backward(ctx, g):
        h, theta = ctx.saved_tensors
        th = theta.to(h.dtype)
        gh = g * (h > th)
        gtheta = (-(th / ctx.bandwidth) * _rectangle((h - th) / ctx.bandwidth) * g).reshape(-1, h.shape[-1]).sum(0)
        return gh, gtheta.to(theta.dtype).reshape(theta.shape), None


def _dense_to_csr(dense: torch.Tensor) -> CsrCodes:
    d_sae = dense.shape[-1]
    flat = dense.reshape(-1, d_sae)
    rows, cols = (flat != 0).nonzero(as_tuple=True)
    crow = torch.zeros(flat.shape[0] + 1, dtype=torch.int64, device=dense.device)
    crow[1:] = torch.bincount(rows, minlength=flat.shape[0]).cumsum(0)
    return CsrCodes(crow, cols, flat[rows, cols], tuple(dense.shape))


def sae_pre_activations(x, W_enc, b_enc, b_dec=None) -> torch.Tensor:
    """h = (x − b_dec) W_enc + b_enc (..., d_sae) in the accumulation dtype, computed
    in W_enc's dtype: x and the biases are first rounded to it."""
    dtype = W_enc.dtype
    acc = acc_dtype(dtype)
    xa = x.to(dtype).to(acc)
    if b_dec is not None:
        xa = xa - b_dec.to(dtype).to(acc)
    return xa @ W_enc.to(acc) + b_enc.to(dtype).to(acc)


def sae_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    *,
    b_dec: Optional[torch.Tensor] = None,
    activation: str = "relu",
    k=None,
    threshold=None,
    relu_first: bool = False,
    output: str = "dense",
    bandwidth: float = 0.001,
):
    """SAE codes of x (..., d_in), the plain-PyTorch way (dense pre-activations).

    h = (x − b_dec) W_enc + b_enc. relu: relu(h). topk: the k largest h per row,
    then ReLU (relu_first: ReLU, then the k largest). jumprelu: relu(h)·[h > θ].
    batchtopk: the int(k·N) largest relu(h) over all N rows (threshold given: relu(h)·[h > θ]).
    Returns (..., d_sae) in W_enc's dtype, or SparseCodes / CsrCodes."""
    k, theta = check_sae_encode_args(x, W_enc, b_enc, b_dec, activation, k, threshold, relu_first, output, bandwidth)
    dtype = W_enc.dtype
    d_sae = W_enc.shape[1]
    h = sae_pre_activations(x, W_enc, b_enc, b_dec)
    if activation == "topk":
        values, indices = (torch.relu(h) if relu_first else h).topk(k, dim=-1)
        codes = SparseCodes(torch.relu(values).to(dtype), indices, d_sae)
        return codes if output == "sparse" else codes.to_dense()
    if activation == "relu":
        dense = torch.relu(h)
    elif theta is not None:
        dense = JumpReLU.apply(h, theta.expand(d_sae), bandwidth)
    else:  # batchtopk training
        acts = torch.relu(h)
        flat = acts.reshape(-1)
        top = flat.topk(batch_topk_count(k, flat.numel() // d_sae))
        dense = torch.zeros_like(flat).scatter(0, top.indices, top.values).reshape(acts.shape)
    dense = dense.to(dtype)
    return _dense_to_csr(dense) if output == "sparse" else dense


def sae_decode(codes, W_dec: torch.Tensor, b_dec: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x̂ = codes W_dec + b_dec (..., d_in) in W_dec's dtype, float32 (float64) accumulation.
    codes: dense (..., d_sae), SparseCodes or CsrCodes."""
    if isinstance(codes, (SparseCodes, CsrCodes)):
        codes = codes.to_dense()
    acc = acc_dtype(W_dec.dtype)
    out = codes.to(W_dec.dtype).to(acc) @ W_dec.to(acc)
    if b_dec is not None:
        out = out + b_dec.to(W_dec.dtype).to(acc)
    return out.to(W_dec.dtype)
# ---- HSIC and CKA (DESIGN.md §4) ------------------------------------------------------


def check_samples(name: str, t, *, min_dim: int, shape_hint: str) -> torch.Tensor:
    """A floating tensor with n >= 1 samples (dim −2) and d >= 1 features (dim −1)."""
    _checks.floating_tensor(name, t, min_dim=min_dim, shape_hint=shape_hint)
    if t.shape[-2] < 1 or t.shape[-1] < 1:
        raise ValueError(f"{name}: needs n >= 1 samples and d >= 1 features {shape_hint}, got shape {tuple(t.shape)}")
    return t


def check_same_kind(name: str, t: torch.Tensor, first_name: str, first: torch.Tensor) -> None:
    """`t` has the dtype and device of `first` (no silent promotion or transfer)."""
    if t.dtype != first.dtype:
        raise TypeError(f"{name}: dtype {t.dtype} differs from {first_name}'s {first.dtype}")
    if t.device != first.device:
        raise ValueError(f"{name}: on device {t.device} but {first_name} on {first.device}")


def check_sample_count(name: str, n: int, debiased: bool) -> None:
    """Biased HSIC divides by (n−1)², the unbiased estimator by n(n−3) and (n−2)."""
    need = 4 if debiased else 2
    if n < need:
        which = "the unbiased estimator (debiased=True)" if debiased else "HSIC"
        raise ValueError(f"{name}: {which} needs n >= {need} samples, got n={n}")


def check_hsic_args(x, y, kernel, debiased, sigma, threshold, median):
    """Validates the arguments of :func:`hsic` / :func:`cka`; returns (sigma, threshold)."""
    hint = "(shape (..., n, d))"
    check_samples("x", x, min_dim=2, shape_hint=hint)
    check_samples("y", y, min_dim=2, shape_hint=hint)
    check_same_kind("y", y, "x", x)
    if y.shape[-2] != x.shape[-2]:
        raise ValueError(f"y: has n={y.shape[-2]} samples but x has n={x.shape[-2]} (shapes {tuple(x.shape)}, "
                         f"{tuple(y.shape)})")
    if y.shape[:-2] != x.shape[:-2]:
        raise ValueError(f"y: batch dims {tuple(y.shape[:-2])} differ from x's {tuple(x.shape[:-2])}")
    _checks.choice("kernel", kernel, GRAM_KERNELS)
    _checks.boolean("debiased", debiased)
    check_sample_count("x", x.shape[-2], debiased)
    sigma = _checks.positive_number("sigma", sigma, allow_none=True)
    threshold = _checks.positive_number("threshold", threshold)
    _checks.choice("median", median, MEDIANS)
    return sigma, threshold


def zero_variance_tolerance(dtype: torch.dtype) -> float:
    """A self-HSIC numerator ‖H K H‖²_F (or its unbiased twin ‖Ũ_K‖²_F) at most this
    times Σ K∘K is rounding noise, and the representation counts as constant. Two
    floors: the Gram entries' own rounding (relative eps each: noise energy
    ~eps² Σ K∘K), and the centering, which cancels terms of size Σ K∘K in float64
    (~n·2⁻⁵³ relative at worst for n up to ~10⁵: 2⁻³⁶ ≈ 1.5e-11)."""
    return max(16 * torch.finfo(acc_dtype(dtype)).eps ** 2, 2.0**-36)


def constant_rows(x: torch.Tensor) -> torch.Tensor:
    """(...,) True where all n rows of x (..., n, d) are identical (a zero-variance
    representation; exact comparison, NaN rows are not identical)."""
    return (x == x[..., :1, :]).all(-1).all(-1)


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """(...,) True where t (..., a, b) holds no NaN or ±Inf."""
    return torch.isfinite(t).all(-1).all(-1)


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


def _check_grams(k, l, debiased):
    hint = "(shape (..., n, n))"
    check_samples("k", k, min_dim=2, shape_hint=hint)
    check_samples("l", l, min_dim=2, shape_hint=hint)
    for name, g in (("k", k), ("l", l)):
        if g.shape[-1] != g.shape[-2]:
            raise ValueError(f"{name}: expected square Gram matrices (..., n, n), got shape {tuple(g.shape)}")
    check_same_kind("l", l, "k", k)
    if l.shape != k.shape:
        raise ValueError(f"l: shape {tuple(l.shape)} differs from k's {tuple(k.shape)}")
    _checks.boolean("debiased", debiased)
    check_sample_count("k", k.shape[-1], debiased)


def hsic_from_grams(k: torch.Tensor, l: torch.Tensor, *, debiased: bool = False) -> torch.Tensor:
    """HSIC of Gram matrices k, l (..., n, n) -> (...): biased tr(KHLH)/(n−1)², or
    (debiased) the unbiased estimator of Song et al. 2012 (n >= 4)."""
    _check_grams(k, l, debiased)
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
    _check_grams(k, l, debiased)
    ka, la = k.to(acc_dtype(k.dtype)), l.to(acc_dtype(l.dtype))
    kc, lc = center_gram(ka, debiased), center_gram(la, debiased)
    return _cka_of_centered(kc, lc, ka, la, zero_variance_tolerance(k.dtype))


def _kernel_gram(x, kernel, sigma, threshold, median):
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
    k = _kernel_gram(x, kernel, sigma, threshold, median)
    l = _kernel_gram(y, kernel, sigma, threshold, median)
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
    k = _kernel_gram(x, kernel, sigma, threshold, median)
    l = _kernel_gram(y, kernel, sigma, threshold, median)
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


def check_layers(name: str, layers, first=None) -> list:
    """A non-empty sequence of (n, d_i) tensors sharing n, dtype and device (with `first`'s too)."""
    if isinstance(layers, torch.Tensor) or not isinstance(layers, (list, tuple)):
        raise TypeError(f"{name}: expected a list or tuple of (n, d) tensors, got {type(layers).__name__}")
    if len(layers) == 0:
        raise ValueError(f"{name}: expected at least one layer")
    ref_name, ref = (f"{name}[0]", layers[0]) if first is None else first
    for i, t in enumerate(layers):
        check_samples(f"{name}[{i}]", t, min_dim=2, shape_hint="(shape (n, d))")
        if t.dim() != 2:
            raise ValueError(f"{name}[{i}]: expected shape (n, d), got {tuple(t.shape)}")
        check_same_kind(f"{name}[{i}]", t, ref_name, ref)
        if t.shape[0] != ref.shape[0]:
            raise ValueError(f"{name}[{i}]: has n={t.shape[0]} samples but {ref_name} has n={ref.shape[0]}")
    return list(layers)


def check_cka_matrix_args(xs, ys, kernel, debiased, sigma, threshold, median):
    """Validates :func:`cka_matrix` arguments; returns (xs, ys or None, sigma, threshold)."""
    xs = check_layers("xs", xs)
    if ys is not None:
        ys = check_layers("ys", ys, ("xs[0]", xs[0]))
    _checks.choice("kernel", kernel, GRAM_KERNELS)
    _checks.boolean("debiased", debiased)
    check_sample_count("xs[0]", xs[0].shape[0], debiased)
    sigma = _checks.positive_number("sigma", sigma, allow_none=True)
    threshold = _checks.positive_number("threshold", threshold)
    _checks.choice("median", median, MEDIANS)
    return xs, ys, sigma, threshold


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
        k = _kernel_gram(x, kernel, sigma, threshold, median)
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
    """Minibatch CKA (Nguyen, Raghu & Kornblith 2021; DESIGN.md §4) in plain PyTorch.

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
        kx = [center_gram(_kernel_gram(x, kernel, s, t, median), debiased) for x in xs]
        ky = kx if ys is None else [center_gram(_kernel_gram(y, kernel, s, t, median), debiased) for y in ys]
        h = torch.stack([torch.stack([(k * l).sum() for l in ky]) for k in kx]) / norm
        hx = torch.stack([(k * k).sum() for k in kx]) / norm
        hy = torch.stack([(l * l).sum() for l in ky]) / norm
        cross, selfs_x, selfs_y = (h, hx, hy) if cross is None else (cross + h, selfs_x + hx, selfs_y + hy)
    ok = (selfs_x[:, None] > 0) & (selfs_y[None, :] > 0)
    denom = torch.where(ok, selfs_x[:, None] * selfs_y[None, :], torch.ones_like(cross))
    return torch.where(ok, cross / denom.sqrt(), torch.full_like(cross, torch.nan))


# ---- activation sparsity (DESIGN.md §4) -------------------------------------------------

SPARSITY_MAX_TOP_P = 8  # csrc/common/sparsity_math.h kMaxTopP
TOP_K_TOLERANCE = 1e-9  # k = ceil(p·n − 1e-9): p·n that is an integer up to rounding (0.07·100) gives it


def check_sparsity_args(a, eps, top_p, dense_threshold, density_bins, row_bins, ordered, *, name="a", min_rows=1):
    """Validates the arguments of :func:`sparsity_stats`; returns (eps, top_p tuple, dense_threshold)."""
    import math
    import numbers

    _checks.floating_tensor(name, a, min_dim=1, shape_hint="(..., d)")
    d = a.shape[-1]
    if d < 1:
        raise ValueError(f"{name}: needs d >= 1 features (last dim), got shape {tuple(a.shape)}")
    rows = a.numel() // d
    if rows < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} row(s) (shape (..., d)), got shape {tuple(a.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a real number, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite number >= 0, got {eps}")
    if isinstance(top_p, numbers.Real):
        top_p = (top_p,)
    if not isinstance(top_p, (tuple, list)):
        raise TypeError(f"top_p: expected a sequence of fractions, got {type(top_p).__name__}")
    if len(top_p) > SPARSITY_MAX_TOP_P:
        raise ValueError(f"top_p: at most {SPARSITY_MAX_TOP_P} values, got {len(top_p)}")
    for p in top_p:
        if isinstance(p, bool) or not isinstance(p, numbers.Real):
            raise TypeError(f"top_p: expected real numbers, got {type(p).__name__}")
        if not (0.0 < float(p) <= 1.0):
            raise ValueError(f"top_p: each value must be in (0, 1], got {p}")
    top_p = tuple(float(p) for p in top_p)
    if isinstance(dense_threshold, bool) or not isinstance(dense_threshold, numbers.Real):
        raise TypeError(f"dense_threshold: expected a real number, got {type(dense_threshold).__name__}")
    dense_threshold = float(dense_threshold)
    if not (0.0 <= dense_threshold <= 1.0):
        raise ValueError(f"dense_threshold: expected a frequency in [0, 1], got {dense_threshold}")
    for arg, value in (("density_bins", density_bins), ("row_bins", row_bins)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{arg}: expected an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{arg}: expected >= 1, got {value}")
    _checks.boolean("ordered", ordered)
    return eps, top_p, dense_threshold


def _sparsity_rows(x: torch.Tensor, eps: float, top_p: tuple, ordered: bool) -> dict:
    """Per-row statistics of x (N, d) (float32 or float64) -> dict of (N,) / (N, P) tensors in x.dtype
    (l0 and nonfinite int64). Row sums in float64 (the thresholded L0 compares values with a threshold
    derived from them); ordered statistics from one descending sort of |a|."""
    finite = torch.isfinite(x)
    n = finite.sum(-1)
    absx = torch.where(finite, x.abs(), torch.zeros_like(x))
    a64 = absx.double()
    n64 = n.double()
    l1 = a64.sum(-1)
    l2sq = (a64 * a64).sum(-1)
    sqrt_n = n64.sqrt()
    hoyer = (sqrt_n - l1 / l2sq.sqrt()) / (sqrt_n - 1)
    hoyer = torch.where((n > 1) & (l2sq > 0), hoyer, torch.full_like(hoyer, float("nan")))
    out = {
        "l0": (absx > eps).sum(-1),
        "l1": l1.to(x.dtype),
        "l2": l2sq.sqrt().to(x.dtype),
        "hoyer": hoyer.to(x.dtype),
        "nonfinite": x.shape[-1] - n,
    }
    if not ordered:
        return out
    nan = torch.full_like(l1, float("nan"))
    defined = l1 > 0
    # Thresholded L0: |a| > mean(|a|) + std(|a|), population std, as a fraction of n.
    mean_abs = l1 / n64
    threshold = mean_abs + (l2sq / n64 - mean_abs * mean_abs).clamp_min(0).sqrt()
    above = ((a64 > threshold[:, None]) & finite).sum(-1)
    out["thresholded_l0"] = torch.where(n > 0, above / n64, nan).to(x.dtype)
    # Effective ranks: exp of the entropy of |a|/Σ|a| and of a²/Σa² (0·log 0 = 0).
    for name, weights, total in (("effective_rank_l1", a64, l1), ("effective_rank_l2", a64 * a64, l2sq)):
        p = weights / total[:, None]
        entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)
        out[name] = torch.where(defined, entropy.exp(), nan).to(x.dtype)
    # One sort: |a| descending, non-finite entries (as −1) after the n finite ones.
    desc, _ = torch.sort(torch.where(finite, x.abs(), -torch.ones_like(x)), dim=-1, descending=True)
    j = torch.arange(x.shape[-1], device=x.device)
    desc = torch.where(j < n[:, None], desc, torch.zeros_like(desc)).double()
    # Gini over |a| ascending, i = n − j: 2Σ i·a₍ᵢ₎/(nΣa) − (n+1)/n = Σ (n − 2j − 1)·a_j / (nΣa).
    gini = ((n64[:, None] - 2 * j - 1) * desc).sum(-1) / (n64 * l1)
    out["gini"] = torch.where(defined, gini, nan).to(x.dtype)
    top_l1, top_l2 = [], []
    cum1, cum2 = desc.cumsum(-1), (desc * desc).cumsum(-1)
    for p in top_p:
        k = torch.ceil(p * n64 - TOP_K_TOLERANCE).clamp_min(1).long()
        last = (k - 1).clamp_max(x.shape[-1] - 1)[:, None]
        top_l1.append(torch.where(defined, cum1.gather(1, last)[:, 0] / l1, nan))
        top_l2.append(torch.where(defined, cum2.gather(1, last)[:, 0] / l2sq, nan))
    out["top_p_l1"] = torch.stack(top_l1, -1).to(x.dtype) if top_p else x.new_zeros((x.shape[0], 0))
    out["top_p_l2"] = torch.stack(top_l2, -1).to(x.dtype) if top_p else x.new_zeros((x.shape[0], 0))
    return out


def sparsity_stats(
    a: torch.Tensor,
    *,
    eps: float = 0.0,
    top_p=(0.01, 0.05, 0.1),
    dense_threshold: float = 0.1,
    density_bins: int = 50,
    row_bins: int = 20,
    ordered: bool = True,
    row_batch: int = 4096,
):
    """Sparsity statistics of a (..., d) (rows = samples, last dim = features), plain PyTorch.

    Definitions, degenerate cases and fields: :class:`repkern.sparsity_result.SparsityStats`.
    Per-feature statistics from vectorized reductions over all rows; per-row statistics by batches of
    `row_batch` rows (one torch.sort per batch), computed in float32 (float64 for float64 input) with
    row sums in float64.
    """
    from repkern import sparsity_result as sr

    eps, top_p, dense_threshold = check_sparsity_args(a, eps, top_p, dense_threshold, density_bins, row_bins, ordered)
    d = a.shape[-1]
    x = a.reshape(-1, d).to(acc_dtype(a.dtype))
    rows = x.shape[0]
    state = sparsity_feature_state(x, eps)
    per_row = sparsity_rows(x, eps, top_p, ordered, row_batch=row_batch)
    sums, defined, hists = sr.row_summary_parts(per_row, d, row_bins)
    lead = a.shape[:-1]
    shaped = {k: v.reshape(*lead, *v.shape[1:]) for k, v in per_row.items()}
    return sr.build_stats(state, rows, shaped, sums, defined, hists, stat_dtype=x.dtype, top_p=top_p, eps=eps,
                          dense_threshold=dense_threshold, density_bins=density_bins, row_bins=row_bins)


def sparsity_feature_state(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-feature state (10, d) float64 of x (N, d) (fields: repkern.sparsity_result.FEATURE_FIELDS), by
    vectorized reductions over all rows in x's accumulation precision: over the finite values of each
    column, counts, mean, central moment sums Σδ², Σδ³, Σδ⁴, min, max (±inf when none), Σ|a|."""
    x = x.to(acc_dtype(x.dtype))
    finite = torch.isfinite(x)
    count = finite.sum(0)
    xf = torch.where(finite, x, torch.zeros_like(x))
    mean = torch.where(count > 0, xf.sum(0) / count.clamp_min(1), torch.zeros_like(xf[0]))
    dev = torch.where(finite, x - mean, torch.zeros_like(x))
    dev2 = dev * dev
    big = torch.full_like(x, float("inf"))
    columns = [
        count, (xf.abs() > eps).sum(0), torch.isnan(x).sum(0), mean, dev2.sum(0), (dev2 * dev).sum(0),
        (dev2 * dev2).sum(0), torch.where(finite, x, big).amin(0), torch.where(finite, x, -big).amax(0),
        xf.abs().sum(0),
    ]
    return torch.stack([c.double() for c in columns])


def sparsity_rows(x: torch.Tensor, eps: float, top_p: tuple, ordered: bool, *, row_batch: int = 4096) -> dict:
    """Per-row statistics of x (N, d) by batches of `row_batch` rows (one torch.sort per batch)."""
    x = x.to(acc_dtype(x.dtype))
    parts = [_sparsity_rows(x[i : i + row_batch], eps, top_p, ordered) for i in range(0, x.shape[0], row_batch)]
    if not parts:
        parts = [_sparsity_rows(x[:0], eps, top_p, ordered)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
