"""scripts/check_cuda_build.py's occupancy column: the CUDA occupancy rules against cases computed by hand,
and the block sizes it reads from the kernels' __launch_bounds__."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "check_cuda_build.py")
if not os.path.exists(SCRIPT):
    pytest.skip("needs the source tree", allow_module_level=True)
spec = importlib.util.spec_from_file_location("check_cuda_build", SCRIPT)
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)


@pytest.mark.parametrize("arch, regs, smem, threads, share, limiter", [
    # 64 regs × 32 lanes = 2048 per warp; 16384 per scheduler quarter: 8 warps each, 32 per SM = 4 blocks of 8 warps
    ("sm_80", 64, 0, 256, 0.5, "registers"),
    # 32 regs: 16 warps per quarter, 64 per SM; 2048 threads = 8 blocks either way
    ("sm_80", 32, 0, 256, 1.0, "threads"),
    # 33 regs: 1056 per warp, allocated as 1280: 12 warps per quarter, 48 per SM = 6 blocks of 8 warps
    ("sm_90a", 33, 0, 256, 0.75, "registers"),
    # 40 regs: 1280 per warp, 12 per quarter = 48 warps = 16 blocks of 3 warps (the whole file would hold 51)
    ("sm_80", 40, 0, 96, 0.75, "registers"),
    # 32 KB + 1 KB reserved = 33792 B per block: 167936 // 33792 = 4 blocks (5 without the reservation)
    ("sm_80", 32, 32768, 256, 0.5, "shared memory"),
    # the same on sm_90: 233472 // 33792 = 6 blocks of 8 warps
    ("sm_90a", 32, 32768, 256, 0.75, "shared memory"),
    # 32960 B rounds up to 33024 (128-byte units) + 1024 = 34048: sm_80 4 blocks of 4 warps, sm_90 6
    ("sm_80", 68, 32960, 128, 0.25, "shared memory"),
    ("sm_90a", 68, 32960, 128, 0.375, "shared memory"),
    # 32513 B allocated as 32640 + 1024 = 33664: 4 blocks (unrounded, 33537 B would fit 5)
    ("sm_80", 32, 32513, 128, 0.25, "shared memory"),
    # 32 threads per block: the 32-block limit leaves 32 of 64 warps
    ("sm_80", 16, 0, 32, 0.5, "blocks"),
])
def test_occupancy_by_hand(arch, regs, smem, threads, share, limiter):
    assert check.occupancy(arch, regs, smem, threads) == (share, limiter)


def test_launch_bounds_of_the_sources():
    sizes = check.launch_bounds()
    assert sizes["gram_epilogue_kernel"] == 32 * 8  # kTile * kRowsPerPass
    assert sizes["ordered_kernel"] == 128  # kOrderedThreads
    assert sizes["hsic_terms_kernel"] == sizes["sae_spmm_kernel"] == sizes["knn_merge_rows_kernel"] == 256
    with open(os.path.join(ROOT, "csrc", "cuda", "sparsity.cu")) as f:
        declared = f.read().count("__global__")
    assert sum(k in sizes for k in ("features_kernel", "merge_kernel", "row_totals_kernel",
                                    "ordered_finalize_kernel", "ordered_kernel")) == declared


def test_launch_bounds_parses_constants(tmp_path):
    (tmp_path / "a.cu").write_text("constexpr int kWarps = 4;\ntemplate <typename T>\nconstexpr int kVec = 16 / "
                                   "int(sizeof(T));\nconstexpr int kThreads = 32 * kWarps;\n"
                                   "__global__ void __launch_bounds__(kThreads, 2)\n    my_kernel(float* x) {}\n")
    assert check.launch_bounds(str(tmp_path)) == {"my_kernel": 128}


@pytest.mark.skipif(shutil.which("c++filt") is None, reason="needs c++filt")
def test_report_fails_for_a_kernel_without_launch_bounds(tmp_path, capsys):
    log = tmp_path / "build.log"
    log.write_text("ptxas info    : Compiling entry function '_Z10foo_kernelPf' for 'sm_80'\n"
                   "ptxas info    : Function properties for _Z10foo_kernelPf\n"
                   "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
                   "ptxas info    : Used 64 registers, used 1 barriers, 424 bytes cmem[0]\n")
    assert check.ptxas_report(str(log), {"foo_kernel": 256}) == 0
    assert "256 threads, occupancy  50% (registers)  foo_kernel" in capsys.readouterr().out
    assert check.ptxas_report(str(log), {"bar_kernel": 256}) == 1
    assert "FAIL: no __launch_bounds__" in capsys.readouterr().out
