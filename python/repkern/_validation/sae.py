"""Arguments of :func:`repkern.sae_encode`, :func:`repkern.sae_decode` and the SAE module."""

from __future__ import annotations

import math

import torch

from repkern._validation.common import FLOAT_DTYPES, boolean, choice, floating_tensor, positive_number, same_device
from repkern.results.sae import CsrCodes, SparseCodes, check_csr_codes, check_sparse_codes


SAE_ACTIVATIONS = ("relu", "topk", "jumprelu", "batchtopk")
SAE_OUTPUTS = ("dense", "sparse")


def threshold_tensor(threshold, d_sae: int, device: torch.device, *, per_feature: bool) -> torch.Tensor:
    """threshold as a float32 tensor: (d_sae,) per feature, or () for a scalar. Must be
    finite and >= 0 (a negative threshold is meaningless after the ReLU)."""
    if isinstance(threshold, torch.Tensor):
        if threshold.dtype not in FLOAT_DTYPES:
            raise TypeError(f"threshold: expected a floating tensor, got {threshold.dtype}")
        same_device("threshold", threshold, device)
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
    floating_tensor("x", x, min_dim=1, shape_hint="(..., d_in)")
    floating_tensor("W_enc", W_enc, min_dim=2, shape_hint="(d_in, d_sae)")
    if W_enc.dim() != 2:
        raise ValueError(f"W_enc: expected shape (d_in, d_sae), got {tuple(W_enc.shape)}")
    d_in, d_sae = W_enc.shape
    if d_in < 1 or d_sae < 1:
        raise ValueError(f"W_enc: needs d_in >= 1 and d_sae >= 1, got shape {tuple(W_enc.shape)}")
    if x.shape[-1] != d_in:
        raise ValueError(f"x: last dimension {x.shape[-1]} does not match d_in={d_in} of W_enc (d_in, d_sae)")
    same_device("W_enc", W_enc, x.device)
    floating_tensor("b_enc", b_enc)
    if tuple(b_enc.shape) != (d_sae,):
        raise ValueError(f"b_enc: expected shape (d_sae,) = ({d_sae},), got {tuple(b_enc.shape)}")
    same_device("b_enc", b_enc, x.device)
    if b_dec is not None:
        floating_tensor("b_dec", b_dec)
        if tuple(b_dec.shape) != (d_in,):
            raise ValueError(f"b_dec: expected shape (d_in,) = ({d_in},), got {tuple(b_dec.shape)}")
        same_device("b_dec", b_dec, x.device)
    choice("activation", activation, SAE_ACTIVATIONS)
    choice("output", output, SAE_OUTPUTS)
    boolean("relu_first", relu_first)
    positive_number("bandwidth", bandwidth)
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
        theta = threshold_tensor(threshold, d_sae, x.device, per_feature=True)
        theta = theta.reshape(-1).expand(d_sae) if theta.numel() == 1 else theta
    elif activation == "batchtopk" and threshold is not None:
        theta = threshold_tensor(threshold, d_sae, x.device, per_feature=False).reshape(())
    elif threshold is not None and activation != "batchtopk":
        raise ValueError(f"threshold: only used by 'jumprelu' and 'batchtopk', not {activation!r}")
    return k, theta


def check_sae_decode_args(codes, W_dec, b_dec):
    floating_tensor("W_dec", W_dec, min_dim=2, shape_hint="(d_sae, d_in)")
    if W_dec.dim() != 2:
        raise ValueError(f"W_dec: expected shape (d_sae, d_in), got {tuple(W_dec.shape)}")
    d_sae, d_in = W_dec.shape
    if b_dec is not None:
        floating_tensor("b_dec", b_dec)
        if tuple(b_dec.shape) != (d_in,):
            raise ValueError(f"b_dec: expected shape (d_in,) = ({d_in},), got {tuple(b_dec.shape)}")
        if b_dec.device != W_dec.device:
            raise ValueError(f"b_dec: expected a tensor on {W_dec.device} (where W_dec is), got {b_dec.device}")
    if isinstance(codes, (SparseCodes, CsrCodes)):
        (check_sparse_codes if isinstance(codes, SparseCodes) else check_csr_codes)(codes)
        values, indices = codes.values, (codes.indices if isinstance(codes, SparseCodes) else codes.col_indices)
        floating_tensor("codes.values", values, min_dim=0)
        if values.device != W_dec.device or indices.device != W_dec.device:
            raise ValueError(f"codes: expected tensors on {W_dec.device} (where W_dec is)")
        if indices.dtype != torch.int64 or indices.shape != values.shape:
            raise ValueError("codes: indices must be int64 with the shape of values")
        code_d_sae = codes.d_sae if isinstance(codes, SparseCodes) else codes.shape[-1]
        if code_d_sae != d_sae:
            raise ValueError(f"codes: d_sae={code_d_sae} does not match W_dec (d_sae, d_in) = {tuple(W_dec.shape)}")
        data_checks = not torch.compiler.is_compiling()  # value checks would break the graph
        if data_checks and indices.numel() and (bool(indices.min() < 0) or bool(indices.max() >= d_sae)):
            raise ValueError(f"codes: indices must lie in [0, d_sae={d_sae})")
        if isinstance(codes, CsrCodes):
            n = math.prod(codes.shape[:-1])
            crow = codes.crow_indices
            if crow.shape != (n + 1,) or crow.dtype != torch.int64:
                raise ValueError(f"codes: crow_indices must be int64 of shape (N + 1,) = ({n + 1},)")
            if data_checks and (int(crow[0]) != 0 or int(crow[-1]) != values.numel() or bool((crow.diff() < 0).any())):
                raise ValueError("codes: crow_indices must rise from 0 to nnz")
    else:
        floating_tensor("codes", codes, min_dim=1, shape_hint="(..., d_sae)")
        if codes.shape[-1] != d_sae:
            raise ValueError(f"codes: last dimension {codes.shape[-1]} does not match d_sae={d_sae} of W_dec")
        if codes.device != W_dec.device:
            raise ValueError(f"codes: expected a tensor on {W_dec.device} (where W_dec is), got {codes.device}")

