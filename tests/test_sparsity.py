"""repkern.sparsity_stats and SparsityAccumulator against the reference and against facts that need no
reference, on every backend (CPU kernels, CUDA kernels through the emulator under two schedules, CUDA)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import repkern
from repkern import reference
from repkern._constants import sparsity_row_channels
from repkern.ops import sparsity as sparsity_ops
from tests.conftest import Gathered, assert_close_to_reference, gather_devices, run_gloo_processes

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
TOP_P = (0.01, 0.05, 0.1, 0.5)


def _data(shape, dtype, device, seed=0, zeros=0.5):
    """Activation-like data: about `zeros` of the entries exactly 0, the rest heavy-tailed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x = x * (0.1 + 4 * torch.rand(*shape, generator=g, dtype=torch.float64).pow(3))
    x[torch.rand(*shape, generator=g) < zeros] = 0
    return x.to(dtype=dtype, device=device)


def _compare(fast, ref_low, ref64, float64_input: bool):
    """Every field of two SparsityStats: integer/bool fields exactly equal (histogram bins within one count
    for low-precision inputs, whose statistics may sit on the other side of a bin edge), floating fields
    with conftest's dtype-dependent tolerance."""
    fd, ld, rd = fast.to_dict(), ref_low.to_dict(), ref64.to_dict()
    assert fd.keys() == rd.keys()
    for key, value in fd.items():
        if not isinstance(value, torch.Tensor):
            assert value == rd[key], key
            continue
        value, low, exact = value.cpu(), ld[key].cpu(), rd[key].cpu()
        assert value.shape == exact.shape, key
        if not value.is_floating_point():
            if "histogram" in key and not float64_input:
                assert (value - exact).abs().max() <= 1 and value.sum() == exact.sum(), key
            else:
                assert torch.equal(value, exact), key
            continue
        if value.dtype == torch.float64 and not float64_input:  # row means of float32 statistics
            value, low = value.float(), low.float()
        try:
            assert_close_to_reference(value, low.to(value.dtype), exact.double())
        except AssertionError as e:
            raise AssertionError(f"field {key}: {e}") from e


def _check(a, **kwargs):
    fast = repkern.sparsity_stats(a, **kwargs)
    ref_low = reference.sparsity_stats(a.cpu(), **kwargs)
    ref64 = reference.sparsity_stats(a.cpu().double(), **kwargs)
    _compare(fast, ref_low, ref64, a.dtype == torch.float64)
    return fast


# ---- against the reference ----------------------------------------------------------------------


@pytest.mark.emu_smoke
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_all_dtypes(backend, dtype):
    # d = 40: 16-byte loads for every dtype; 2 × 90 rows: the CUDA grid-stride loops run more than once.
    a = _data((2, 90, 40), dtype, backend.device)
    s = _check(a, top_p=TOP_P, eps=0.05)
    assert s.l0.shape == (2, 90) and s.top_p_l1.shape == (2, 90, len(TOP_P)) and s.mean.shape == (40,)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    assert s.hoyer.dtype == stat and s.kurtosis.dtype == stat and s.l0.dtype == torch.int64


@pytest.mark.parametrize("dtype", DTYPES)
def test_scalar_load_paths(backend, dtype):
    """Misaligned base and odd row stride (scalar loads), and an aligned stride with a partial last vector."""
    base = _data((70, 41), dtype, backend.device, seed=1)
    _check(base[:, 1:])  # pointer off by one element, rows 41 apart
    wide = _data((50, 48), dtype, backend.device, seed=2)
    _check(wide[:, :37])  # rows 48 apart: 16-byte loads, 37 = not a whole number of vectors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nearly_all_zero_rows(backend, dtype):
    """SAE-code-like rows: 99% zeros (the CPU kernel sorts only the nonzero entries), with -0.0, a NaN and
    an Inf in some rows, fewer nonzeros than top-p entries (p = 0.5, 1), a row with one nonzero and an
    all-zero row."""
    a = _data((40, 300), torch.float64, backend.device, seed=23, zeros=0.99)
    a[3, :150] = -0.0
    a[5, 7], a[6, 8] = math.nan, math.inf
    a[7] = 0.0
    a[8] = 0.0
    a[8, 299] = 2.5
    s = _check(a.to(dtype), top_p=(0.01, 0.5, 1.0))
    assert torch.isnan(s.gini[7]) and abs(float(s.gini[8]) - 299 / 300) < 1e-6
    assert (s.top_p_l1[:, 2][~torch.isnan(s.top_p_l1[:, 2])] == 1).all()


