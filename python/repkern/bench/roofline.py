"""Roofline model of the GPU benchmark cases: per case, the minimum DRAM traffic and the FLOPs of each
step (repkern's CUDA kernels, from the traffic and FLOP counts in the comments of csrc/cuda/*.cu, and the
torch/cuBLAS GEMMs the op runs), as functions of the case's shape.

The numbers are floors: every input read once and every output written once per step, as each kernel's
comment states; torch's elementwise preparation (NaN rows, row scaling, x − b_dec) and selections (the
RBF median's kthvalue, beyond one read of the distances) are not counted. A step's time is
max(bytes / bandwidth, FLOPs / peak of its arithmetic unit); an op's time is the sum of its steps (they
run one after another on one stream).

Two uses, one source:
  * docs/benchmarks.md's roofline table at the H100 SXM datasheet numbers (:data:`H100`), written by
    ``python scripts/roofline_table.py --write`` (tests/test_roofline.py checks that the page matches);
  * ``repkern bench --device cuda``: :func:`expected_s` with this device's measured ceilings, and the
    measured time's share of it per row (columns ``roofline_ms``, ``roofline_fraction``).
"""

from __future__ import annotations

import dataclasses
import math

# Arithmetic units a step's FLOPs run on.
TENSOR = "bf16 tensor"  # a bfloat16 GEMM
FP32 = "fp32"  # a float32 GEMM (torch's default: no TF32) and float32 kernel arithmetic
FP64 = "fp64"  # the float64 accumulations of cka_test and hsic_terms


@dataclasses.dataclass(frozen=True)
class Peaks:
    """A device's bandwidth (bytes/s) and FLOP/s per arithmetic unit."""

    name: str
    bandwidth: float
    flops: dict


# H100 SXM datasheet: HBM3 3.35 TB/s; dense bf16 tensor 989 TFLOP/s; fp32 67 and fp64 34 TFLOP/s (non-tensor).
H100 = Peaks("H100 SXM", 3.35e12, {TENSOR: 989e12, FP32: 67e12, FP64: 34e12})
H100_SMS = 132  # the sparsity kernel's row splits are sized from the SM count


@dataclasses.dataclass(frozen=True)
class Step:
    """One kernel launch sequence (or GEMM sequence) of an op: its DRAM bytes, its FLOPs and their unit."""

    name: str
    bytes: float
    flops: float
    unit: str
    kernel: bool = True  # a repkern CUDA kernel; False: torch/cuBLAS

    def time_s(self, peaks: Peaks) -> float:
        return max(self.bytes / peaks.bandwidth, self.flops / peaks.flops[self.unit])


@dataclasses.dataclass(frozen=True)
class Model:
    op: str
    shape: str
    dtype: str
    steps: tuple

    def time_s(self, peaks: Peaks) -> float:
        return sum(step.time_s(peaks) for step in self.steps)


def expected_s(model: Model, copy_gbps: float, matmul) -> float:
    """The model's time at a device's measured ceilings (``repkern bench``): bytes at the copy bandwidth
    (GB/s), GEMM FLOPs at ``matmul(dtype name)`` GFLOP/s (None: not measured, bytes only). The kernels' own
    arithmetic has no measured ceiling and is left out: a kernel the H100 table shows compute-bound
    (cka_test) is held to its bytes here."""
    total = 0.0
    for step in model.steps:
        t = step.bytes / (copy_gbps * 1e9)
        if not step.kernel and step.flops:
            rate = matmul(model.dtype if step.unit == TENSOR else "float64" if step.unit == FP64 else "float32")
            if rate:
                t = max(t, step.flops / (rate * 1e9))
        total += t
    return total


def _size(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}[dtype]


def _acc(dtype: str) -> int:
    return 8 if dtype == "float64" else 4  # 16-bit inputs accumulate in float32


def _gemm_unit(dtype: str) -> str:
    return TENSOR if dtype in ("bfloat16", "float16") else FP64 if dtype == "float64" else FP32


def _arith_unit(dtype: str) -> str:
    return FP64 if dtype == "float64" else FP32


# ---- Gram matrices (csrc/cuda/gram.cu, python/repkern/ops/gram.py) -----------------------------------


