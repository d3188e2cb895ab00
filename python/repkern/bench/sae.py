"""SAE benchmarks (docs/benchmarks.md): TopK encode to sparse codes against plain torch
(dense matmul + topk; + scatter for dense output) and against its GEMM alone, in the
same run, with peak memory; sparse decode (gather-accumulate) against dense decode.

The GEMM-alone provider is x' W_enc with x' = x − b_dec precomputed: the floor the
fused encode is measured against (selection should be nearly free).

Shapes (N, d_in, d_sae, k): CPU ENCODE_SHAPES, GPU (CUDA device) GPU_ENCODE_SHAPES (N = 65536 tokens,
d_in = 4096, d_sae up to 131072; the dense-output reference needs two N×d_sae buffers, 34 GB each
in float32, and is reported as skipped where it does not fit), --quick QUICK_SHAPES. The first shape
also runs dense-output encode and the decodes. Default dtypes: float32, plus a bfloat16 encode of
the first shape; ``dtypes`` runs every case in each of them."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

import repkern
from repkern import reference
from repkern.bench import Case, generator, roofline, select_dtypes
from repkern.bench.timing import dtype_name

ENCODE_SHAPES = [(4096, 768, 24576, 32), (4096, 768, 24576, 64), (4096, 768, 65536, 32), (4096, 768, 65536, 64)]
GPU_ENCODE_SHAPES = [(65536, 4096, 131072, 64), (65536, 4096, 131072, 32), (65536, 4096, 32768, 64)]
QUICK_SHAPES = [(512, 128, 4096, 32)]
GPU_TIMING = {"warmup": 1, "min_repeats": 2, "max_repeats": 3, "min_time_s": 0.0}  # ~1 s calls in float32


def _sae(n, d_in, d_sae, dtype, device):
    g = generator(device, 0)
    W_enc = (torch.randn(d_in, d_sae, generator=g, device=device) / d_in**0.5).to(dtype)
    b_enc = (0.1 * torch.randn(d_sae, generator=g, device=device)).to(dtype)
    b_dec = (0.1 * torch.randn(d_in, generator=g, device=device)).to(dtype)
    x = torch.randn(n, d_in, generator=g, device=device).to(dtype)
    return x, W_enc, b_enc, b_dec


def _encode_case(n, d_in, d_sae, k, dtype, device, output, timing) -> Case:
    def build():
        x, W_enc, b_enc, b_dec = _sae(n, d_in, d_sae, dtype, device)
        kw = dict(b_dec=b_dec, activation="topk", k=k, output=output)
        x_centered = x - b_dec
        return {
            "repkern": lambda: repkern.sae_encode(x, W_enc, b_enc, **kw),
            "reference": lambda: reference.sae_encode(x, W_enc, b_enc, **kw),
            "gemm_only": lambda: x_centered @ W_enc,
        }

    return Case(op=f"sae_encode[topk->{output}]", shape=f"N={n} d_in={d_in} d_sae={d_sae} k={k}", dtype=dtype,
                providers=("repkern", "reference", "gemm_only"), build=build, flops=2.0 * n * d_in * d_sae,
                timing=timing, model=roofline.sae_encode_topk(n, d_in, d_sae, k, dtype_name(dtype))
                if device.type == "cuda" and output == "sparse" else None)


def _decode_case(n, d_in, d_sae, k, dtype, device, timing) -> Case:
    def build():
        x, W_enc, b_enc, b_dec = _sae(n, d_in, d_sae, dtype, device)
        W_dec = W_enc.mT.contiguous()
        codes = repkern.sae_encode(x, W_enc, b_enc, b_dec=b_dec, activation="topk", k=k, output="sparse")
        del x, W_enc
        dense = codes.to_dense()
        return {
            "repkern": lambda: repkern.sae_decode(codes, W_dec, b_dec),
            "reference": lambda: reference.sae_decode(dense, W_dec, b_dec),
        }

    elem = dtype.itemsize
    return Case(op="sae_decode[topk]", shape=f"N={n} d_in={d_in} d_sae={d_sae} k={k}", dtype=dtype,
                providers=("repkern", "reference"), build=build,
                # gathered rows, output, codes (values + int64 indices)
                bytes_moved=float(elem * (n * k * d_in + n * d_in) + (elem + 8) * n * k),
                timing=timing, model=roofline.sae_decode(n, d_in, d_sae, k, dtype_name(dtype))
                if device.type == "cuda" else None)


def cases(device: torch.device, quick: bool, dtypes: Optional[Sequence[torch.dtype]] = None,
          full: bool = False) -> list[Case]:
    gpu = device.type == "cuda" and not quick
    shapes = QUICK_SHAPES if quick else GPU_ENCODE_SHAPES if gpu else ENCODE_SHAPES
    timing = GPU_TIMING if gpu else {}
    n, d_in, d_sae, k = shapes[0]
    if dtypes is None:  # float32 everywhere, plus one bfloat16 encode
        out = [_encode_case(*s, torch.float32, device, "sparse", timing) for s in shapes]
        if not quick:
            out.append(_encode_case(n, d_in, d_sae, k, torch.bfloat16, device, "sparse", timing))
        main = [torch.float32]
    else:
        main = select_dtypes(dtypes, [])
        out = [_encode_case(*s, dtype, device, "sparse", timing) for dtype in main for s in shapes]
    for dtype in main:
        out.append(_encode_case(n, d_in, d_sae, k, dtype, device, "dense", timing))
        out += [_decode_case(n, d_in, d_sae, kk, dtype, device, timing)
                for kk in ((k,) if quick else (32, 64))]
    return out