def test_expanded_and_batched_inputs(backend):
    row = _data((1, 24), torch.float32, backend.device, seed=16)
    expanded = row.expand(3, 70, 24)  # stride-0 rows: the same row 210 times
    s, dense = repkern.sparsity_stats(expanded), repkern.sparsity_stats(expanded.contiguous())
    for key, value in dense.to_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(s.to_dict()[key], value, equal_nan=True, msg=key)
    assert s.hoyer.shape == (3, 70) and (s.var == 0).all() and torch.isnan(s.kurtosis).all()


# (70, 517): scalar loads, chunks of 32 + 32 + 6 rows (8, 8 and 2 batches of 4 and 2 rows), 2-3 rows
# per ordered block, consecutive top-p sums of rows spread over every warp; (300, 260): 16-byte loads,
# more chunks than row splits (a block takes two), 9-10 rows per ordered block.
@pytest.mark.parametrize("rows,d", [(1, 1), (6, 1), (1, 3), (33, 3), (2, 4097), (70, 517), (300, 260)])
def test_odd_shapes(backend, rows, d):
    _check(_data((rows, d), torch.float32, backend.device, seed=rows + d), top_p=TOP_P)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_blocks_tiles_and_steps(dtype, threads):
    """The CPU kernel's blocking: 601 rows make several row blocks per thread and a remainder after the
    four-row steps; d = 700 makes several column tiles with a partial last one. One tile holds a NaN and
    an Inf (its pass is redone with masks) while the others take the all-finite path."""
    a = _data((601, 700), torch.float64, torch.device("cpu"), seed=21)
    a[300, 650], a[517, 690] = math.nan, -math.inf
    a = a.to(dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for ordered in (False, True):
            s = _check(a, ordered=ordered, top_p=TOP_P)
            assert int(s.nan_total) == 1 and int(s.inf_total) == 1 and int(s.nonfinite.sum()) == 2
    finally:
        torch.set_num_threads(previous)


def test_long_rows_fall_back_to_sorted_input(backend, monkeypatch):
    """d above the shared-memory sort buffer of the CUDA kernel: float32 beyond 8192, float64 beyond 4096;
    the rows are sorted by torch in chunks (here one row per chunk)."""
    monkeypatch.setattr(sparsity_ops, "PRESORT_CHUNK_BYTES", 1)
    _check(_data((2, 8200), torch.float32, backend.device, seed=3), top_p=(0.001, 0.3))
    _check(_data((3, 4097), torch.float64, backend.device, seed=4), top_p=(0.001, 0.3))


def test_presorted_long_rows_several_per_block(backend):
    """Rows sorted by torch (d above the float64 sort buffer) in one launch of more rows than blocks: a
    block takes two rows; the two top-p sums of a row (all threads hold entries of both) are consecutive
    block reductions through the same scratch."""
    _check(_data((34, 4097), torch.float64, backend.device, seed=18), top_p=(0.3, 0.6))


def test_ordered_false_is_the_one_read_subset(backend):
    a = _data((40, 24), torch.float32, backend.device, seed=5)
    s = _check(a, ordered=False)
    assert s.gini is None and s.top_p_l1 is None and s.thresholded_l0 is None and s.effective_rank_l1 is None
    full = repkern.sparsity_stats(a)
    for name in ("l0", "l1", "l2", "hoyer", "mean", "var", "kurtosis", "fire_count"):
        torch.testing.assert_close(getattr(s, name), getattr(full, name), rtol=1e-6, atol=1e-6)


def test_eps_and_dense_threshold(backend):
    a = _data((60, 16), torch.float64, backend.device, seed=6)
    for eps in (0.0, 0.3, 10.0):
        s = _check(a, eps=eps, dense_threshold=0.25)
        fired = (a.abs() > eps).sum(0).cpu()
        assert torch.equal(s.fire_count.cpu(), fired) and torch.equal(s.l0.cpu(), (a.abs() > eps).sum(1).cpu())
        assert torch.equal(s.dense.cpu(), fired / 60 > 0.25) and int(s.n_dead) == int((fired == 0).sum())


# ---- facts that need no reference ------------------------------------------------------------------


@pytest.mark.emu_smoke
def test_hand_checkable_rows(backend):
    d = 10
    one_hot, constant, zero = torch.zeros(d), torch.full((d,), -2.5), torch.zeros(d)
    one_hot[3] = -4.0
    a = torch.stack([one_hot, constant, zero]).to(backend.device)
    s = repkern.sparsity_stats(a, top_p=(0.1, 0.25, 1.0))
    nan = math.nan
    expected = {
        "l0": [1, d, 0], "l1": [4.0, 25.0, 0.0], "l2": [4.0, 2.5 * math.sqrt(d), 0.0], "nonfinite": [0, 0, 0],
        "hoyer": [1.0, 0.0, nan], "gini": [(d - 1) / d, 0.0, nan], "thresholded_l0": [1 / d, 0.0, 0.0],
        "effective_rank_l1": [1.0, float(d), nan], "effective_rank_l2": [1.0, float(d), nan],
    }
    for name, values in expected.items():
        torch.testing.assert_close(getattr(s, name).cpu().double(), torch.tensor(values, dtype=torch.float64),
                                   rtol=1e-6, atol=1e-6, equal_nan=True, msg=name)
    # top p: k = ceil(p·d) largest entries: one-hot holds everything; a constant row holds k/d.
    torch.testing.assert_close(s.top_p_l1[0].cpu(), torch.ones(3))
    torch.testing.assert_close(s.top_p_l1[1].cpu(), torch.tensor([1 / d, 3 / d, 1.0]))
    torch.testing.assert_close(s.top_p_l2[1].cpu(), torch.tensor([1 / d, 3 / d, 1.0]))
    assert torch.isnan(s.top_p_l1[2]).all() and torch.isnan(s.top_p_l2[2]).all()
    # Hoyer/Gini/effective ranks undefined for the zero row: left out of the row means.
    assert int(s.row_defined["hoyer"]) == 2 and int(s.row_defined["l1"]) == 3


def test_row_histograms_bin_the_row_values(backend):
    """Row histograms by explicit bin counts: l0_fraction bins L0/d, hoyer its own values (NaN rows left
    out); the same from an accumulator fed two batches."""
    d, bins = 10, 5
    l0 = [0, 1, 3, 5, 9, 10]
    a = torch.zeros(len(l0), d)
    for i, k in enumerate(l0):
        a[i, :k] = torch.arange(1, k + 1, dtype=torch.float32)
    a = a.to(backend.device)

    def counts(values):
        out = [0] * bins
        for v in values:
            if not math.isnan(v):
                out[min(int(min(max(v, 0.0), 1.0) * bins), bins - 1)] += 1
        return out

    s = repkern.sparsity_stats(a, row_bins=bins)
    acc = repkern.SparsityAccumulator(d, row_bins=bins)
    acc.update(a[:2])
    acc.update(a[2:])
    for result in (s, acc.compute()):
        assert result.row_histogram["l0_fraction"].tolist() == counts([k / d for k in l0]) == [2, 1, 1, 0, 2]
        assert result.row_histogram["hoyer"].tolist() == counts(s.hoyer.tolist())
        assert int(result.row_histogram["hoyer"].sum()) == len(l0) - 1  # the all-zero row has no Hoyer


def test_d_equal_one(backend):
    a = torch.tensor([[3.0], [0.0], [-1.0]], device=backend.device)
    s = repkern.sparsity_stats(a)
    assert torch.isnan(s.hoyer).all()  # (√n − l1/l2)/(√n − 1) = 0/0 for n = 1
    torch.testing.assert_close(s.gini.cpu(), torch.tensor([0.0, math.nan, 0.0]), equal_nan=True)
    torch.testing.assert_close(s.effective_rank_l1.cpu(), torch.tensor([1.0, math.nan, 1.0]), equal_nan=True)
    torch.testing.assert_close(s.top_p_l1.cpu(), torch.tensor([[1.0] * 3, [math.nan] * 3, [1.0] * 3]), equal_nan=True)
    assert s.thresholded_l0.tolist() == [0.0, 0.0, 0.0]


def test_known_gini_and_top_p(backend):
    """Rows whose Gini and top-p masses are easy to write down (|a| = 1..n, signs mixed)."""
    n = 12
    row = torch.arange(1, n + 1, dtype=torch.float64) * torch.tensor([1.0, -1.0] * (n // 2), dtype=torch.float64)
    s = repkern.sparsity_stats(row[torch.randperm(n)][None].to(backend.device), top_p=(0.25, 0.5))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    gini = (2 * (i * i).sum() / (n * i.sum()) - (n + 1) / n).item()
    assert s.gini.item() == pytest.approx(gini, rel=1e-12)
    top3, top6 = i[-3:].sum() / i.sum(), i[-6:].sum() / i.sum()
    torch.testing.assert_close(s.top_p_l1[0].cpu(), torch.stack([top3, top6]), rtol=1e-12, atol=0)
    top3_sq = (i[-3:] ** 2).sum() / (i**2).sum()
    assert s.top_p_l2[0, 0].item() == pytest.approx(top3_sq.item(), rel=1e-12)
    mean, std = i.mean(), i.std(unbiased=False)
    assert s.thresholded_l0.item() == pytest.approx(((i > mean + std).sum() / n).item())
    p = i / i.sum()
    assert s.effective_rank_l1.item() == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-12)


def test_per_feature_statistics_match_numpy(backend):
    a = _data((200, 7), torch.float64, backend.device, seed=7)
    a[:, 5] = 0.0  # dead feature
    a[:, 6] = 1.75  # constant feature
    s = repkern.sparsity_stats(a, eps=0.1)
    x = a.cpu().numpy()
    np.testing.assert_allclose(s.mean.cpu().numpy(), x.mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(s.var.cpu().numpy(), x.var(0), rtol=1e-12, atol=1e-15)  # population variance
    np.testing.assert_allclose(s.min.cpu().numpy(), x.min(0))
    np.testing.assert_allclose(s.max.cpu().numpy(), x.max(0))
    np.testing.assert_allclose(s.mean_abs.cpu().numpy(), np.abs(x).mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.frequency.cpu().numpy(), (np.abs(x) > 0.1).mean(0))
    dev = x[:, :5] - x[:, :5].mean(0)
    kurt = (dev**4).mean(0) / (dev**2).mean(0) ** 2 - 3  # excess kurtosis
    np.testing.assert_allclose(s.kurtosis[:5].cpu().numpy(), kurt, rtol=1e-10)
    assert s.var[5] == 0 and s.var[6] == 0 and torch.isnan(s.kurtosis[5:]).all()
    assert s.dead.tolist() == [False] * 5 + [True, False] and int(s.n_dead) == 1
    assert int(s.density_histogram.sum()) == 7 and int(s.density_histogram[0]) == 1  # the dead feature: bin 0


def test_gaussian_kurtosis_is_near_zero():
    a = torch.randn(20000, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    s = repkern.sparsity_stats(a, ordered=False)
    assert s.kurtosis.abs().max() < 0.15 and (s.var - 1).abs().max() < 0.05


# ---- NaN / Inf policy ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
def test_nonfinite_entries_are_counted_and_excluded(backend, dtype):
    a = _data((30, 8), torch.float64, "cpu", seed=9)
    a[2, 1], a[5, 1], a[7, 3], a[7, 4] = math.nan, math.inf, -math.inf, math.nan
    a[9, :] = math.nan  # a row with no finite entry
    a[:, 6] = math.inf  # a feature with no finite value
    s = _check(a.to(dtype=dtype, device=backend.device), top_p=TOP_P)
    nan_count = torch.isnan(a).sum(0)
    assert torch.equal(s.nan_count.cpu(), nan_count) and torch.equal(s.inf_count.cpu(), torch.isinf(a).sum(0))
    assert int(s.nan_total) == int(torch.isnan(a).sum()) and int(s.inf_total) == int(torch.isinf(a).sum())
    assert torch.equal(s.nonfinite.cpu(), (~torch.isfinite(a)).sum(1))
    # Excluded: feature 1 over its finite values only; row 7 = the same row without its non-finite entries.
    finite1 = a[:, 1][torch.isfinite(a[:, 1])]
    assert s.count[1] == finite1.numel()
    scale = finite1.abs().max().item() * (1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert s.mean[1].item() == pytest.approx(finite1.to(dtype).double().mean().item(), abs=scale)
    row7 = a[7][torch.isfinite(a[7])][None].to(dtype=dtype, device=backend.device)
    single = repkern.sparsity_stats(row7, top_p=TOP_P)
    for name in ("l0", "l1", "l2", "hoyer", "gini", "thresholded_l0", "effective_rank_l1", "top_p_l1"):
        torch.testing.assert_close(getattr(s, name)[7], getattr(single, name)[0], equal_nan=True, msg=name)
    # No finite entry / value: sums 0, everything else NaN (or 0 counts), dead.
    assert s.l0[9] == 0 and s.l1[9] == 0 and torch.isnan(s.hoyer[9]) and torch.isnan(s.gini[9])
    assert torch.isnan(s.thresholded_l0[9]) and torch.isnan(s.top_p_l1[9]).all()
    assert s.count[6] == 0 and torch.isnan(s.mean[6]) and torch.isnan(s.frequency[6]) and bool(s.dead[6])
    assert int(s.density_histogram.sum()) == 7  # the feature without values is left out


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,exc,message",
    [
        (lambda: repkern.sparsity_stats(torch.ones(4, 3, dtype=torch.int64)), TypeError, "a: expected float32"),
        (lambda: repkern.sparsity_stats([[1.0]]), TypeError, "a: expected a torch.Tensor"),
        (lambda: repkern.sparsity_stats(torch.tensor(1.0)), ValueError, r"a: expected at least 1 dimensions"),
        (lambda: repkern.sparsity_stats(torch.ones(3, 0)), ValueError, "a: needs d >= 1"),
        (lambda: repkern.sparsity_stats(torch.ones(0, 3)), ValueError, "a: needs at least 1 row"),
        (lambda: repkern.sparsity_stats(torch.ones(2, 3), eps=-1.0), ValueError, "eps: expected a finite number >= 0"),
        (lambda: repkern.sparsity_stats(torch.ones(2, 3), eps=math.nan), ValueError, "eps"),
        (lambda: repkern.sparsity_stats(torch.ones(2, 3), eps="0"), TypeError, "eps: expected a real number"),
        (lambda: repkern.sparsity_stats(torch.ones(2, 3), top_p=(0.0,)), ValueError, r"top_p: each value must be in \(0, 1\]"),
        (lambda: repkern.sparsity_stats(torch.ones(2, 3), top_p=(1.5,)), ValueError, "top_p"),
        (lambda: repkern.sparsity_stats(torch.ones(2, 3), top_p=[0.1] * 9), ValueError, "top_p: at most 8"),
        (lambda: repkern.sparsity_stats(torch.ones(2, 3), top_p="0.1"), TypeError, "top_p: expected a sequence"),
        (lambda: repkern.sparsity_stats(torch.ones(2, 3), dense_threshold=2.0), ValueError, "dense_threshold"),
        (lambda: repkern.sparsity_stats(torch.ones(2, 3), density_bins=0), ValueError, "density_bins: expected >= 1"),
        (lambda: repkern.sparsity_stats(torch.ones(2, 3), row_bins=2.0), TypeError, "row_bins: expected an int"),
        (lambda: repkern.sparsity_stats(torch.ones(2, 3), ordered=1), TypeError, "ordered: expected a bool"),
        (lambda: repkern.SparsityAccumulator(0), ValueError, "d: expected >= 1"),
        (lambda: repkern.SparsityAccumulator(3.0), TypeError, "d: expected an int"),
        (lambda: repkern.SparsityAccumulator(3, keep_rows="yes"), TypeError, "keep_rows: expected a bool"),
        (lambda: repkern.SparsityAccumulator(3).update(torch.ones(2, 4)), ValueError, "a: expected 3 features"),
        (lambda: repkern.SparsityAccumulator(3).update(torch.ones(2, 3, dtype=torch.int32)), TypeError, "a: expected"),
        (lambda: repkern.SparsityAccumulator(3).merge(repkern.SparsityAccumulator(4)), ValueError, "other: incompatible"),
        (lambda: repkern.SparsityAccumulator(3).merge(repkern.SparsityAccumulator(3, eps=0.1)), ValueError, "eps"),
        (lambda: repkern.SparsityAccumulator(3).merge("acc"), TypeError, "other: expected a SparsityAccumulator"),
        (lambda: repkern.SparsityAccumulator(3).load_state_dict(repkern.SparsityAccumulator(4).state_dict()),
         ValueError, "state_dict: incompatible"),
        (lambda: repkern.SparsityAccumulator(3).all_reduce(), RuntimeError, "torch.distributed is not initialized"),
    ],
)
def test_bad_input_names_the_argument(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_accumulator_rejects_other_devices():
    acc = repkern.SparsityAccumulator(3).update(torch.ones(2, 3))
    with pytest.raises(ValueError, match="a: repkern supports CPU and CUDA tensors"):
        acc.update(torch.ones(2, 3, device="meta"))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="a: accumulator lives on cpu"):
            acc.update(torch.ones(2, 3, device="cuda"))


# ---- custom op, torch.compile, reference backend --------------------------------------------------


def test_opcheck():
    x = _data((20, 9), torch.float64, "cpu", seed=10)
    for args in [(x, 0.0, [0.1, 0.5], True), (x, 0.2, [], False), (x.float(), 0.0, [0.05], True),
                 (x.bfloat16(), 0.0, [0.25], True)]:
        torch.library.opcheck(torch.ops.repkern.sparsity_stats.default, args)
    _, out, counts = torch.ops.repkern.sparsity_stats(x.float(), 0.0, [0.05], True)
    divisor = torch.tensor([9.0] + [0.0] * 3 + [1.0] * (out.shape[0] - 2), dtype=torch.float64)
    torch.library.opcheck(torch.ops.repkern.sparsity_row_summaries.default, (counts, out, divisor, 7))


def test_torch_compile_fullgraph():
    def summary(a):
        s = repkern.sparsity_stats(a, top_p=(0.1,))
        return s.hoyer.mean() + s.gini.nanmean() + s.kurtosis.nanmean(), s.fire_count, s.density_histogram

    a = _data((64, 16), torch.float32, "cpu", seed=11)
    compiled = torch.compile(summary, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(a), summary(a)):
        torch.testing.assert_close(got, expected)


def test_reference_backend_is_the_reference(monkeypatch):
    monkeypatch.setenv("REPKERN_BACKEND", "reference")
    a = _data((30, 6), torch.float32, "cpu", seed=12)
    fast, ref = repkern.sparsity_stats(a), reference.sparsity_stats(a)
    for key, value in fast.to_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value.nan_to_num(-7.0), ref.to_dict()[key].nan_to_num(-7.0)), key


def test_input_is_detached_and_result_is_readable():
    a = _data((12, 5), torch.float32, "cpu", seed=13).requires_grad_()
    s = repkern.sparsity_stats(a * 2)
    assert not s.hoyer.requires_grad and not s.mean.requires_grad
    text = repr(s)
    assert "SparsityStats(rows=12, d=5" in text and "dead=" in text and "hoyer=" in text
    d = s.to_dict()
    assert "row_mean/hoyer" in d and "row_histogram/top_p_l1" in d and d["rows"] == 12


# ---- accumulator ----------------------------------------------------------------------------------


def _accumulate(batches, **kwargs):
    acc = repkern.SparsityAccumulator(batches[0].shape[-1], **kwargs)
    for b in batches:
        acc.update(b)
    return acc


def _assert_same_stats(got, expected, *, rtol, atol, rows_too=True):
    for key, value in expected.to_dict().items():
        other = got.to_dict()[key]
        if other is None and not rows_too:
            continue
        if value is None or not isinstance(value, torch.Tensor):
            assert other == value, key
            continue
        if value.is_floating_point():
            torch.testing.assert_close(other, value, rtol=rtol, atol=atol, equal_nan=True, msg=key)
        else:
            assert torch.equal(other, value), key


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
def test_streaming_equals_one_shot_for_any_split(backend, dtype):
    a = _data((157, 12), dtype, backend.device, seed=14)
    a[3, 4] = math.nan
    one_shot = repkern.sparsity_stats(a, top_p=TOP_P)
    g = torch.Generator().manual_seed(15)
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}
    for _ in range(3):
        cuts = sorted(torch.randint(0, 158, (4,), generator=g).tolist())
        batches = [a[i:j] for i, j in zip([0] + cuts, cuts + [157])]  # empty batches included
        streamed = _accumulate(batches, top_p=TOP_P, keep_rows=True).compute()
        flat = repkern.sparsity_stats(a, top_p=TOP_P)
        _assert_same_stats(streamed, flat, **tol)
    assert one_shot.rows == 157


def test_merge_order_does_not_matter(backend):
    parts = [_data((n, 9), torch.float64, backend.device, seed=20 + n) for n in (5, 40, 1, 77)]
    accs = [_accumulate([p]) for p in parts]

    def merged(order):
        first = repkern.SparsityAccumulator(9)
        for i in order:
            first.merge(accs[i])
        return first.compute()

    expected = repkern.sparsity_stats(torch.cat(parts))
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        _assert_same_stats(merged(order), expected, rtol=1e-10, atol=1e-12, rows_too=False)


def test_state_dict_round_trip_and_continue():
    a, b = _data((50, 6), torch.float32, "cpu", seed=30), _data((20, 6), torch.float32, "cpu", seed=31)
    acc = _accumulate([a], keep_rows=True, eps=0.1)
    restored = repkern.SparsityAccumulator(6, keep_rows=True, eps=0.1)
    restored.load_state_dict(acc.state_dict())
    acc.update(b)
    restored.update(b)
    _assert_same_stats(restored.compute(), acc.compute(), rtol=0, atol=0)
    _assert_same_stats(acc.compute(), repkern.sparsity_stats(torch.cat([a, b]), eps=0.1), rtol=2e-5, atol=2e-5)


def test_accumulator_summaries_and_kept_rows():
    a = _data((3, 40, 8), torch.float32, "cpu", seed=32)
    acc = _accumulate([a[0], a[1:]], keep_rows=True, row_bins=10)
    s = acc.compute()
    assert s.rows == 120 and s.hoyer.shape == (120,) and s.top_p_l1.shape == (120, 3)
    assert int(s.row_histogram["gini"].sum()) == int(s.row_defined["gini"])
    assert s.row_histogram["top_p_l2"].shape == (3, 10)
    torch.testing.assert_close(s.row_mean["hoyer"], s.hoyer.double().nanmean(), rtol=1e-6, atol=1e-9)
    no_rows = _accumulate([a[0], a[1:]]).compute()
    assert no_rows.hoyer is None and no_rows.gini is None
    torch.testing.assert_close(no_rows.row_mean["gini"], s.row_mean["gini"])
    empty = repkern.SparsityAccumulator(8).compute()
    assert empty.rows == 0 and torch.isnan(empty.mean).all() and bool(empty.dead.all())


def _distributed_worker(rank: int, world: int) -> None:
    a = _data((101, 10), torch.float64, "cpu", seed=40)
    a[17, 2] = math.nan
    cut = 37
    mine = a[:cut] if rank == 0 else a[cut:]
    acc = _accumulate([mine], keep_rows=True, top_p=TOP_P).all_reduce()
    single = repkern.sparsity_stats(a, top_p=TOP_P)
    _assert_same_stats(acc.compute(), single, rtol=1e-10, atol=1e-12)
    # Settings that differ between ranks are an error on every rank.
    odd = repkern.SparsityAccumulator(10, eps=0.5 if rank == 1 else 0.0)
    with pytest.raises(ValueError, match="incompatible"):
        odd.all_reduce()


def test_all_reduce_over_two_gloo_processes_equals_single_process():
    run_gloo_processes(_distributed_worker)


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_row_summaries_match_the_torch_form(ordered, dtype):
    """The CPU path summarizes the row channels natively; results.sparsity.row_summary_parts is the torch
    definition: NaN rows, values a hair outside [0, 1], exact bin edges, l0 counts as fractions of d."""
    from repkern.ops import sparsity as ops
    from repkern.results import sparsity as sr

    top_p, d, bins, rows = (0.1, 0.5, 1.0), 37, 20, 300
    channels = sparsity_row_channels(len(top_p), ordered)
    g = torch.Generator().manual_seed(24)
    out = torch.rand((channels, rows), generator=g, dtype=torch.float64) * 1.1 - 0.05
    out[:, :21] = torch.arange(21, dtype=torch.float64) / 20  # bin edges, 1.0 included
    out[:, 30:40] = math.nan
    out = out.to(dtype)
    counts = torch.randint(0, d + 1, (2, rows), generator=g)  # l0, nonfinite
    counts[0, 0], counts[0, 1] = 0, d
    counts[0, 2:22] = torch.arange(20) * d // 20  # l0 / d on bin edges where d allows
    native = ops._native_row_summaries(out, counts, top_p, ordered, d, bins)
    torch_form = sr.row_summary_parts(ops._row_dict(out, counts, top_p, ordered), d, bins)
    for got, want in zip(native, torch_form):
        assert list(got) == list(want)
        for name in want:
            assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype, name
            torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=0, msg=name)
    assert int(native[2]["hoyer"].sum()) == int(native[1]["hoyer"]) == rows - 10


def test_native_state_merge_matches_the_torch_form():
    """The accumulator merges feature states natively on the CPU; merge_feature_states_torch is the same
    formulas in torch: batches with different means and counts, NaN/Inf columns, empty sides."""
    from repkern.ops import sparsity as ops

    a = _data((70, 12), torch.float64, "cpu", seed=25)
    b = _data((9, 12), torch.float64, "cpu", seed=26) * 3 + 2
    a[:, 3] = math.nan
    b[:4, 5] = math.inf
    states = [torch.ops.repkern.sparsity_stats(t, 0.0, [], False)[0] for t in (a, b)]
    empty = ops.empty_feature_state(12)
    for left, right in [states, states[::-1], (empty, states[0]), (states[1], empty), (empty, empty)]:
        got, want = ops.merge_feature_states(left, right), ops.merge_feature_states_torch(left, right)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    merged = ops.merge_feature_states(*states)
    whole = torch.ops.repkern.sparsity_stats(torch.cat([a, b]), 0.0, [], False)[0]
    torch.testing.assert_close(merged, whole, rtol=1e-10, atol=1e-10, equal_nan=True)


def test_row_channels_layout_matches_native():
    """The Python view of the native row outputs (names and order) is the one the kernels write."""
    a = _data((5, 7), torch.float64, "cpu", seed=50)
    a[2, 3], a[4, 0] = math.nan, -math.inf
    _, out, counts = torch.ops.repkern.sparsity_stats(a, 0.0, [0.2, 0.7], True)
    assert out.shape == (sparsity_row_channels(2, True), 5) and counts.shape == (2, 5)
    assert counts.dtype == torch.int64
    ref = reference.sparsity_rows(a, 0.0, (0.2, 0.7), True)
    rows = sparsity_ops._row_dict(out, counts, (0.2, 0.7), True)
    assert set(rows) == set(ref)
    for name, value in ref.items():
        torch.testing.assert_close(rows[name].to(value.dtype), value, equal_nan=True, msg=name)


def _sync_worker(rank: int, world: int) -> None:
    a = _data((101, 10), torch.float64, "cpu", seed=41)
    cut = 37
    mine = a[:cut] if rank == 0 else a[cut:]
    acc = _accumulate([mine], keep_rows=True, top_p=TOP_P)
    before = acc.state_dict()
    first = acc.compute(sync=True)
    _assert_same_stats(first, repkern.sparsity_stats(a, top_p=TOP_P), rtol=1e-10, atol=1e-12)
    # the local state is untouched, so evaluating again counts every rank once
    after = acc.state_dict()
    assert after.keys() == before.keys() and after["rows"] == before["rows"] == mine.shape[0]
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(after[key], value), key
    _assert_same_stats(acc.compute(sync=True), first, rtol=0, atol=0)
    # a rank with no rows (and no device) joins the collective
    lonely = repkern.SparsityAccumulator(10, top_p=TOP_P)
    if rank == 0:
        lonely.update(a[:cut])
    _assert_same_stats(lonely.compute(sync=True), repkern.sparsity_stats(a[:cut], top_p=TOP_P), rtol=1e-10,
                       atol=1e-12, rows_too=False)
    assert lonely.compute().rows == (cut if rank == 0 else 0)


def test_compute_sync_over_two_gloo_processes_leaves_the_local_state_alone():
    run_gloo_processes(_sync_worker)


def test_compute_sync_of_an_accumulator_without_device_gathers_on_the_groups_device(monkeypatch):
    seen = gather_devices(monkeypatch, sparsity_ops)
    acc = repkern.SparsityAccumulator(4)
    for call in (lambda: acc.compute(sync=True), acc.all_reduce):
        with pytest.raises(Gathered):
            call()
    assert seen == [torch.device("meta")] * 2


def test_reset_forgets_the_rows_and_keeps_the_settings():
    a = _data((30, 6), torch.float32, "cpu", seed=42)
    acc = _accumulate([a], keep_rows=True, top_p=TOP_P, eps=0.01)
    acc.reset()
    fresh = repkern.SparsityAccumulator(6, keep_rows=True, top_p=TOP_P, eps=0.01)
    assert acc.device is None and acc.state_dict().keys() == fresh.state_dict().keys()
    _assert_same_stats(acc.compute(), fresh.compute(), rtol=0, atol=0)
    b = _data((20, 6), torch.float64, "cpu", seed=43)
    _assert_same_stats(acc.update(b).compute(), fresh.update(b).compute(), rtol=0, atol=0)