def _strips(n: int) -> list:
    """The row strips of ops.gram.inner_products (about 8, multiples of 64 rows): [(first row, rows)]."""
    rows = -(-max(256, -(-n // 8)) // 64) * 64
    return [(i, min(rows, n - i)) for i in range(0, n, rows)]


def _syrk(b: int, n: int, d: int, dtype: str, name: str = "GEMM x xᵀ, upper strips (cuBLAS)") -> Step:
    """inner_products: strip [i, i+r) × columns [i, n): reads both operands once, writes the block in acc."""
    e, a = _size(dtype), _acc(dtype)
    flops = sum(2.0 * r * (n - i) * d for i, r in _strips(n)) * b
    moved = sum((r + n - i) * d * e + r * (n - i) * a for i, r in _strips(n)) * b
    return Step(name, moved, flops, _gemm_unit(dtype), kernel=False)


def _epilogue(b: int, n: int, acc: int, out: int, flops_per_entry: float, name: str, reads: int = 1,
              write: bool = True) -> Step:
    """gram_epilogue_kernel: reads the upper half (n²/2 · acc) once per pass, writes n² · out; ~4 FLOPs per
    entry computed (+1 for the exp of RBF)."""
    moved = b * (reads * n * n / 2 * acc + (n * n * out if write else 0))
    return Step(name, moved, b * reads * n * n / 2 * flops_per_entry, FP64 if acc == 8 else FP32)


def gram_epilogue(kernel: str, n: int) -> Model:
    """The bench's gram_epilogue[kernel] case: one WRITE pass over a float32 inner-product matrix."""
    step = _epilogue(1, n, 4, 4, 5 if kernel == "rbf" else 4, "gram_epilogue_kernel (write)")
    return Model(f"gram_epilogue[{kernel}]", f"n={n}", "float32", (step,))


def gram(b: int, n: int, d: int, dtype: str, kernel: str, center: bool = False) -> Model:
    """repkern.gram: the strip GEMM, then the epilogue passes ops.gram._gram_op runs for the kernel."""
    a, e = _acc(dtype), _size(dtype)
    steps = [_syrk(b, n, d, dtype)]
    if kernel == "rbf":  # median bandwidth: distances in place, then one read of them for the selection
        steps.append(_epilogue(b, n, a, a, 4, "gram_epilogue_kernel (squared distances, in place)"))
        steps.append(Step("median of the distances (torch, one read)", b * n * n / 2 * a, 0.0, FP32, kernel=False))
    flops = 5 if kernel == "rbf" else 4
    if center:
        steps.append(_epilogue(b, n, a, e, flops, "gram_epilogue_kernel (row sums)", write=False))
        steps.append(_epilogue(b, n, a, e, flops + 3, "gram_epilogue_kernel (write, centered)"))
    else:
        steps.append(_epilogue(b, n, a, e, flops, "gram_epilogue_kernel (write)"))
    label = kernel + ("+center" if center else "")
    return Model(f"gram[{label}]", f"B={b} n={n} d={d}", dtype, tuple(steps))


# ---- CKA over Gram blocks (csrc/cuda/cka.cu) -------------------------------------------------------------


def cka_matrix_rbf(layers: int, n: int, d: int, dtype: str, debiased: bool) -> Model:
    """cka_matrix, RBF, untiled: per layer the strip GEMM, distances in place and the median read; then
    hsic_terms_kernel over the inner-product matrices: each upper half read once (the floor; the host may
    plan a matrix into more than one launch), ~7 FLOPs per entry and matrix (epilogue 5, row/column sums 2),
    2 float64 FLOPs per entry and pair, layers·(layers+1)/2 pairs."""
    a = _acc(dtype)
    per_layer = (_syrk(1, n, d, dtype), _epilogue(1, n, a, a, 4, "gram_epilogue_kernel (squared distances, in place)"),
                 Step("median of the distances (torch, one read)", n * n / 2 * a, 0.0, FP32, kernel=False))
    steps = [dataclasses.replace(s, name=f"{s.name}, × {layers} layers", bytes=layers * s.bytes,
                                 flops=layers * s.flops) for s in per_layer]
    upper = n * n / 2
    pairs = layers * (layers + 1) // 2
    steps.append(Step("hsic_terms_kernel (kernel values, sums, pair products)", layers * upper * a,
                      layers * upper * 7, FP32))
    steps.append(Step("hsic_terms_kernel (float64 pair products)", 0.0, pairs * upper * 2, FP64))
    label = "rbf" + (" debiased" if debiased else "")
    return Model(f"cka_matrix[{label}]", f"{layers} layers n={n} d={d}", dtype, tuple(steps))


# ---- cka_test (csrc/cuda/cka_test.cu) -------------------------------------------------------------------


def cka_test(n: int, replicates: int, bootstrap: bool, dtype: str) -> Model:
    """The two linear Grams (repkern.gram of x (n, 256) and y (n, 128)), then replicate_rows_kernel in
    launches of ops.cka_test.REPLICATE_BYTES worth of plans: per launch A (Permute: its upper triangle)
    and B from DRAM once (gathered rows from cache), plus the R·n indices or weights and R·n·C float64
    outputs; float64 FLOPs per replicate: 2 per upper entry, n² in all (Permute: s0 += a·b over j > i)
    or 10 per entry (Bootstrap: w·a, w·b and the five sums of common/cka_test_math.h). The centering of
    the Grams (torch) is not counted."""
    from repkern.ops.cka_test import REPLICATE_BYTES

    a = _acc(dtype)
    channels = 5 if bootstrap else 1
    per_launch = max(1, REPLICATE_BYTES // (n * (4 + 8 * channels)))
    launches = -(-replicates // per_launch)
    steps = gram(1, n, 256, dtype, "linear").steps + gram(1, n, 128, dtype, "linear").steps + (
        Step("replicate_rows_kernel", launches * (2.0 if bootstrap else 1.5) * n * n * a
             + replicates * n * (4 + channels * 8), (10 if bootstrap else 1) * float(replicates) * n * n, FP64),)
    kind = "bootstrap" if bootstrap else "permutations"
    return Model(f"cka_test[linear {replicates} {kind}]", f"n={n} d=256/128", dtype, steps)


# ---- sparsity statistics (csrc/cuda/sparsity.cu) --------------------------------------------------------


def sparsity(rows: int, d: int, dtype: str, ordered: bool, top_p: int = 3, sms: int = H100_SMS) -> Model:
    """features_kernel (one read of x, ~25 FLOPs per element, one partial state per split and column),
    merge_kernel and row_totals_kernel; ordered: ordered_kernel reads x again (~30 FLOPs per element plus
    P'·log²P'/4 compare-exchanges per row, counted as FLOPs; writes (4 + 2P) float64 sums per row, P the
    number of top-p masses: 3 by default) and ordered_finalize_kernel (reads them and the totals, writes
    the channels in acc)."""
    e, a = _size(dtype), _acc(dtype)
    strips = -(-d // (256 * (16 // e)))
    splits = max(1, min(-(-rows // 32), -(-2 * sms // strips)))
    steps = [
        Step("features_kernel", rows * d * e + splits * d * 10 * a + 4 * rows * 8, 25.0 * rows * d, FP32),
        Step("merge_kernel", splits * d * 10 * a + 10 * d * 8, 40.0 * splits * d, FP64),
        Step("row_totals_kernel", 4 * rows * 8 + rows * (3 * a + 3 * 8), 10.0 * rows, FP64),
    ]
    if ordered:
        p2 = 1 << (d - 1).bit_length()
        sort = p2 * math.log2(p2) ** 2 / 4
        sums = 4 + 2 * top_p
        steps.append(Step("ordered_kernel", rows * d * e + rows * sums * 8, rows * (30.0 * d + sort), FP32))
        steps.append(Step("ordered_finalize_kernel", rows * (4 + sums) * 8 + rows * sums * a, 20.0 * rows, FP64))
    op = "sparsity[full]" if ordered else "sparsity[one-read]"
    return Model(op, f"{rows}x{d}", dtype, tuple(steps))


# ---- SAE (csrc/cuda/sae.cu, python/repkern/ops/sae.py) --------------------------------------------------


def sae_encode_topk(n: int, d_in: int, d_sae: int, k: int, dtype: str, chunk_bytes: int = 32 << 20) -> Model:
    """TopK encode to sparse codes: per column chunk (ops.sae.plan_chunks) the GEMM x' W_enc[:, chunk]
    writes the pre-activations in acc, then sae_topk_merge_kernel reads them once and reads and writes the
    rows' running top-k (2·rows·k·(acc + 8) per chunk); ~3 FLOPs per element (insertions not counted)."""
    from repkern.ops.sae import CHUNK_ALIGN, plan_chunks

    e, a = _size(dtype), _acc(dtype)
    rows, cols = plan_chunks(n, d_in, d_sae, a, max(k, CHUNK_ALIGN), chunk_bytes, cast_weights=False)
    chunks = -(-n // rows) * -(-d_sae // cols)
    steps = (
        Step("GEMM x' W_enc by chunks (cuBLAS)", -(-d_sae // cols) * n * d_in * e + d_in * d_sae * e
             + n * d_sae * a, 2.0 * n * d_in * d_sae, _gemm_unit(dtype), kernel=False),
        Step("sae_topk_merge_kernel", n * d_sae * a + chunks * 2 * rows * k * (a + 8), 3.0 * n * d_sae,
             _arith_unit(dtype)),
    )
    return Model("sae_encode[topk->sparse]", f"N={n} d_in={d_in} d_sae={d_sae} k={k}", dtype, steps)


def sae_decode(n: int, d_in: int, d_sae: int, k: int, dtype: str) -> Model:
    """sae_spmm_kernel: the codes (values + int64 columns), the gathered rows of W_dec, the output;
    2·nnz·D FLOPs. The gathers count as DRAM traffic (W_dec is larger than L2 at the GPU shapes)."""
    e = _size(dtype)
    nnz = n * k
    step = Step("sae_spmm_kernel", nnz * (8 + e) + nnz * d_in * e + n * d_in * e, 2.0 * nnz * d_in, FP32)
    return Model("sae_decode[topk]", f"N={n} d_in={d_in} d_sae={d_sae} k={k}", dtype, (step,))


# ---- kNN (csrc/cuda/knn.cu, python/repkern/ops/knn.py) --------------------------------------------------


def knn(n: int, d: int, k: int, metric: str, dtype: str, tile_bytes: int = 16 << 20) -> Model:
    """Block pairs I <= J of ops.knn.tile_rows rows: the GEMM x_I x_Jᵀ writes the tile (acc), then
    knn_merge_rows_kernel reads it from DRAM and knn_merge_cols_kernel (off-diagonal tiles) from L2; each
    reads and writes its side's running top-k (2·rows·k·(acc + 8)). 2 FLOPs per score and side."""
    from repkern.ops.knn import tile_rows

    a = _acc(dtype)  # the GEMM reads the rows normalized in acc
    t = tile_rows(tile_bytes, a)
    blocks = [(i, min(t, n - i)) for i in range(0, n, t)]
    gemm_bytes = gemm_flops = merge_bytes = merge_flops = 0.0
    for bi, (i, r) in enumerate(blocks):
        for j, c in blocks[bi:]:
            gemm_bytes += (r + c) * d * a + r * c * a
            gemm_flops += 2.0 * r * c * d
            sides = 1 if i == j else 2
            merge_bytes += r * c * a + c * a + 2 * r * k * (a + 8) + (sides - 1) * (r * a + 2 * c * k * (a + 8))
            merge_flops += 2.0 * r * c * sides
    steps = (
        Step("GEMM x_I x_Jᵀ per block pair (cuBLAS)", gemm_bytes, gemm_flops, FP64 if a == 8 else FP32,
             kernel=False),  # the rows are normalized in acc: a float32 GEMM for 16-bit inputs
        Step("knn_merge_rows_kernel + knn_merge_cols_kernel", merge_bytes, merge_flops, FP32),
    )
    return Model(f"knn[{metric}]", f"n={n} d={d} k={k}", dtype, steps)


# ---- the GPU benchmark cases ------------------------------------------------------------------------


def gpu_cases() -> list:
    """The models of the ``repkern bench --device cuda`` default cases (those that run repkern CUDA
    kernels), listed from the suites themselves: listing a case allocates nothing."""
    import importlib

    import torch

    from repkern.bench import SUITES

    device = torch.device("cuda")
    return [case.model for suite in SUITES
            for case in importlib.import_module(f"repkern.bench.{suite}").cases(device, False)
            if case.model is not None]


# ---- the docs table ---------------------------------------------------------------------------------

BEGIN = "<!-- roofline table: python scripts/roofline_table.py --write (tests/test_roofline.py checks it) -->"
END = "<!-- end of the roofline table -->"


def _num(x: float) -> str:
    return f"{x:.3g}" if x else "0"


def markdown(models: list, peaks: Peaks = H100) -> str:
    """One row per step and a total per case: GB, GFLOP, FLOP/B, the unit its FLOPs run on, its time at
    `peaks`, and the share of the bandwidth and of that unit's peak it uses in that time (one is 100%)."""
    lines = [BEGIN, "",
             f"| case | dtype | step | GB | GFLOP | FLOP/B | unit | {peaks.name} ms | HBM, unit at that time |",
             "|---|---|---|---:|---:|---:|---|---:|---|"]
    for m in models:
        total = m.time_s(peaks)
        for step in m.steps:
            t = step.time_s(peaks)
            intensity = f"{step.flops / step.bytes:.3g}" if step.bytes else "–"
            use = (f"{100 * step.bytes / peaks.bandwidth / t:.0f}%, "
                   f"{100 * step.flops / peaks.flops[step.unit] / t:.0f}%") if t else "–"
            name = step.name if step.kernel else f"*{step.name}*"
            lines.append(f"| {m.op} {m.shape} | {m.dtype} | {name} | {_num(step.bytes / 1e9)} | "
                         f"{_num(step.flops / 1e9)} | {intensity} | {step.unit} | {t * 1e3:.3g} | {use} |")
        kernels = sum(step.time_s(peaks) for step in m.steps if step.kernel)
        lines.append(f"| {m.op} {m.shape} | {m.dtype} | **total** (repkern kernels {100 * kernels / total:.0f}%) "
                     f"| {_num(sum(s.bytes for s in m.steps) / 1e9)} | {_num(sum(s.flops for s in m.steps) / 1e9)} "
                     f"| | | **{total * 1e3:.3g}** | |")
    lines += ["", END]
    return "\n".join(lines)

