"""The CUDA execution-model emulator itself: primitives give CUDA's results
under every schedule, and planted bugs are caught."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from repkern import _native

from tests.isolation import assert_snippet

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


@pytest.mark.emu_smoke
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_static_shared_memory_is_poisoned_before_every_block(emu, schedule):
    """RK_SHARED arrays (two instantiations of one kernel template) read before any write of the block:
    0xFF bytes, not the previous block's values."""
    blocks = 3
    out = torch.zeros(2, blocks * 64, dtype=torch.int32)
    emu(schedule).selftest_static_smem(blocks, v(out))
    assert (out == -1).all()
    names = {(pathlib.Path(f).name, name) for f, _line, name in emu(schedule).shared_regions()}
    assert ("selftest.cu", "words") in names


def test_plain_shared_keyword_is_a_compile_error_in_the_emulator(tmp_path):
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    csrc = pathlib.Path(__file__).resolve().parent.parent / "csrc"
    source = tmp_path / "k.cpp"

    def compile_kernel(body):
        source.write_text('#include "common/macros.h"\n__global__ void k(float* out) {\n' + body + "\n}\n")
        return subprocess.run([compiler, "-std=c++20", "-fsyntax-only", "-DREPKERN_EMU", f"-I{csrc}", str(source)],
                              capture_output=True, text=True)

    bad = compile_kernel("  __shared__ float s[32];\n  s[threadIdx.x] = 1.0f;\n  out[0] = s[0];")
    assert bad.returncode != 0 and "use RK_SHARED(type, name, dims)" in bad.stderr
    good = compile_kernel("  RK_SHARED(float, s, [32]);\n  RK_SHARED(int, flag);\n  s[threadIdx.x] = 1.0f;\n"
                          "  flag = 1;\n  __syncthreads();\n  out[0] = s[0] + float(flag);")
    assert good.returncode == 0, good.stderr


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_coverage_counts_passes_per_block_and_site(emu, schedule):
    """coverage(): per kernel and call site, the most times one thread of one block passed it; a site
    in a loop of `iterations` rounds shows `iterations` however many blocks ran. (No reset here: the
    counts of the whole run are checked at its end, tests/emu_coverage.py.)"""
    from tests import emu_coverage as cov

    module = emu(schedule)
    blocks, iterations = 3, 4
    out = torch.zeros(blocks * 64, dtype=torch.int32)
    module.selftest_coverage_loop(blocks, iterations, v(out))
    lanes = torch.arange(blocks * 64) % 64
    assert torch.equal(out, (iterations * (lanes ^ 1) + sum(range(iterations))).int())
    sites = [s for s in cov.scan_sites([cov.CSRC / "emu" / "selftest.cu"]) if s.function == "coverage_loop_kernel"]
    assert len(sites) == 6 and sum(s.in_loop for s in sites) == 4
    got = {}
    for kernel, file, line, what, function, passes in module.coverage():
        if kernel == "coverage_loop":
            assert "coverage_loop_kernel" in function
            assert what in ("__syncthreads", "__shfl_xor_sync", "__ballot_sync", "__syncwarp")
            got[f"{cov.csrc_relative(file)}:{line}"] = passes
    assert got == {s.key: iterations if s.in_loop else 1 for s in sites}


def test_reset_coverage_clears_the_counts():
    """In a subprocess: resetting here would drop the counts of the tests that ran before."""
    code = (
        "import torch\n"
        "from repkern import _native\n"
        "m = _native.emu_module()\n"
        "out = torch.zeros(64, dtype=torch.int32)  # bound to a name: the kernel writes to it\n"
        "m.selftest_coverage_loop(1, 2, _native.view(out))\n"
        "assert any(r[0] == 'coverage_loop' and r[5] == 2 for r in m.coverage())\n"
        "m.reset_coverage()\n"
        "assert m.coverage() == []\n"
        "m.selftest_coverage_loop(1, 1, _native.view(out))\n"
        "assert max(r[5] for r in m.coverage()) == 1\n"
    )
    assert_snippet(code)  # the same repkern as the tests: an installed one or the source tree


@pytest.mark.parametrize("schedule", ("forward", "reverse"))
def test_a_warp_runs_ahead_as_soon_as_its_collective_completes(emu, schedule):
    """A warp collective completes when its last lane arrives and the warp goes on before the next
    warp starts (the lowest first under `forward`, the highest under `reverse`): a fast warp reaches
    the next loop iteration, and overwrites scratch, while a slow one has yet to read it."""
    warps = 3
    order = torch.zeros(warps * 32, 2, dtype=torch.int32)
    emu(schedule).selftest_run_ahead(warps, v(order))
    t = torch.arange(warps * 32)
    if schedule == "reverse":
        t = warps * 32 - 1 - t
    warp, lane = t // 32, t % 32
    assert torch.equal(order[:, 0], (64 * warp + lane).int())  # before the __syncwarp
    assert torch.equal(order[:, 1], (64 * warp + 32 + lane).int())  # right after it, before the next warp
