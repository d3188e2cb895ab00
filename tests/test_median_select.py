"""The RBF median bandwidth's order statistics: the native CPU radix select (median_select) and the
torch path of CUDA, against a float64 sort of the packed upper triangle (torch.triu_indices, not the
op's packing), positions included: the lowest flat index i·n + j among the entries equal to the value."""

from __future__ import annotations

import math
import re

import pytest
import torch

from repkern import _native, reference
from repkern.ops import gram as gram_ops
from tests.conftest import at_thread_counts

SUBNORMAL = 1e-40  # float32 subnormal (also float64-representable)


def _oracle(d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k-th smallest of the strict upper triangle of d (B, n, n) in float64, the lowest flat position
    holding it) per batch matrix, NaN above every number."""
    n = d.shape[-1]
    iu = torch.triu_indices(n, n, 1)
    values = d[:, iu[0], iu[1]].double()
    flat = iu[0] * n + iu[1]
    value = values.sort(dim=1).values[:, k - 1]
    equal = (values == value[:, None]) | (values.isnan() & value.isnan()[:, None])
    position = torch.where(equal, flat, n * n).amin(1)
    return value, position


def _select(d: torch.Tensor, ranks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    values = d.new_empty((d.shape[0], len(ranks)))
    positions = torch.empty((d.shape[0], len(ranks)), dtype=torch.int64)
    _native.call(gram_ops.MEDIAN_SELECT, d.device, d, ranks, values, positions)
    return values, positions


def _matrix(kind: str, batch: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """(batch, n, n) whose strict upper triangle holds the case's values; the diagonal and lower
    triangle hold NaN (the kernel must not read them)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        d = torch.rand((batch, n, n), generator=g, dtype=torch.float64) * 10
    elif kind == "ties":  # four distinct values: every key bit is chosen with many candidates left
        d = torch.randint(0, 4, (batch, n, n), generator=g).double()
    elif kind == "equal":
        d = torch.full((batch, n, n), 3.0, dtype=torch.float64)
    elif kind == "specials":  # NaN, ±0, ±inf, subnormals, negatives among ordinary values
        pool = torch.tensor([math.nan, -0.0, 0.0, math.inf, -math.inf, SUBNORMAL, -SUBNORMAL, 1.0, -2.5, 7.0])
        d = pool[torch.randint(0, len(pool), (batch, n, n), generator=g)]
        d = torch.where(torch.rand((batch, n, n), generator=g) < 0.3, torch.rand((batch, n, n), generator=g), d)
    elif kind == "concentrated":  # distances of high-dimensional data: a narrow band, as in the RBF median
        x = torch.randn((batch, n, 64), generator=g, dtype=torch.float64)
        d = reference.squared_distances(x)
    else:
        raise AssertionError(kind)
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)
    return torch.where(upper, d, math.nan).to(dtype)


def _rank_sets(count: int) -> list[list[int]]:
    mid = (count + 1) // 2
    sets = [[mid], [mid, mid + 1] if mid < count else [mid], [1], [count], [1, count]]
    return [r for r in sets if all(1 <= k <= count for k in r)]


CASES = [
    ("random", 1, 2),
    ("random", 3, 3),
    ("random", 2, 5),
    ("random", 2, 50),
    ("random", 1, 200),  # 19900 entries: one histogram pass, then the gather
    ("random", 2, 700),  # 244650 entries: several parts, prefixes of two ranks diverging
    ("concentrated", 1, 700),
    ("ties", 2, 6),
    ("ties", 1, 700),  # every bit chosen: the lowest position found by a scan
    ("equal", 2, 4),
    ("equal", 1, 400),
    ("specials", 3, 7),
    ("specials", 2, 400),
]


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("kind,batch,n", CASES)
def test_select_matches_sorted_triangle(kind, batch, n, dtype):
    d = _matrix(kind, batch, n, dtype, seed=n + batch)
    count = n * (n - 1) // 2
    for ranks in _rank_sets(count):
        values, positions = _select(d, ranks)
        for c, k in enumerate(ranks):
            value, position = _oracle(d, k)
            torch.testing.assert_close(values[:, c].double(), value, equal_nan=True, rtol=0, atol=0)
            assert torch.equal(positions[:, c], position), (ranks, k)


