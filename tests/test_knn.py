"""repkern.knn / mutual_knn / cycle_knn / cknna on every backend (CPU kernels, the CUDA kernels
through the emulator, CUDA), against independent numpy implementations written from the
definitions (stable lexicographic sorts for the kNN lists, platonic-rep's formulas for the
alignment metrics) and against facts that need no oracle.

Tiles are forced small (16 rows) so that n is not a multiple of the tile, several block pairs
run, and off-diagonal tiles exercise both the rows' and the columns' (transposed) merge; k
covers each register-slot class of the CUDA merge (k <= 32, 64, 128, 256), the vector and
scalar loads (tile widths 16 and n mod 16), and k > 256 (the torch fallback)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import repkern
from repkern import reference
from repkern.ops import knn as knn_ops

TILE16 = 16 * 16 * 8  # bytes: 16-row blocks in float32 and float64
METRICS = ("cosine", "ip", "euclidean")
DTYPES = (torch.float32, torch.float64)


# ---- numpy oracle, written from the definitions ------------------------------------------------


def np_similarity(x: np.ndarray, metric: str) -> np.ndarray:
    """n × n in float64: cosine (zero rows: 0), inner products, or distances from differences."""
    x = x.astype(np.float64)
    if metric == "cosine":
        norms = np.sqrt((x * x).sum(1))
        u = x / np.where(norms > 0, norms, 1.0)[:, None]
        return u @ u.T
    if metric == "ip":
        return x @ x.T
    return np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))


def np_knn(x: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best other rows: NaN last, then best value, then lower index (np.lexsort)."""
    s = np_similarity(x, metric)
    n = s.shape[0]
    vals, idx = np.empty((n, k)), np.empty((n, k), dtype=np.int64)
    for i in range(n):
        others = np.array([j for j in range(n) if j != i])
        v = s[i, others]
        nan = np.isnan(v)
        primary = np.where(nan, 0.0, v if metric == "euclidean" else -v)
        order = np.lexsort((others, primary, nan))[:k]
        idx[i], vals[i] = others[order], v[order]
    return vals, idx


def np_mutual_knn(nx: np.ndarray, ny: np.ndarray) -> float:
    n, k = nx.shape
    mx, my = np.zeros((n, n)), np.zeros((n, n))
    mx[np.arange(n)[:, None], nx] = 1.0
    my[np.arange(n)[:, None], ny] = 1.0
    return float(((mx * my).sum(1) / k).mean())


def np_cycle_knn(nx: np.ndarray, ny: np.ndarray) -> float:
    n = nx.shape[0]
    cyc = nx[ny]  # (n, k, k): x-neighbours of each y-neighbour
    return float((cyc == np.arange(n)[:, None, None]).reshape(n, -1).max(1).mean())


def np_hsic_unbiased(a: np.ndarray, b: np.ndarray) -> float:
    m = a.shape[0]
    at, bt = a.copy(), b.copy()
    np.fill_diagonal(at, 0)
    np.fill_diagonal(bt, 0)
    value = (at * bt.T).sum() + at.sum() * bt.sum() / ((m - 1) * (m - 2)) - 2 * (at @ bt).sum() / (m - 2)
    return value / (m * (m - 3))


def np_cknna(x: np.ndarray, y: np.ndarray, k: int) -> float:
    n = x.shape[0]
    K, L = np_similarity(x, "cosine"), np_similarity(y, "cosine")
    mk, ml = np.zeros((n, n)), np.zeros((n, n))
    mk[np.arange(n)[:, None], np_knn(x, k, "cosine")[1]] = 1.0
    ml[np.arange(n)[:, None], np_knn(y, k, "cosine")[1]] = 1.0

    def sim(a, b, mask):
        return np_hsic_unbiased(np.where(mask > 0, a, 0.0), np.where(mask > 0, b, 0.0))

    kl, kk, ll = sim(K, L, mk * ml), sim(K, K, mk), sim(L, L, ml)
    return kl / math.sqrt(kk * ll) if kk * ll > 0 else math.nan


# ---- data -----------------------------------------------------------------------------------------


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(n, d, dtype, seed=0):
    return torch.randn(n, d, generator=_gen(seed), dtype=torch.float64).to(dtype)


