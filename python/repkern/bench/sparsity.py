"""Sparsity-statistics benchmarks: repkern.sparsity_stats vs reference.sparsity_stats (plain PyTorch
written the way a careful user would: vectorized reductions, one torch.sort per batch of 4096 rows),
computing the same statistics. GB/s counts one read of the activations (the floor of the work; the
outputs are a few values per row and per feature), shown against the copy and single-read (sum)
ceilings of the same run.

Cases: the DESIGN.md §7 targets (16384×2048 float32: full set vs plain torch; the one-read subset,
``ordered=False``, with a ``sum`` over the same tensor as the single-read ceiling) and the issue's
benchmark (65536×4096, float32 and bfloat16, full set).
"""

from __future__ import annotations

import torch

import repkern
from repkern import reference
from repkern.bench import Case


def _activations(rows: int, d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, d, generator=g)
    x = torch.relu(x - 0.5)  # post-ReLU-like: about 70% zeros
    return x.to(device=device, dtype=dtype)


def _case(op: str, x: torch.Tensor, ordered: bool, with_sum: bool = False, timing=None) -> Case:
    providers = {
        "repkern": lambda: repkern.sparsity_stats(x, ordered=ordered),
        "reference": lambda: reference.sparsity_stats(x, ordered=ordered),
    }
    if with_sum:
        providers["torch.sum"] = x.sum  # one read of the same tensor: the single-read ceiling
    rows, d = x.shape
    return Case(op=op, shape=f"{rows}x{d}", dtype=x.dtype, providers=providers,
                bytes_moved=float(x.numel() * x.element_size()), timing=timing or {})


def cases(device: torch.device, quick: bool) -> list[Case]:
    target = (2048, 512) if quick else (16384, 2048)
    issue = [(4096, 1024)] if quick else [(65536, 4096)]
    x = _activations(*target, torch.float32, device)
    out = [
        _case("sparsity[full]", x, ordered=True),
        _case("sparsity[one-read]", x, ordered=False, with_sum=True),
    ]
    # The reference needs over a minute per call at the issue's shape on a 2-core CPU: one timed call.
    slow = {} if quick or device.type == "cuda" else {"warmup": 0, "min_repeats": 1, "max_repeats": 1}
    for rows, d in issue:
        for dtype in (torch.float32, torch.bfloat16):
            out.append(_case("sparsity[full]", _activations(rows, d, dtype, device), ordered=True, timing=slow))
    return out
