"""The CUDA execution-model emulator itself: primitives give CUDA's results
under every schedule, and planted bugs are caught."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from repkern import _native

SCHEDULES = ("forward", "reverse", "random:7")


@pytest.fixture
def emu(monkeypatch):
    def run(schedule):
        monkeypatch.setenv("REPKERN_EMU_SCHEDULE", schedule)
        return _native.emu_module()

    return run


def v(t):
    return _native.view(t)


def expected_warp_ops(blocks):
    lanes = np.arange(32)
    rows = []
    for b in range(blocks):
        seg8 = (lanes // 8) * 8
        up = np.where(lanes >= 1, lanes - 1, lanes)
        down = np.where((lanes % 16) + 2 < 16, lanes + 2, lanes)
        ballot = sum(1 << i for i in lanes if i % 2 == 1) - (1 << 32)  # int32 view of 0xAAAAAAAA
        rows.append(
            np.stack(
                [
                    (lanes ^ 3) * 10,
                    seg8 * 10,
                    up * 10,
                    down * 10,
                    (lanes ^ 4) * 10,
                    np.full(32, ballot),
                    np.ones(32),
                    np.ones(32),
                    np.zeros(32),
                    (lanes + 1) % 32 + 100 * b,
                ],
                axis=1,
            )
        )
    return np.concatenate(rows).astype(np.int64)


@pytest.mark.emu_smoke
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_warp_primitives_match_cuda_semantics(emu, schedule):
    blocks = 3
    out_i = torch.zeros(blocks * 32, 10, dtype=torch.int32)
    out_f = torch.zeros(blocks * 32)
    out_d = torch.zeros(blocks * 32, dtype=torch.float64)
    sum_f = torch.zeros(1)
    sum_d = torch.zeros(1, dtype=torch.float64)
    emu(schedule).selftest_warp_ops(blocks, v(out_i), v(out_f), v(out_d), v(sum_f), v(sum_d))
    np.testing.assert_array_equal(out_i.numpy().astype(np.int64), expected_warp_ops(blocks))
    lanes = np.arange(32)
    shfl_down_f = np.where(lanes + 1 < 32, lanes + 1, lanes) * 0.5
    np.testing.assert_array_equal(out_f.numpy(), np.tile(shfl_down_f, blocks))
    np.testing.assert_array_equal(out_d.numpy(), np.tile(lanes ^ 1, blocks).astype(np.float64))
    assert sum_f.item() == blocks * 528 and sum_d.item() == blocks * 528  # Σ (lane + 1)


@pytest.mark.emu_smoke
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_block_reduction_with_barriers_is_schedule_independent(emu, schedule):
    x = torch.randn(256)
    out = torch.zeros(1)
    emu(schedule).selftest_block_sum(v(x), v(out), True)
    assert out.item() == pytest.approx(x.sum().item(), rel=1e-5, abs=1e-5)


@pytest.mark.emu_smoke
def test_planted_missing_barrier_is_caught_by_two_schedules(emu):
    """Without barriers the tree sum is right in one order and wrong in the other:
    this is why every kernel test runs under two schedules."""
    results = {}
    for schedule in ("forward", "reverse"):
        x = torch.rand(256) + 1.0  # fresh values: stale shared memory cannot look right
        out = torch.zeros(1)
        emu(schedule).selftest_block_sum(v(x), v(out), False)
        results[schedule] = abs(out.item() - x.sum().item()) <= 1e-3 * x.sum().item()
    assert results == {"forward": False, "reverse": True}


BUGS = {
    "ShflMaskPartial": (0, r"__shfl_down_sync at .*selftest\.cu:\d+.*mask 0xffffffff names lanes that are absent or elsewhere: lane 16 has exited"),
    "ShflMaskAbsent": (1, r"__shfl_xor_sync at .*selftest\.cu:\d+.*lane 16 does not exist \(the block has 16 threads\)"),
    "ShflReadsOutside": (2, r"__shfl_down_sync at .*selftest\.cu:\d+.*reads lane 16, which is not in mask 0xffff"),
    "MaskWithoutSelf": (3, r"__ballot_sync at .*selftest\.cu:\d+.*mask 0xfffe, which does not include itself"),
    "BarrierAfterExit": (4, r"__syncthreads at .*selftest\.cu:\d+.*thread \(0,0,0\) has exited"),
    "BarrierDivergent": (5, r"__syncthreads at .*selftest\.cu:\d+.*waits at __syncthreads \(.*selftest\.cu:\d+\) \(a barrier in divergent code\)"),
    "SmemOverLimit": (6, r"dynamic shared memory 65536 B exceeds 49152 B"),
    "GridTooLarge": (7, r"grid \(1,65536,1\) is not a valid grid size"),
}


@pytest.mark.emu_smoke
@pytest.mark.parametrize("bug", sorted(BUGS))
@pytest.mark.parametrize("schedule", ("forward", "reverse"))
def test_planted_bug_is_reported_with_location(emu, bug, schedule):
    code, pattern = BUGS[bug]
    scratch = torch.zeros(64)  # bound to a name: the kernel writes to it
    with pytest.raises(RuntimeError, match=pattern):
        emu(schedule).selftest_planted_bug(code, v(scratch))


def test_emulator_still_works_after_a_reported_bug(emu):
    module = emu("forward")
    scratch = torch.zeros(64)
    with pytest.raises(RuntimeError):
        module.selftest_planted_bug(4, v(scratch))
    x = torch.randn(64)
    out = torch.zeros(1)
    module.selftest_block_sum(v(x), v(out), True)
    assert out.item() == pytest.approx(x.sum().item(), rel=1e-5, abs=1e-5)


def _order(emu, schedule, blocks=3, threads=64):
    order = torch.zeros(blocks * threads, dtype=torch.int32)
    emu(schedule).selftest_schedule_order(blocks, threads, v(order))
    return order.tolist()


def test_schedules_set_thread_and_block_order(emu):
    n = 3 * 64
    assert _order(emu, "forward") == list(range(n))
    assert _order(emu, "reverse") == list(range(n))[::-1]
    random_a = _order(emu, "random:1")
    assert sorted(random_a) == list(range(n)) and random_a != list(range(n))
    assert _order(emu, "random:2") != random_a


def test_bad_schedule_is_an_error(emu):
    with pytest.raises(RuntimeError, match=re.escape("REPKERN_EMU_SCHEDULE must be forward, reverse or random[:seed]")):
        _order(emu, "sideways")