def _boundary_gap(x64: np.ndarray, k: int, metric: str) -> float:
    """Smallest gap, over rows, between the k-th and (k+1)-th best other values."""
    s = np_similarity(x64, metric)
    np.fill_diagonal(s, np.nan)
    gaps = []
    for row in s:
        v = np.sort(row[~np.isnan(row)])
        if metric != "euclidean":
            v = v[::-1]
        if k < len(v):
            gaps.append(abs(v[k - 1] - v[k]))
    return min(gaps) if gaps else math.inf


def separated(n, d, dtype, ks, metric="cosine", seed=0, count=1):
    """`count` random (n, d) tensors whose kNN sets (for every k in ks) are decided by gaps far
    above float32 rounding, so the float32 kernels and the float64 oracle select the same sets."""
    found = []
    while len(found) < count:
        x = _randn(n, d, dtype, seed)
        seed += 1
        if all(_boundary_gap(x.double().numpy(), k, metric) > 1e-4 for k in ks):
            found.append(x)
    return found


def tie_data(metric: str, dtype) -> torch.Tensor:
    """Data whose every score is computed exactly (in float32 too), with many exact ties:
    duplicate rows, and (cosine) zero rows and ±1 rows whose similarities are multiples of 1/16;
    (ip) small integers; (euclidean) small integers X and −X (column means exactly 0)."""
    g = _gen(7)
    if metric == "cosine":
        x = torch.randint(0, 2, (70, 16), generator=g).double() * 2 - 1
        x = torch.cat([x, x[3:4], torch.zeros(2, 16), x[10:12]])
    elif metric == "ip":
        x = torch.randint(-2, 3, (71, 5), generator=g).double()
        x = torch.cat([x, x[5:7], x[40:42]])
    else:
        half = torch.randint(-2, 3, (35, 4), generator=g).double()
        half = torch.cat([half, half[2:3], half[20:21]])
        x = torch.cat([half, -half])
    return x[torch.randperm(x.shape[0], generator=g)].to(dtype)


def _check_lists(vals, idx, x, k, metric, *, exact_indices):
    """(vals, idx) against the numpy oracle: values close; indices equal (exact_indices), or
    else the true values of the chosen neighbours equal the oracle's, position by position
    (float32 may swap near-ties)."""
    n = x.shape[0]
    x64 = x.double().numpy()
    ref_v, ref_i = np_knn(x64, k, metric)
    assert vals.shape == (n, k) and idx.shape == (n, k) and idx.dtype == torch.int64
    got_i = idx.cpu().numpy()
    assert (got_i != np.arange(n)[:, None]).all(), "a row is its own neighbour"
    assert all(len(set(row)) == k for row in got_i.tolist()), "a neighbour repeats"
    tol = 1e-12 if x.dtype == torch.float64 else 2e-5
    scale = max(1.0, float(np.nanmax(np.abs(ref_v)))) if not np.isnan(ref_v).all() else 1.0
    if exact_indices:
        np.testing.assert_array_equal(got_i, ref_i)
    else:
        true_v = np_similarity(x64, metric)[np.arange(n)[:, None], got_i]
        np.testing.assert_allclose(true_v, ref_v, rtol=0, atol=tol * 4 * scale)
    np.testing.assert_allclose(vals.cpu().double().numpy(), ref_v, rtol=0, atol=tol * 4 * scale)


# ---- knn against the oracle ------------------------------------------------------------------------


