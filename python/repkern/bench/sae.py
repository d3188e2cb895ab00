"""SAE benchmarks (DESIGN.md §7): TopK encode to sparse codes against plain torch
(dense matmul + topk; + scatter for dense output) and against its GEMM alone, in the
same run, with peak memory; sparse decode (gather-accumulate) against dense decode.

The GEMM-alone provider is x' W_enc with x' = x − b_dec precomputed: the floor the
fused encode is measured against (selection should be nearly free)."""

from __future__ import annotations

import torch

import repkern
from repkern import reference
from repkern.bench import Case

ENCODE_SHAPES = [(4096, 768, 24576, 32), (4096, 768, 24576, 64), (4096, 768, 65536, 32), (4096, 768, 65536, 64)]
QUICK_SHAPES = [(512, 128, 4096, 32)]


def _sae(n, d_in, d_sae, dtype, device):
    g = torch.Generator().manual_seed(0)
    W_enc = (torch.randn(d_in, d_sae, generator=g) / d_in**0.5).to(dtype).to(device)
    b_enc = (0.1 * torch.randn(d_sae, generator=g)).to(dtype).to(device)
    b_dec = (0.1 * torch.randn(d_in, generator=g)).to(dtype).to(device)
    x = torch.randn(n, d_in, generator=g).to(dtype).to(device)
    return x, W_enc, b_enc, b_dec


def _encode_case(n, d_in, d_sae, k, dtype, device, output) -> Case:
    x, W_enc, b_enc, b_dec = _sae(n, d_in, d_sae, dtype, device)
    kw = dict(b_dec=b_dec, activation="topk", k=k, output=output)
    x_centered = x - b_dec
    return Case(
        op=f"sae_encode[topk->{output}]",
        shape=f"N={n} d_in={d_in} d_sae={d_sae} k={k}",
        dtype=dtype,
        providers={
            "repkern": lambda: repkern.sae_encode(x, W_enc, b_enc, **kw),
            "reference": lambda: reference.sae_encode(x, W_enc, b_enc, **kw),
            "gemm_only": lambda: x_centered @ W_enc,
        },
        flops=2.0 * n * d_in * d_sae,
    )


def _decode_case(n, d_in, d_sae, k, device) -> Case:
    x, W_enc, b_enc, b_dec = _sae(n, d_in, d_sae, torch.float32, device)
    W_dec = W_enc.mT.contiguous()
    codes = repkern.sae_encode(x, W_enc, b_enc, b_dec=b_dec, activation="topk", k=k, output="sparse")
    dense = codes.to_dense()
    return Case(
        op="sae_decode[topk]",
        shape=f"N={n} d_in={d_in} d_sae={d_sae} k={k}",
        dtype=torch.float32,
        providers={
            "repkern": lambda: repkern.sae_decode(codes, W_dec, b_dec),
            "reference": lambda: reference.sae_decode(dense, W_dec, b_dec),
        },
        bytes_moved=4.0 * (n * k * d_in + n * d_in) + 12.0 * n * k,  # gathered rows, output, codes
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    shapes = QUICK_SHAPES if quick else ENCODE_SHAPES
    out = [_encode_case(*s, torch.float32, device, "sparse") for s in shapes]
    n, d_in, d_sae, k = shapes[0]
    if not quick:
        out.append(_encode_case(n, d_in, d_sae, k, torch.bfloat16, device, "sparse"))
    out.append(_encode_case(n, d_in, d_sae, k, torch.float32, device, "dense"))
    out += [_decode_case(n, d_in, d_sae, kk, device) for kk in ((k,) if quick else (32, 64))]
    return out
