"""Gram-matrix benchmarks: repkern.gram vs reference.gram end to end (GEMM
included: GFLOP/s of the full x xᵀ against the matmul ceiling of the same dtype), and
the epilogue kernel alone (GB/s against the copy ceiling).

Shapes: CPU (B, n, d) = (1, 2048, 768), (1, 4096, 768), (16, 512, 64); GPU (1, 8192, 4096),
(1, 32768, 4096), (64, 2048, 256); --quick (1, 1024, 128). Default dtypes float32 and
bfloat16 (quick: float32). The epilogue works on float32 inner products: float32 only. Linear cases
also time plain ``x @ x.mT`` (provider "matmul"). ``gram[rbf median]`` times the exact-median RBF Gram
with the fixed-σ one (provider "fixed-sigma"); ``gram_median_select`` the median's selection alone on the
distance matrix: this device's path, and "packed-kthvalue" (the triangle packed, then torch.kthvalue:
the CUDA path, and the CPU's before its native select)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

import repkern
from repkern import reference
from repkern.bench import Case, generator, roofline, select_dtypes
from repkern.bench.timing import dtype_name
from repkern.ops import gram as gram_ops

QUICK_SHAPES = [(1, 1024, 128)]
CPU_SHAPES = [(1, 2048, 768), (1, 4096, 768), (16, 512, 64)]
GPU_SHAPES = [(1, 8192, 4096), (1, 32768, 4096), (64, 2048, 256)]
EPILOGUE_N = {"quick": [1024], "cpu": [2048, 4096], "cuda": [8192, 32768]}
MEDIAN_SHAPES = {"quick": [(1, 1024, 128)], "cpu": [(1, 4096, 768)], "cuda": [(1, 32768, 4096)]}
VARIANTS = [("linear", {}), ("cosine", {}), ("rbf", {}), ("rbf", {"center": True})]


def _epilogue_case(n: int, kernel: str, device: torch.device) -> Case:
    """The native pass alone on a precomputed float32 inner-product matrix."""

    def build():
        x = torch.randn(1, n, 64, device=device, generator=generator(device, 0))
        inner = gram_ops.inner_products(x)
        out = torch.empty_like(inner)
        kind = gram_ops.KINDS[kernel]
        scale = torch.full((1,), -0.01, device=device) if kernel == "rbf" else None
        return {"repkern": lambda: gram_ops.epilogue(kind, gram_ops.GramPass.WRITE, inner, out, scale)}

    return Case(op=f"gram_epilogue[{kernel}]", shape=f"n={n}", dtype=torch.float32, providers=("repkern",),
                build=build, bytes_moved=4 * n * n / 2 + 4 * n * n,  # read the upper triangle, write everything
                model=roofline.gram_epilogue(kernel, n) if device.type == "cuda" else None)


def _gram_case(b: int, n: int, d: int, dtype: torch.dtype, kernel: str, kwargs: dict, device: torch.device) -> Case:
    plain = kernel == "linear" and not kwargs  # also bare `x @ x.mT`: no NaN-row handling, symmetry not promised

    def build():
        x = torch.randn(b, n, d, device=device, generator=generator(device, 0)).to(dtype)
        providers = {"repkern": lambda: repkern.gram(x, kernel, **kwargs),
                     "reference": lambda: reference.gram(x, kernel, **kwargs)}
        if plain:
            providers["matmul"] = lambda: x @ x.mT
        return providers

    label = kernel + ("+center" if kwargs.get("center") else "")
    names = ("repkern", "reference") + (("matmul",) if plain else ())
    return Case(op=f"gram[{label}]", shape=f"B={b} n={n} d={d}", dtype=dtype, providers=names,
                build=build, flops=2.0 * b * n * n * d,
                model=roofline.gram(b, n, d, dtype_name(dtype), kernel, kwargs.get("center", False))
                if device.type == "cuda" else None)


def _median_cases(b: int, n: int, d: int, device: torch.device) -> list[Case]:
    """The exact-median RBF Gram against the fixed-σ one (GEMM included), and the median's selection
    alone on the distance matrix (GB/s of one read of the upper triangle)."""

    def build_gram():
        x = torch.randn(b, n, d, device=device, generator=generator(device, 0))
        return {"repkern": lambda: repkern.gram(x, "rbf"),
                "fixed-sigma": lambda: repkern.gram(x, "rbf", sigma=float(d) ** 0.5)}

    def build_select():
        x = torch.randn(b, n, d, device=device, generator=generator(device, 0))
        dist = gram_ops.inner_products(x)
        gram_ops.epilogue(gram_ops.GramKind.SQDIST, gram_ops.GramPass.WRITE, dist, dist)

        def packed_kthvalue():
            packed = torch.empty((b, n * (n - 1) // 2), dtype=dist.dtype, device=device)
            for i in range(n - 1):
                start = i * (n - 1) - i * (i - 1) // 2
                packed[:, start : start + n - 1 - i] = dist[:, i, i + 1 :]
            return gram_ops.median_from_upper(packed, n, False)

        return {"repkern": lambda: gram_ops.median_sq_dist(dist, False), "packed-kthvalue": packed_kthvalue}

    shape = f"B={b} n={n} d={d}"
    return [Case(op="gram[rbf median]", shape=shape, dtype=torch.float32, providers=("repkern", "fixed-sigma"),
                 build=build_gram, flops=2.0 * b * n * n * d),
            Case(op="gram_median_select", shape=shape, dtype=torch.float32, providers=("repkern", "packed-kthvalue"),
                 build=build_select, bytes_moved=4.0 * b * n * (n - 1) / 2)]


def cases(device: torch.device, quick: bool, dtypes: Optional[Sequence[torch.dtype]] = None,
          full: bool = False) -> list[Case]:
    gpu = device.type == "cuda"
    shapes = QUICK_SHAPES if quick else GPU_SHAPES if gpu else CPU_SHAPES
    selected = select_dtypes(dtypes, [torch.float32] if quick else [torch.float32, torch.bfloat16])
    out = [_gram_case(b, n, d, dtype, kernel, kwargs, device)
           for b, n, d in shapes for dtype in selected for kernel, kwargs in VARIANTS]
    if torch.float32 in selected:
        for b, n, d in MEDIAN_SHAPES["quick" if quick else device.type]:
            out += _median_cases(b, n, d, device)
        for n in EPILOGUE_N["quick" if quick else device.type]:
            for kernel in ("cosine", "rbf"):
                out.append(_epilogue_case(n, kernel, device))
    return out
