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
