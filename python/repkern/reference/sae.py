"""SAE encoding and decoding in plain PyTorch (dense pre-activations)."""

from __future__ import annotations

from typing import Optional

import torch

from repkern._common import acc_dtype, batch_topk_count, rectangle
from repkern._validation import check_sae_decode_args, check_sae_encode_args
from repkern.results.sae import CsrCodes, SparseCodes


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
        gtheta = (-(th / ctx.bandwidth) * rectangle((h - th) / ctx.bandwidth) * g).reshape(-1, h.shape[-1]).sum(0)
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
    check_sae_decode_args(codes, W_dec, b_dec)
    if isinstance(codes, (SparseCodes, CsrCodes)):
        codes = codes.to_dense()
    acc = acc_dtype(W_dec.dtype)
    out = codes.to(W_dec.dtype).to(acc) @ W_dec.to(acc)
    if b_dec is not None:
        out = out + b_dec.to(W_dec.dtype).to(acc)
    return out.to(W_dec.dtype)