@pytest.mark.parametrize("kind,n", [("random", 700), ("ties", 700), ("specials", 400), ("concentrated", 500)])
def test_select_independent_of_thread_count(kind, n):
    d = _matrix(kind, 2, n, torch.float32, seed=1)
    count = n * (n - 1) // 2
    ranks = [(count + 1) // 2, (count + 1) // 2 + 1]
    results = at_thread_counts(lambda: _select(d, ranks), (1, 2, 3))
    for values, positions in results[1:]:
        assert torch.equal(values.view(torch.int32), results[0][0].view(torch.int32))
        assert torch.equal(positions, results[0][1])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 10, 11, 300])
@pytest.mark.parametrize("median", ["full", "offdiag"])
@pytest.mark.parametrize("data", ["random", "ties"])
def test_median_paths_agree_with_reference(n, median, data):
    """The CPU path (native select) and the CUDA path (packed copy + kthvalue) give the reference's
    median and the same positions, each holding the value of its middle rank."""
    if median == "offdiag" and n < 2:
        pytest.skip("no off-diagonal entries")
    g = torch.Generator().manual_seed(n)
    x = torch.randn((2, n, 3), generator=g, dtype=torch.float64)
    if data == "ties":
        x = x.round()  # integer rows: many equal distances, some rows equal
    if n >= 4:
        x[1, 2] = math.nan
    d = reference.squared_distances(x)
    med, positions = gram_ops.median_sq_dist(d.clone(), median == "offdiag")
    torch.testing.assert_close(med, reference.median_squared_distance(d, median), equal_nan=True)
    iu = torch.triu_indices(n, n, 1)
    packed = d[:, iu[0], iu[1]].contiguous()
    med_torch, positions_torch = gram_ops.median_from_upper(packed, n, median == "offdiag")
    torch.testing.assert_close(med_torch, med, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(positions_torch, positions)
    # each position holds its middle value, and no lower upper-triangle position does
    total, zeros = (n * (n - 1), 0) if median == "offdiag" else (n * n, n)
    for c, rank in enumerate(((total + 1) // 2, total // 2 + 1)):
        if rank <= zeros:
            assert torch.equal(positions[:, c], torch.zeros(2, dtype=torch.int64))
            continue
        value, position = _oracle(d, (rank - zeros + 1) // 2)
        assert torch.equal(positions[:, c], position)
        held = d.reshape(2, n * n).gather(1, positions[:, c : c + 1])[:, 0]
        torch.testing.assert_close(held, value, equal_nan=True, rtol=0, atol=0)


def test_select_reads_only_the_strict_upper_triangle():
    n = 300
    d = _matrix("random", 1, n, torch.float32, seed=3)
    ranks = [n * (n - 1) // 4]
    expected = _select(d, ranks)
    lower = ~torch.ones(n, n, dtype=torch.bool).triu(1)
    for fill in (-math.inf, 0.0, math.inf):
        got = _select(torch.where(lower, fill, d), ranks)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def _call(d, ranks, values, positions):
    _native.call(gram_ops.MEDIAN_SELECT, d.device, d, ranks, values, positions)


def test_select_rejects_bad_arguments():
    d = torch.zeros(2, 4, 4)
    v, p = torch.zeros(2, 1), torch.zeros(2, 1, dtype=torch.int64)
    cases = [
        ((torch.zeros(2, 4, 4, dtype=torch.int64), [1], v, p), "d: must be float32 or float64"),
        ((torch.zeros(2, 4, 4, dtype=torch.float16), [1], v, p), "d: must be float32 or float64"),
        ((torch.zeros(2, 4, 3), [1], v, p), "d: expected shape"),
        ((torch.zeros(4, 4), [1], v, p), "d: expected shape"),
        ((torch.zeros(2, 4, 4).mT, [1], v, p), "d: must be contiguous"),
        ((d, [0], v, p), "ranks: 0 is outside [1, 6]"),
        ((d, [7], v, p), "ranks: 7 is outside [1, 6]"),
        ((d, [], v, p), "ranks: expected 1 or 2"),
        ((d, [1, 2, 3], torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int64)), "ranks: expected 1 or 2"),
        ((torch.zeros(2, 1, 1), [1], v, p), "ranks: 1 is outside [1, 0]"),
        ((d, [1, 2], v, p), "values: unexpected shape"),
        ((d, [1], torch.zeros(2, 1, dtype=torch.float64), p), "values: unexpected dtype"),
        ((d, [1], v, torch.zeros(2, 1, dtype=torch.int32)), "positions: unexpected dtype"),
        ((d, [1], v, torch.zeros(1, 1, dtype=torch.int64)), "positions: unexpected shape"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            _call(*args)