@pytest.mark.emu_smoke
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
def test_knn_matches_numpy(backend, dtype, metric):
    n = 83  # 6 blocks of 16 rows: 21 tiles, the last block 3 rows (fewer than k)
    x = _randn(n, 7, dtype).to(backend.device)
    for k in (1, 10, n - 1):
        result = repkern.knn(x, k, metric=metric, tile_bytes=TILE16)
        assert isinstance(result, repkern.Neighbors) and isinstance(reference.knn(x.cpu(), k), repkern.Neighbors)
        vals, idx = result
        assert result.values is vals and result.indices is idx
        assert vals.dtype == dtype and vals.device == x.device
        _check_lists(vals, idx, x.cpu(), k, metric, exact_indices=dtype == torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", (33, 65, 129, 256))
def test_knn_register_slot_classes(backend, dtype, k):
    """k in each slot class of the CUDA merge (R = 2, 4, 8), euclidean (a nonzero bias); tiles
    of 32 columns (vector loads) and a last block of 23 rows (scalar loads)."""
    n = {33: 55, 65: 87, 129: 151, 256: 279}[k]
    x = _randn(n, 5, dtype, seed=k).to(backend.device)
    vals, idx = repkern.knn(x, k, metric="euclidean", tile_bytes=32 * 32 * 8)
    _check_lists(vals, idx, x.cpu(), k, "euclidean", exact_indices=dtype == torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_knn_wide_tiles(backend, dtype):
    """Tiles of 128 (float32) or 80 (float64) columns: the CPU columns' merge screens 64
    columns at once against rows that already hold neighbours (3 or 5 blocks), and holds
    bands of several groups; the last block is narrower."""
    n = 333
    x = _randn(n, 6, dtype, seed=13).to(backend.device)
    for metric, k in (("cosine", 5), ("euclidean", 40)):
        vals, idx = repkern.knn(x, k, metric=metric, tile_bytes=128 * 128 * 4)
        _check_lists(vals, idx, x.cpu(), k, metric, exact_indices=dtype == torch.float64)


def test_knn_large_k_merges_in_torch(backend):
    """k > 256: the torch fallback of the merge (same contract), several tiles."""
    n, k = 301, 280
    x = _randn(n, 6, torch.float64, seed=3).to(backend.device)
    for metric in METRICS:
        vals, idx = repkern.knn(x, k, metric=metric, tile_bytes=64 * 64 * 8)
        _check_lists(vals, idx, x.cpu(), k, metric, exact_indices=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
def test_knn_ties_rank_lower_index_first(backend, dtype, metric):
    """Exactly computed scores with many exact ties (duplicates, zero rows, equal similarities):
    the lists equal the oracle's exactly, in both dtypes."""
    x = tie_data(metric, dtype).to(backend.device)
    n = x.shape[0]
    assert n % 16 != 0
    for k in (1, 12, n - 1):
        vals, idx = repkern.knn(x, k, metric=metric, tile_bytes=TILE16)
        ref_v, ref_i = np_knn(x.cpu().double().numpy(), k, metric)
        np.testing.assert_array_equal(idx.cpu().numpy(), ref_i)
        np.testing.assert_array_equal(vals.cpu().numpy(), ref_v.astype(vals.cpu().numpy().dtype))  # exact, rounded


def test_knn_duplicates_and_zero_rows(backend):
    """Hand-checkable: a duplicate of row i is its first neighbour (cosine 1, distance 0); a
    zero row has similarity 0 to every row, so its neighbours are the lowest other indices."""
    x = _randn(40, 6, torch.float64, seed=5)
    x[17] = x[3]
    x[25] = 0.0
    x = x.to(backend.device)
    vals, idx = repkern.knn(x, 4, tile_bytes=TILE16)
    assert idx[3, 0] == 17 and idx[17, 0] == 3 and vals[3, 0] == pytest.approx(1.0, abs=1e-15)
    assert idx[25].tolist() == [0, 1, 2, 3] and vals[25].tolist() == [0.0] * 4
    dist, didx = repkern.knn(x, 2, metric="euclidean", tile_bytes=TILE16)
    assert didx[3, 0] == 17 and dist[3, 0] == 0.0 and didx[17, 0] == 3


@pytest.mark.parametrize("metric", METRICS)
def test_knn_nan_rows_rank_last(backend, metric):
    """Rows holding NaN: NaN similarity to every row, ranked after every number; a NaN row's own
    neighbours tie at NaN: the lowest other indices, with NaN values."""
    n = 45
    x = _randn(n, 5, torch.float64, seed=11)
    x[[4, 30], 2] = math.nan
    x = x.to(backend.device)
    for k in (3, n - 1):
        vals, idx = repkern.knn(x, k, metric=metric, tile_bytes=TILE16)
        ref_v, ref_i = np_knn(x.cpu().numpy(), k, metric)
        np.testing.assert_array_equal(idx.cpu().numpy(), ref_i)
        np.testing.assert_allclose(vals.cpu().numpy(), ref_v, rtol=0, atol=1e-12)
        others = [j for j in range(n) if j != 4][:k]
        assert idx[4].tolist() == others and torch.isnan(vals[4]).all()
    assert idx[0, -2:].tolist() == [4, 30] and torch.isnan(vals[0, -2:]).all()
    assert not torch.isnan(vals[0, :-2]).any()


def test_cosine_knn_is_invariant_to_positive_row_scaling(backend):
    x = _randn(77, 9, torch.float64, seed=2)
    scale = torch.rand(77, 1, generator=_gen(3), dtype=torch.float64) * 10 + 0.1
    v1, i1 = repkern.knn(x.to(backend.device), 8, tile_bytes=TILE16)
    v2, i2 = repkern.knn((x * scale).to(backend.device), 8, tile_bytes=TILE16)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(v1, v2, rtol=0, atol=1e-14)
    # powers of two: bit-identical normalized rows, so identical results in float32 too
    p2 = torch.tensor([2.0**e for e in range(-5, 6)], dtype=torch.float32)
    xf = x.float()
    scaled = xf * p2[torch.arange(77) % 11][:, None]
    a, b = repkern.knn(xf.to(backend.device), 8, tile_bytes=TILE16), repkern.knn(scaled.to(backend.device), 8,
                                                                                tile_bytes=TILE16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_knn_16bit_inputs_accumulate_in_float32(backend):
    x = _randn(50, 8, torch.float64, seed=4)
    for dtype in (torch.float16, torch.bfloat16):
        xl = x.to(dtype)
        vals, idx = repkern.knn(xl.to(backend.device), 5, tile_bytes=TILE16)
        assert vals.dtype == torch.float32
        _check_lists(vals, idx, xl.float(), 5, "cosine", exact_indices=False)


def test_knn_does_not_depend_on_the_tile(backend):
    x = _randn(130, 6, torch.float64, seed=9).to(backend.device)
    results = [repkern.knn(x, 7, metric="ip", tile_bytes=t) for t in (TILE16, 48 * 48 * 8, None)]
    for v, i in results[1:]:
        assert torch.equal(i, results[0][1])
        torch.testing.assert_close(v, results[0][0], rtol=0, atol=1e-13)


# ---- mutual_knn, cycle_knn, cknna against platonic-rep's formulas ---------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
def test_mutual_and_cycle_knn_match_numpy(backend, dtype, metric):
    n = 67
    ks = (1, 5, 12)
    x, z = separated(n, 6, dtype, ks, metric, count=2)
    y = (x + 0.4 * z).to(dtype)  # related to x, not equal
    if not all(_boundary_gap(y.double().numpy(), k, metric) > 1e-4 for k in ks):
        y = z
    for k in ks:
        nx = np_knn(x.double().numpy(), k, metric)[1]
        ny = np_knn(y.double().numpy(), k, metric)[1]
        xd, yd = x.to(backend.device), y.to(backend.device)
        m = repkern.mutual_knn(xd, yd, k, metric=metric, tile_bytes=TILE16)
        c = repkern.cycle_knn(xd, yd, k, metric=metric, tile_bytes=TILE16)
        assert m.dtype == dtype and m.shape == () and c.dtype == dtype
        assert m.item() == pytest.approx(np_mutual_knn(nx, ny), abs=1e-6)
        assert c.item() == pytest.approx(np_cycle_knn(nx, ny), abs=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cknna_matches_numpy(backend, dtype):
    n = 59
    ks = (2, 10, 25)
    x, z = separated(n, 5, dtype, ks, count=2)
    y = (x + 0.5 * z).to(dtype)
    if not all(_boundary_gap(y.double().numpy(), k, "cosine") > 1e-4 for k in ks):
        y = z
    for k in ks:
        got = repkern.cknna(x.to(backend.device), y.to(backend.device), k, tile_bytes=TILE16)
        want = np_cknna(x.double().numpy(), y.double().numpy(), k)
        assert got.dtype == dtype and got.shape == ()
        assert got.item() == pytest.approx(want, rel=1e-9 if dtype == torch.float64 else 1e-4, abs=1e-12)


def test_cknna_with_ties_and_all_neighbours(backend):
    """Exactly computed similarities with ties (the masks follow the tie rule) and k = n − 1
    (every off-diagonal entry masked: the unbiased CKA of the two cosine Grams)."""
    x = tie_data("cosine", torch.float64)
    y = torch.cat([x[:, 8:], x[:, :8]], 1).roll(1, 0)
    n = x.shape[0]
    for k in (3, 20, n - 1):
        got = repkern.cknna(x.to(backend.device), y.to(backend.device), k, tile_bytes=TILE16)
        assert got.item() == pytest.approx(np_cknna(x.numpy(), y.numpy(), k), rel=1e-10, abs=1e-12)


def test_alignment_facts(backend):
    """Identical inputs: mutual_knn 1, cknna 1. Shuffling the rows of y alone destroys the
    alignment: mutual_knn near k/(n − 1), cknna near 0."""
    n, k = 200, 5
    x = _randn(n, 16, torch.float64, seed=21).to(backend.device)
    perm = torch.randperm(n, generator=_gen(1)).to(backend.device)
    assert repkern.mutual_knn(x, x, k).item() == 1.0
    assert repkern.cknna(x, x, k).item() == pytest.approx(1.0, abs=1e-12)
    assert repkern.mutual_knn(x, 3 * x, k, metric="euclidean").item() == 1.0
    shuffled = repkern.mutual_knn(x, x[perm], k).item()
    assert shuffled < 3 * k / (n - 1)
    assert abs(repkern.cknna(x, x[perm], k).item()) < 0.2
    # cycle: chance level is about k²/n (some of i's k random y-neighbours has i among its k)
    assert repkern.cycle_knn(x, x[perm], k).item() < 2 * k * k / n < 0.9 < repkern.cycle_knn(x, x, k).item()


def test_nan_rows_in_alignment_metrics(backend):
    """mutual_knn / cycle_knn follow the kNN lists (NaN rows' neighbours: lowest indices);
    cknna is NaN when x or y holds a NaN row (its self-similarity terms are NaN)."""
    n, k = 30, 4
    x = _randn(n, 5, torch.float64, seed=31)
    y = _randn(n, 5, torch.float64, seed=32)
    x[6, 0] = math.nan
    nx, ny = np_knn(x.numpy(), k, "cosine")[1], np_knn(y.numpy(), k, "cosine")[1]
    xd, yd = x.to(backend.device), y.to(backend.device)
    assert repkern.mutual_knn(xd, yd, k, tile_bytes=TILE16).item() == pytest.approx(np_mutual_knn(nx, ny))
    assert repkern.cycle_knn(xd, yd, k, tile_bytes=TILE16).item() == pytest.approx(np_cycle_knn(nx, ny))
    assert math.isnan(repkern.cknna(xd, yd, k, tile_bytes=TILE16).item())
    assert math.isnan(repkern.cknna(yd, xd, k, tile_bytes=TILE16).item())


# ---- the reference follows the same definitions ------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_reference_matches_numpy(metric):
    x = tie_data(metric, torch.float64)
    for k in (1, 9):
        vals, idx = reference.knn(x, k, metric=metric)
        ref_v, ref_i = np_knn(x.numpy(), k, metric)
        np.testing.assert_array_equal(idx.numpy(), ref_i)
        np.testing.assert_array_equal(vals.numpy(), ref_v)
    y = torch.cat([x[:, 1:], x[:, :1]], 1).roll(2, 0)
    for k in (2, 9):
        nx, ny = np_knn(x.numpy(), k, metric)[1], np_knn(y.numpy(), k, metric)[1]
        assert reference.mutual_knn(x, y, k, metric=metric).item() == pytest.approx(np_mutual_knn(nx, ny))
        assert reference.cycle_knn(x, y, k, metric=metric).item() == pytest.approx(np_cycle_knn(nx, ny))
    if metric == "cosine":  # the data whose cosine similarities are exact (ties decided alike)
        assert reference.cknna(x, y, 9).item() == pytest.approx(np_cknna(x.numpy(), y.numpy(), 9), rel=1e-10)


def test_reference_backend_setting(monkeypatch):
    x, y = _randn(40, 5, torch.float64, seed=1), _randn(40, 4, torch.float64, seed=2)
    fast = [repkern.knn(x, 5), repkern.mutual_knn(x, y, 5), repkern.cycle_knn(x, y, 5), repkern.cknna(x, y, 5)]
    monkeypatch.setenv("REPKERN_BACKEND", "reference")
    ref = [repkern.knn(x, 5), repkern.mutual_knn(x, y, 5), repkern.cycle_knn(x, y, 5), repkern.cknna(x, y, 5)]
    assert torch.equal(fast[0][1], ref[0][1])
    torch.testing.assert_close(fast[0][0], ref[0][0], rtol=0, atol=1e-14)
    for a, b in zip(fast[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ---- arguments, dtypes, custom op ---------------------------------------------------------------------


@pytest.mark.parametrize("call, exc, message", [
    (lambda x, y: repkern.knn(x, 0), ValueError, "k:"),
    (lambda x, y: repkern.knn(x, 10), ValueError, "k:"),
    (lambda x, y: repkern.knn(x, 2.0), TypeError, "k:"),
    (lambda x, y: repkern.knn(x, True), TypeError, "k:"),
    (lambda x, y: repkern.knn(x, 3, metric="l1"), ValueError, "metric:"),
    (lambda x, y: repkern.knn(x[0], 3), ValueError, "x:"),
    (lambda x, y: repkern.knn(x[None], 3), ValueError, "x:"),
    (lambda x, y: repkern.knn(x[:1], 0), ValueError, "x:"),
    (lambda x, y: repkern.knn(x[:, :0], 3), ValueError, "x:"),
    (lambda x, y: repkern.knn(x.long(), 3), TypeError, "x:"),
    (lambda x, y: repkern.knn(x.numpy(), 3), TypeError, "x:"),
    (lambda x, y: repkern.knn(x, 3, tile_bytes=0), ValueError, "tile_bytes"),
    (lambda x, y: repkern.mutual_knn(x, y[:9], 3), ValueError, "y:"),
    (lambda x, y: repkern.mutual_knn(x, y, 10), ValueError, "k:"),
    (lambda x, y: repkern.cycle_knn(x, y[:, None], 3), ValueError, "y:"),
    (lambda x, y: repkern.cycle_knn(x, y, 3, metric="dot"), ValueError, "metric:"),
    (lambda x, y: repkern.cknna(x[:3], y[:3], 1), ValueError, "x:"),
    (lambda x, y: repkern.cknna(x, y, 0), ValueError, "k:"),
    (lambda x, y: repkern.cknna(x, y.int(), 2), TypeError, "y:"),
])
def test_bad_arguments_name_the_argument(call, exc, message, monkeypatch):
    x, y = _randn(10, 4, torch.float32), _randn(10, 3, torch.float32)
    with pytest.raises(exc, match=message):
        call(x, y)
    monkeypatch.setenv("REPKERN_BACKEND", "reference")  # the reference validates the same way
    with pytest.raises(exc, match=message):
        call(x, y)


def test_pair_results_promote_to_float64():
    x, y = _randn(20, 4, torch.float32), _randn(20, 3, torch.float64)
    for fn in (repkern.mutual_knn, repkern.cycle_knn, repkern.cknna):
        assert fn(x, y, 3).dtype == torch.float64
        assert fn(x.half(), y.float(), 3).dtype == torch.float32


def test_native_merge_rejects_bad_state():
    """The binding checks what the kernel dereferences and the merge's contract."""
    from repkern import _native

    tile = torch.zeros(4, 4)
    bias = torch.zeros(4)
    vals, idx = torch.zeros(4, 2), torch.full((4, 2), -1, dtype=torch.int64)
    kern = knn_ops.KNN_TOPK_MERGE
    with pytest.raises(ValueError, match="col0"):  # overlapping ranges with the columns' merge
        _native.call(kern, tile.device, tile, bias, bias, vals, idx, vals.clone(), idx.clone(), 0, 2)
    with pytest.raises(ValueError, match="row_idx"):
        _native.call(kern, tile.device, tile, bias, None, vals, idx.int(), None, None, 0, 0)
    with pytest.raises(ValueError, match="k must be"):
        _native.call(kern, tile.device, tile, bias, None, torch.zeros(4, 300), torch.zeros(4, 300).long(), None,
                     None, 0, 0)
    with pytest.raises(ValueError, match="give all three"):
        _native.call(kern, tile.device, tile, bias, None, vals, idx, vals.clone(), idx.clone(), 0, 8)


def test_opcheck_and_compile():
    x = _randn(37, 5, torch.float32)
    for metric in METRICS:
        torch.library.opcheck(torch.ops.repkern.knn.default, (x, 4, metric, 16))
    compiled = torch.compile(lambda a, b: repkern.mutual_knn(a, b, 4) + repkern.cknna(a, b, 4), fullgraph=True,
                             backend="aot_eager")
    y = _randn(37, 3, torch.float32, seed=1)
    torch.testing.assert_close(compiled(x, y), repkern.mutual_knn(x, y, 4) + repkern.cknna(x, y, 4))


def test_knn_gives_no_gradient():
    x = _randn(12, 3, torch.float32).requires_grad_()
    vals, idx = repkern.knn(x, 2)
    assert not vals.requires_grad and not idx.requires_grad
