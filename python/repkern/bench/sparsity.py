"""Sparsity-statistics benchmarks: repkern.sparsity_stats vs reference.sparsity_stats (plain PyTorch
written the way a careful user would: vectorized reductions, one torch.sort per batch of 4096 rows),
computing the same statistics. GB/s counts one read of the activations (the floor of the work; the
outputs are a few values per row and per feature), shown against the copy and single-read (sum)
ceilings of the same run.

Cases: the targets of docs/benchmarks.md (16384×2048 float32: full set vs plain torch; the one-read
subset, ``ordered=False``, with a ``sum`` over the same tensor as the single-read ceiling) and a larger
benchmark (65536×4096, float32 and bfloat16, full set). GPU (CUDA device): the target pair (full
set, one-read subset + sum) at 262144×4096 float32, and the full set at 1048576×4096 (1M rows) in
float32 and bfloat16. ``dtypes`` runs every case in each of them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

import repkern
from repkern import reference
from repkern.bench import Case, generator, roofline, select_dtypes
from repkern.bench.timing import dtype_name

SHAPES = {  # (target shape, larger shapes)
    "quick": ((2048, 512), [(4096, 1024)]),
    "cpu": ((16384, 2048), [(65536, 4096)]),
    "cuda": ((1 << 18, 4096), [(1 << 20, 4096)]),
}
CHUNK_ELEMENTS = 1 << 24  # generated in float32 chunks of 64 MB: no full-size float32 temporary


def _activations(rows: int, d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = generator(device, 0)
    out = torch.empty(rows, d, dtype=dtype, device=device)
    step = max(1, CHUNK_ELEMENTS // d)
    for i in range(0, rows, step):
        chunk = torch.randn(min(step, rows - i), d, generator=g, device=device)
        out[i : i + step].copy_(chunk.sub_(0.5).relu_())  # post-ReLU-like: about 70% zeros
    return out


def _case(op: str, rows: int, d: int, dtype: torch.dtype, device: torch.device, ordered: bool,
          with_sum: bool = False, timing=None) -> Case:
    def build():
        x = _activations(rows, d, dtype, device)
        providers = {
            "repkern": lambda: repkern.sparsity_stats(x, ordered=ordered),
            "reference": lambda: reference.sparsity_stats(x, ordered=ordered),
        }
        if with_sum:
            providers["torch.sum"] = x.sum  # one read of the same tensor: the single-read ceiling
        return providers

    names = ("repkern", "reference") + (("torch.sum",) if with_sum else ())
    return Case(op=op, shape=f"{rows}x{d}", dtype=dtype, providers=names, build=build,
                bytes_moved=float(rows * d * dtype.itemsize), timing=timing or {},
                model=roofline.sparsity(rows, d, dtype_name(dtype), ordered) if device.type == "cuda" else None)


def cases(device: torch.device, quick: bool, dtypes: Optional[Sequence[torch.dtype]] = None,
          full: bool = False) -> list[Case]:
    target, issue = SHAPES["quick" if quick else device.type]
    out = []
    for dtype in select_dtypes(dtypes, [torch.float32]):
        out += [
            _case("sparsity[full]", *target, dtype, device, ordered=True),
            _case("sparsity[one-read]", *target, dtype, device, ordered=False, with_sum=True),
        ]
    # The reference needs over a minute per call at the larger shape on a 2-core CPU: one timed call.
    slow = {} if quick or device.type == "cuda" else {"warmup": 0, "min_repeats": 1, "max_repeats": 1}
    for rows, d in issue:
        for dtype in select_dtypes(dtypes, [torch.float32, torch.bfloat16]):
            out.append(_case("sparsity[full]", rows, d, dtype, device, ordered=True, timing=slow))
    return out
