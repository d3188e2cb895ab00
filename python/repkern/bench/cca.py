"""CCA-family benchmarks: ``repkern.cca``, ``svcca``, ``pwcca`` against repkern.reference (the SVD of
the centered data matrices) in the same run.

Cases (a comparison of two layers): n=4096 samples, d=512 vs 384.
GPU (CUDA device): n=32768, d=1024 vs 768.
Default dtype float32; ``dtypes`` runs every case in each of them. FLOPs: the Gram blocks (float64).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

import repkern
from repkern import reference
from repkern.bench import Case, select_dtypes
from repkern.bench.shape import pair

FEW = {"warmup": 1, "min_repeats": 2, "max_repeats": 3, "min_time_s": 0.0}


def _case(name: str, n: int, d1: int, d2: int, dtype, device, timing) -> Case:
    fast, ref = getattr(repkern, name), getattr(reference, name)

    def build():
        x, y = pair(n, d1, d2, dtype, device, seed=1)
        return {"repkern": lambda: fast(x, y), "reference": lambda: ref(x, y)}

    return Case(op=name, shape=f"n={n} d={d1}/{d2}", dtype=dtype, providers=("repkern", "reference"), build=build,
                flops=float(n) * (d1 * d1 + d2 * d2 + 2 * d1 * d2), timing=timing)


def cases(device: torch.device, quick: bool, dtypes: Optional[Sequence[torch.dtype]] = None,
          full: bool = False) -> list[Case]:
    n, d1, d2 = (1024, 96, 64) if quick else (32768, 1024, 768) if device.type == "cuda" else (4096, 512, 384)
    return [_case(name, n, d1, d2, dtype, device, FEW) for dtype in select_dtypes(dtypes, [torch.float32])
            for name in ("cca", "svcca", "pwcca")]
