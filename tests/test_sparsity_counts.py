"""Per-row counts of repkern.sparsity_stats are integers end to end: the kernels count in integers (or
float64, exact below 2^53), return l0 and nonfinite as an int64 output, and the row summaries add them
exactly. A float32 count rounds above 2^24 (d = 2^24 + 3 gave l0 = 16777220) and made the CPU ordered
pass read one key past its buffer."""

from __future__ import annotations

import math

import pytest
import torch

from repkern import _native
from repkern._constants import SPARSITY_ORDERED_SUMS, SPARSITY_ROW_TOTALS, sparsity_row_channels
from repkern.ops import sparsity as sparsity_ops

BIG_D = 2**24 + 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_counts_of_a_row_longer_than_2_24(backend, dtype):
    """One row of d = 2^24 + 3 16-bit values (32 MiB; the per-feature state is 10·d float64, ~1.3 GiB), all
    finite, two of them zero: n = d and l0 = d − 2 have no float32 (they rounded to 16777220 and 16777216,
    and the CPU ordered pass then read past the sorted keys); every other statistic agrees with its
    closed form."""
    if backend.is_emu and dtype == torch.float16:
        pytest.skip("one 16-bit dtype is enough for the emulator (about 20 s per call)")
    d = BIG_D
    x = torch.ones(1, d, dtype=dtype, device=backend.device)
    x[0, 5] = x[0, d - 1] = 0
    state, rows, (sums, defined, hists) = sparsity_ops._run(x, 0.0, (0.5,), True, 20)
    ones = d - 2
    assert rows["l0"].dtype == torch.int64 and rows["nonfinite"].dtype == torch.int64
    assert int(rows["l0"][0]) == ones and int(rows["nonfinite"][0]) == 0
    assert sums["l0"].item() == ones and int(defined["l0"]) == 1
    assert hists["l0_fraction"].tolist() == [0] * 19 + [1]  # l0 / d just below 1
    assert int(state[0].sum()) == d and int(state[1].sum()) == ones  # per-feature finite and firing counts
    expected = {  # float64 closed forms
        "l1": ones, "l2": math.sqrt(ones), "hoyer": (math.sqrt(d) - math.sqrt(ones)) / (math.sqrt(d) - 1),
        "gini": 2 / d, "thresholded_l0": 0.0,  # mean + std of |a| is just above 1
        "effective_rank_l1": ones, "effective_rank_l2": ones,
        "top_p_l1": (d + 1) // 2 / ones, "top_p_l2": (d + 1) // 2 / ones,
    }
    for name, want in expected.items():
        got = rows[name].reshape(-1)[0].item()
        assert got == pytest.approx(want, rel=2e-6), name


@pytest.mark.emu_smoke
def test_ordered_kernel_stays_inside_its_row(backend):
    """The CUDA ordered pass loops over a row by the finite count in the row totals: a count above d (a
    caller's bad totals) is clamped, so nothing past the row is read (the AddressSanitizer build of the
    emulator in scripts/test.sh checks it)."""
    if not backend.is_emu:
        pytest.skip("a CUDA kernel: runs on the emulator (and on CUDA)")
    rows, d = 3, 40
    x = torch.rand(rows, d, dtype=torch.float32)
    top = torch.tensor([0.5], dtype=torch.float64)
    for presorted in (False, True):
        totals = torch.zeros((SPARSITY_ROW_TOTALS, rows), dtype=torch.float64)
        totals[0] = torch.tensor([d + 50.0, 1e30, math.nan])  # finite counts: too many, absurd, NaN
        totals[2], totals[3] = x.sum(1).double(), (x.double() ** 2).sum(1)
        sums = torch.zeros((SPARSITY_ORDERED_SUMS + 2, rows), dtype=torch.float64)
        out = torch.zeros((sparsity_row_channels(1, True), rows), dtype=torch.float32)
        sorted_rows = torch.sort(x, dim=1).values if presorted else None
        _native.call(sparsity_ops.SPARSITY_ORDERED, x.device, x, sorted_rows, 0, rows, top, totals, sums, out)
        assert torch.isfinite(sums[:, :2]).all()
