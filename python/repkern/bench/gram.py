"""Gram-matrix benchmarks: repkern.gram vs reference.gram end to end (GEMM
included: GFLOP/s of the full x xᵀ against the matmul ceiling), and the epilogue
kernel alone (GB/s against the copy ceiling)."""

from __future__ import annotations

import torch

import repkern
from repkern import reference
from repkern.bench import Case
from repkern.ops import gram as gram_ops


def _epilogue_case(n: int, kernel: str, device: torch.device) -> Case:
    """The native pass alone on a precomputed float32 inner-product matrix."""
    x = torch.randn(1, n, 64, device=device)
    inner = gram_ops.inner_products(x)
    out = torch.empty_like(inner)
    kind = gram_ops.KINDS[kernel]
    scale = torch.full((1,), -0.01, device=device) if kernel == "rbf" else None
    return Case(
        op=f"gram_epilogue[{kernel}]",
        shape=f"n={n}",
        dtype=torch.float32,
        providers={"repkern": lambda: gram_ops.epilogue(kind, gram_ops.GramPass.WRITE, inner, out, scale)},
        bytes_moved=4 * n * n / 2 + 4 * n * n,  # read the upper triangle, write everything
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    shapes = [(1, 1024, 128)] if quick else [(1, 2048, 768), (1, 4096, 768), (16, 512, 64)]
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    variants = [("linear", {}), ("cosine", {}), ("rbf", {}), ("rbf", {"center": True})]
    out = []
    for b, n, d in shapes:
        for dtype in dtypes:
            x = torch.randn(b, n, d, device=device).to(dtype)
            for kernel, kwargs in variants:
                label = kernel + ("+center" if kwargs.get("center") else "")
                out.append(Case(
                    op=f"gram[{label}]",
                    shape=f"B={b} n={n} d={d}",
                    dtype=dtype,
                    providers={
                        "repkern": lambda x=x, k=kernel, kw=kwargs: repkern.gram(x, k, **kw),
                        "reference": lambda x=x, k=kernel, kw=kwargs: reference.gram(x, k, **kw),
                    },
                    flops=2.0 * b * n * n * d,
                ))
    for n in [1024] if quick else [2048, 4096]:
        for kernel in ("cosine", "rbf"):
            out.append(_epilogue_case(n, kernel, device))
    return out
