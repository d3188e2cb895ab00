"""repkern.bench.roofline: the model's numbers against hand counts, the docs table against the module, every
CUDA kernel accounted for, and the roofline columns `repkern bench` fills on a GPU (fake timings and
ceilings: no GPU here)."""

from __future__ import annotations

import os
import re

import pytest
import torch
from repkern import bench
from repkern.bench import Case, roofline
from repkern.bench import gram as gram_suite
from repkern.bench import sae as sae_suite
from repkern.bench.timing import Ceilings, Measurement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
CUDA = torch.device("cuda", 0)  # listing GPU cases allocates nothing: no GPU needed


def _doc() -> str:
    if not os.path.exists(DOC):
        pytest.skip("needs the source tree")
    with open(DOC, encoding="utf-8") as f:
        return f.read()


def _doc_section() -> str:
    text = _doc()
    return text[text.index("## Roofline model"):text.index(roofline.END)]


def test_docs_table_is_the_modules():
    text = _doc()
    start, end = text.index(roofline.BEGIN), text.index(roofline.END) + len(roofline.END)
    assert text[start:end] == roofline.markdown(roofline.gpu_cases()), \
        "docs/benchmarks.md's roofline table is stale: python scripts/roofline_table.py --write"


def test_every_cuda_kernel_is_in_the_roofline_section():
    section = _doc_section()
    kernels = set()
    for name in os.listdir(os.path.join(ROOT, "csrc", "cuda")):
        if name.endswith(".cu"):
            with open(os.path.join(ROOT, "csrc", "cuda", name)) as f:
                kernels |= set(re.findall(r"__global__ void __launch_bounds__\([^)]*\)\s*(\w+)\(", f.read()))
    assert len(kernels) >= 15
    assert sorted(k for k in kernels if k not in section) == []


def test_counts_by_hand():
    # the epilogue reads the upper half and writes both: 4·n²/2 + 4·n² bytes, 4 FLOPs per upper entry
    (step,) = roofline.gram_epilogue("cosine", 8192).steps
    assert step.bytes == 6 * 8192**2 and step.flops == 2 * 8192**2
    assert roofline.gram_epilogue("cosine", 8192).time_s(roofline.H100) == pytest.approx(6 * 8192**2 / 3.35e12)
    # 8 strips of 1024 rows against columns [i, n): 2·1024·d·1024·(8 + 7 + ... + 1) = (9/8)·n²·d
    gemm = roofline.gram(1, 8192, 4096, "bfloat16", "linear").steps[0]
    assert gemm.flops == pytest.approx(9 / 8 * 8192**2 * 4096) and gemm.unit == roofline.TENSOR
    assert gemm.time_s(roofline.H100) == pytest.approx(gemm.flops / 989e12)
    # Permute: 2 float64 FLOPs per upper-triangle entry (n²/2) and replicate, compute-bound at 34 TFLOP/s
    kernel = roofline.cka_test(16384, 1000, False, "float32").steps[-1]
    assert kernel.flops == 1000 * 16384**2 and kernel.time_s(roofline.H100) == pytest.approx(kernel.flops / 34e12)
    # one read of x in the one-read subset: 4 B per element dominates the features kernel's bytes
    features = roofline.sparsity(1 << 18, 4096, "float32", False).steps[0]
    assert 4 * (1 << 30) < features.bytes < 1.01 * 4 * (1 << 30)


def test_the_suites_floors_agree_with_the_model():
    """The cases' own bytes_moved (their GB/s column) and the model count the same traffic."""
    for case in gram_suite.cases(CUDA, False):
        if case.op.startswith("gram_epilogue"):
            assert case.model.steps[0].bytes == case.bytes_moved
    decodes = [c for c in sae_suite.cases(CUDA, False) if c.op.startswith("sae_decode")]
    assert decodes and all(c.model.steps[0].bytes == c.bytes_moved for c in decodes)
    assert all(c.model is None for c in gram_suite.cases(torch.device("cpu"), False))  # CPU kernels differ


MODEL = roofline.Model("op", "n=1", "bfloat16", (
    roofline.Step("kernel", 1e9, 1e12, roofline.FP32),  # its arithmetic has no measured ceiling: bytes only
    roofline.Step("gemm", 1e9, 1e12, roofline.TENSOR, kernel=False),
))


def test_expected_time_at_measured_ceilings():
    # 1 GB at 1000 GB/s = 1 ms per step; the GEMM's 1 TFLOP at 100 TFLOP/s (bfloat16 matmul) = 10 ms
    assert roofline.expected_s(MODEL, 1000.0, {"bfloat16": 1e5}.get) == pytest.approx(0.011)
    assert roofline.expected_s(MODEL, 1000.0, {"float32": 1e5}.get) == pytest.approx(0.002)  # no bf16 ceiling


def test_bench_rows_get_the_roofline_columns(monkeypatch):
    monkeypatch.setattr(bench, "measure", lambda fn, device, **kw: Measurement(22.0, 21.0, 23.0, 0))
    ceilings = Ceilings(copy_gbps=1000.0, read_gbps=1000.0, matmul_gflops={"float32": 1e4, "bfloat16": 1e5})
    env = {"device_name": "fake GPU", "driver": "", "torch": torch.__version__, "cuda_runtime": "", "git_sha": "abc"}
    case = Case("op", "n=1", torch.bfloat16, {"repkern": lambda: None, "reference": lambda: None}, model=MODEL)
    lines = []
    repkern_row, reference_row = bench.run_case(case, CUDA, ceilings, env, log=lines.append)
    assert repkern_row["roofline_ms"] == pytest.approx(11.0) and repkern_row["roofline_fraction"] == 0.5
    assert reference_row["roofline_ms"] == reference_row["roofline_fraction"] == ""  # the model is repkern's
    assert lines[0].endswith("roofline 11.000 ms (50% of it)")
    cpu_rows = bench.run_case(case, torch.device("cpu"), ceilings, env, log=lambda line: None)
    assert all(r["roofline_fraction"] == "" for r in cpu_rows)
