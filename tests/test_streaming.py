"""repkern.StreamingCKA and MinibatchCKA: streaming == one-shot, minibatch == the published
formula, merges, checkpoints, torch.distributed, bad input."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch

import repkern
from repkern import _common, reference
from repkern.ops import streaming
from tests.conftest import Gathered, assert_close_to_reference, gather_devices, run_gloo_processes


def _data(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _model_layers(n, widths, seed, shift=0.0):
    """Layers of one 'model': each a noisy linear map of a shared signal (CKA well inside (0, 1)),
    offset by `shift` (mean-shifted activations)."""
    base = _data((n, 6), seed)
    return [base @ _data((6, w), seed + 1 + i) + 0.8 * _data((n, w), seed + 50 + i) + shift
            for i, w in enumerate(widths)]


def _split(layers, sizes):
    assert sum(sizes) == layers[0].shape[0]
    return list(zip(*[t.split(sizes) for t in layers]))


SPLITS = ([203], [64, 64, 64, 11], [1, 100, 102], [50, 50, 50, 50, 3])


# ---- StreamingCKA == one-shot cka_matrix --------------------------------------------------------


@pytest.mark.parametrize("hold_rows", (None, 0, 64))
@pytest.mark.parametrize("debiased", (False, True))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16))
def test_streaming_equals_one_shot_cka_matrix(dtype, debiased, hold_rows):
    """Several batch splits (one batch, an unequal last batch, a batch of one sample), mean-shifted data;
    the batches held and added together (default: all of them), each added on its own (0), or some held."""
    xs64 = _model_layers(203, (7, 12, 5), seed=0, shift=40.0)
    ys64 = _model_layers(203, (9, 4), seed=10, shift=-25.0)
    xs, ys = [t.to(dtype) for t in xs64], [t.to(dtype) for t in ys64]
    stat = _common.stat_dtype(dtype)
    expected = {}
    for ys_arg in (ys, None):
        ys64_arg = None if ys_arg is None else [t.double() for t in ys_arg]
        ref_low = reference.cka_matrix(xs, ys_arg, "linear", debiased=debiased).to(stat)
        ref64 = reference.cka_matrix([t.double() for t in xs], ys64_arg, "linear", debiased=debiased)
        one_shot = repkern.cka_matrix(xs, ys_arg, "linear", debiased=debiased)
        expected[ys_arg is None] = (ref_low, ref64, one_shot)
    for sizes in SPLITS:
        acc = repkern.StreamingCKA(debiased=debiased, hold_rows=hold_rows)
        sym = repkern.StreamingCKA(debiased=debiased, hold_rows=hold_rows)
        for bx, by in zip(_split(xs, sizes), _split(ys, sizes)):
            acc.update(bx, by)
            sym.update(bx)
        assert acc.samples == 203 and acc.batches == len(sizes)
        for result, symmetric in ((acc.compute(), False), (sym.compute(), True)):
            ref_low, ref64, one_shot = expected[symmetric]
            assert result.dtype == stat
            assert_close_to_reference(result, ref_low, ref64)
            torch.testing.assert_close(result, one_shot, rtol=3e-5 if dtype != torch.float64 else 1e-10, atol=1e-6)


def test_streaming_symmetric_has_unit_diagonal_and_is_symmetric():
    xs = _model_layers(120, (5, 8, 3), seed=3)
    acc = repkern.StreamingCKA()
    for batch in _split(xs, [50, 70]):
        acc.update(batch)
    m = acc.compute()
    assert torch.equal(m, m.T) and torch.equal(m.diagonal(), torch.ones(3))


def test_streaming_is_invariant_to_scale_shift_and_rotation_of_a_layer():
    """CKA of x with 3·x·Q + c is 1 (isotropic scale, orthogonal Q, any offset), batch by batch."""
    x = _data((90, 6), 4)
    q, _ = torch.linalg.qr(_data((6, 6), 5))
    acc = repkern.StreamingCKA(debiased=True)
    for bx in x.split([30, 29, 31]):
        acc.update([bx], [3 * bx @ q + 7.0])
    torch.testing.assert_close(acc.compute(), torch.ones(1, 1, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_shift_map_matches_statistics_of_shifted_data():
    """_shift(stats of z, δ) == stats of z + δ, every statistic (the algebra merges and compute rely on)."""
    layers = [_data((17, 4), 6) + 3, _data((17, 3), 7) - 2]
    acc = repkern.StreamingCKA(debiased=True)
    layout = ((4,), (3,))
    stats = acc._batch_stats(layers, layout)
    deltas = [_data((4,), 8), _data((3,), 9)]
    moved = streaming._shift(stats, deltas, 17, streaming._streaming_pairs(layout), True)
    direct = acc._batch_stats(layers, layout)
    # statistics of z + δ computed directly (z = layers centered on their batch means)
    zs = [t - t.mean(0) + d for t, d in zip(layers, deltas)]
    u = [z.square().sum(-1) for z in zs]
    for a, b in streaming._streaming_pairs(layout):
        torch.testing.assert_close(moved[f"M/{a},{b}"], zs[a].T @ zs[b], rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(moved[f"g/{a},{b}"], zs[b].T @ u[a], rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(moved[f"h/{a},{b}"], zs[a].T @ u[b], rtol=1e-12, atol=1e-10)
    pairs = streaming._streaming_pairs(layout)
    torch.testing.assert_close(moved["P"], torch.stack([u[a] @ u[b] for a, b in pairs]), rtol=1e-12, atol=1e-9)
    for a in range(2):
        torch.testing.assert_close(moved[f"sum/{a}"], zs[a].sum(0), rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(moved[f"shift/{a}"], direct[f"shift/{a}"] - deltas[a])


# ---- the row-block update == the per-pair statistics ------------------------------------------------


def _direct_state(layers, pairs, shifts, debiased):
    """The statistics of all rows about the shifts c_a, each pair on its own in float64 (module
    docstring of repkern.ops.streaming): z = x − c_a, s_a = Σz, M_ab = Σ z_a z_bᵀ, g, h, P."""
    zs = [t - c for t, c in zip(layers, shifts)]
    u = [z.square().sum(-1) for z in zs]
    stats = {f"sum/{a}": z.sum(0) for a, z in enumerate(zs)}
    stats.update({f"M/{a},{b}": zs[a].T @ zs[b] for a, b in pairs})
    if debiased:
        stats.update({f"g/{a},{b}": zs[b].T @ u[a] for a, b in pairs})
        stats.update({f"h/{a},{b}": zs[a].T @ u[b] for a, b in pairs})
        stats["P"] = torch.stack([u[a] @ u[b] for a, b in pairs])
    return stats


def _assert_state(state, expected, per_pair):
    """`state` (a state_dict) holds `expected` to float64 rounding, and the per-pair accumulator's
    state_dict `per_pair` has the same entries, shapes and values."""
    stats = state["stats"]
    assert stats.keys() == per_pair["stats"].keys() and state["layout"] == per_pair["layout"]
    for key, value in stats.items():
        other = per_pair["stats"][key]
        assert value.shape == other.shape and value.dtype == other.dtype == torch.float64, key
        assert value.is_contiguous(), key
        torch.testing.assert_close(value, other, rtol=1e-11, atol=1e-9, msg=key)
    for key, value in expected.items():
        torch.testing.assert_close(stats[key], value, rtol=1e-11, atol=1e-9, msg=key)


@pytest.mark.parametrize("hold_rows", (0, 64))
@pytest.mark.parametrize("debiased", (False, True))
@pytest.mark.parametrize("symmetric", (False, True), ids=("ys", "ys=None"))
def test_row_block_update_equals_per_pair_statistics(symmetric, debiased, hold_rows):
    """One GEMM per layer against all its partners gives every pair's statistics: layers of different
    widths, a self-comparison and two models, several batches (one of a single row), a merge, a state
    dict restored and continued, the packed form all_reduce gathers. hold_rows=64: the first two
    batches (51 rows) are held and added together, the others (>= 64 rows) on their own."""
    from repkern.bench.streaming import PerPairStreamingCKA

    xs = _model_layers(203, (7, 12, 1, 5), seed=140, shift=30.0)
    ys = None if symmetric else _model_layers(203, (9, 4, 6), seed=150, shift=-12.0)
    sizes = [50, 1, 64, 88]
    batches = list(zip(_split(xs, sizes), [None] * 4 if symmetric else _split(ys, sizes)))
    layout = (tuple(t.shape[1] for t in xs), None if symmetric else tuple(t.shape[1] for t in ys))
    pairs = streaming._streaming_pairs(layout)
    layers = xs + ([] if symmetric else ys)

    def fed(cls, part):
        acc = cls(debiased=debiased, hold_rows=hold_rows)
        if cls is PerPairStreamingCKA and hold_rows and len(part) > 1 and part[0] is batches[0]:
            (x0, y0), (x1, y1) = part[:2]  # the rows StreamingCKA holds and adds as one batch
            joined_y = None if symmetric else tuple(map(torch.cat, zip(y0, y1)))
            part = [(tuple(map(torch.cat, zip(x0, x1))), joined_y)] + part[2:]
        for bx, by in part:
            acc.update(bx, by)
        return acc

    acc, per_pair = fed(repkern.StreamingCKA, batches), fed(PerPairStreamingCKA, batches)
    state = acc.state_dict()
    shifts = [state["stats"][f"shift/{a}"] for a in range(len(layers))]
    first = 50 if hold_rows == 0 else 51
    for c, t in zip(shifts, layers):  # the shift is the first added batch's mean
        torch.testing.assert_close(c, t[:first].mean(0), rtol=0, atol=1e-12)
    _assert_state(state, _direct_state(layers, pairs, shifts, debiased), per_pair.state_dict())
    torch.testing.assert_close(acc.compute(), per_pair.compute(), rtol=1e-12, atol=1e-13)
    for a in range(len(layers)):  # each layer's pairs stay views of one row block, updated in one pass
        assert len({acc._stats[f"M/{a},{b}"].untyped_storage().data_ptr() for r, b in pairs if r == a}) == 1

    # merged (into an accumulator with data, and into an empty one), restored and continued, packed
    merged = fed(repkern.StreamingCKA, batches[:2]).merge(fed(repkern.StreamingCKA, batches[2:]))
    _assert_state(merged.state_dict(), _direct_state(layers, pairs, shifts, debiased), per_pair.state_dict())
    late = repkern.StreamingCKA(debiased=debiased).merge(fed(repkern.StreamingCKA, batches[1:]))
    late_shifts = [late.state_dict()["stats"][f"shift/{a}"] for a in range(len(layers))]
    rest = [t[50:] for t in layers]
    _assert_state(late.state_dict(), _direct_state(rest, pairs, late_shifts, debiased),
                  fed(PerPairStreamingCKA, batches[1:]).state_dict())
    restored = repkern.StreamingCKA(debiased=debiased)
    restored.load_state_dict(fed(repkern.StreamingCKA, batches[:3]).state_dict())
    restored.update(*batches[3])
    _assert_state(restored.state_dict(), _direct_state(layers, pairs, shifts, debiased), per_pair.state_dict())
    unpacked = acc._unpacked(acc._packed(torch.device("cpu")))
    gathered = repkern.StreamingCKA(debiased=debiased).merge(unpacked).merge(fed(repkern.StreamingCKA, batches))
    doubled = _direct_state([torch.cat([t, t]) for t in layers], pairs, shifts, debiased)
    _assert_state(gathered.state_dict(), doubled, per_pair.merge(fed(PerPairStreamingCKA, batches)).state_dict())


def test_streaming_memory_budget_refuses_and_suggests_minibatch():
    acc = repkern.StreamingCKA(max_state_bytes=100_000)
    xs = [torch.randn(8, 64), torch.randn(8, 64)]
    need = streaming._state_bytes(((64, 64), None), False)
    assert need == 8 * (3 * 64 * 64 + 3 * 128)  # pairs (0,0), (0,1), (1,1): d_a·d_b each, + 3·d per layer
    with pytest.raises(ValueError, match="MinibatchCKA"):
        acc.update(xs)
    repkern.StreamingCKA(max_state_bytes=need).update(xs)  # exactly at the budget is fine


# ---- held rows -------------------------------------------------------------------------------------------


def _state_values(acc):
    state = acc.state_dict()
    return state["samples"], state["layout"], state["stats"]


def _assert_equal_states(a, b):
    (samples_a, layout_a, stats_a), (samples_b, layout_b, stats_b) = _state_values(a), _state_values(b)
    assert samples_a == samples_b and layout_a == layout_b and stats_a.keys() == stats_b.keys()
    for key, value in stats_a.items():  # held rows are strided views: sums may round differently
        torch.testing.assert_close(value, stats_b[key], rtol=1e-12, atol=1e-10, msg=key)


@pytest.mark.parametrize("debiased", (False, True))
def test_held_batches_are_added_as_one_batch(debiased):
    """Batches held together give the state of their concatenation added as one batch; a batch
    that does not fit adds the held rows first, one that fills the buffer adds them at once, and one of at
    least hold_rows rows is added on its own. The rows are copied: the caller may reuse its tensors."""
    xs = _model_layers(150, (6, 3), seed=300, shift=7.0)
    ys = _model_layers(150, (4,), seed=310, shift=-2.0)
    groups = [[30, 20, 14], [40], [16, 30]]  # 64 (fills the buffer), 40 (then 16 + 40 > 64), 46 (at compute)
    sizes = [s for g in groups for s in g]
    held = repkern.StreamingCKA(debiased=debiased, hold_rows=64)
    for bx, by in zip(_split(xs, sizes), _split(ys, sizes)):
        bx, by = [t.clone() for t in bx], [t.clone() for t in by]
        held.update(bx, by)
        for t in bx + by:
            t.fill_(1e6)  # reused by the caller: the held copy must not change
    assert held.samples == 150 and held.batches == 6
    joined = repkern.StreamingCKA(debiased=debiased, hold_rows=0)
    for bx, by in zip(_split(xs, [sum(g) for g in groups]), _split(ys, [sum(g) for g in groups])):
        joined.update(bx, by)
    _assert_equal_states(held, joined)
    assert held.state_dict()["batches"] == 6
    torch.testing.assert_close(held.compute(), joined.compute(), rtol=1e-12, atol=1e-13)

    big = repkern.StreamingCKA(debiased=debiased, hold_rows=64)
    big.update(*[[t[:10] for t in layers] for layers in (xs, ys)])  # held
    big.update(*[[t[10:] for t in layers] for layers in (xs, ys)])  # 140 rows: the 10 first, then these alone
    split = repkern.StreamingCKA(debiased=debiased, hold_rows=0)
    split.update(*[[t[:10] for t in layers] for layers in (xs, ys)]).update(*[[t[10:] for t in layers]
                                                                            for layers in (xs, ys)])
    _assert_equal_states(big, split)


def test_held_rows_are_added_before_the_state_is_read():
    """merge (both sides), compute(sync) through the packed state, state_dict, load_state_dict (replaces them),
    reset (drops them), a batch of another accumulation dtype (adds them first), and a second batch of other
    widths is refused while rows are held."""
    xs = _model_layers(60, (5, 3), seed=320, shift=3.0)
    first, second = [t[:30] for t in xs], [t[30:] for t in xs]
    whole = repkern.StreamingCKA().update(xs).compute()
    a, b = repkern.StreamingCKA().update(first), repkern.StreamingCKA().update(second)
    torch.testing.assert_close(a.merge(b).compute(), whole, rtol=1e-12, atol=1e-13)
    assert a.samples == 60 and a.batches == 2 and b.samples == 30
    packed = repkern.StreamingCKA().update(first)._packed(torch.device("cpu"))
    assert packed[0] == 30  # the held rows were added before packing
    restored = repkern.StreamingCKA()
    restored.load_state_dict(repkern.StreamingCKA().update(first).state_dict())
    torch.testing.assert_close(restored.update(second).compute(), whole, rtol=1e-12, atol=1e-13)
    replaced = repkern.StreamingCKA().update(second)
    replaced.load_state_dict(repkern.StreamingCKA().update(first).state_dict())
    assert replaced.samples == 30  # its own held rows are gone
    dropped = repkern.StreamingCKA().update(first)
    dropped.reset()
    assert dropped.samples == 0 and dropped.batches == 0
    with pytest.raises(ValueError, match="no data yet"):
        dropped.compute()

    mixed = repkern.StreamingCKA().update([t.float() for t in first]).update(second)
    assert mixed.compute().dtype == torch.float64  # the float32 rows were added on their own
    expected = repkern.StreamingCKA(hold_rows=0).update([t.float() for t in first]).update(second)
    _assert_equal_states(mixed, expected)

    acc = repkern.StreamingCKA().update(first)
    with pytest.raises(ValueError, match=r"xs\[1\]: xs\[1\] has width 4, but this accumulator has 3"):
        acc.update([second[0], torch.randn(30, 4, dtype=torch.float64)])
    assert acc.samples == 30


def test_hold_rows_is_checked_and_the_buffer_fits_the_budget():
    with pytest.raises(ValueError, match="hold_rows: expected >= 0, got -1"):
        repkern.StreamingCKA(hold_rows=-1)
    with pytest.raises(TypeError, match="hold_rows: expected an int, got float"):
        repkern.StreamingCKA(hold_rows=8.0)
    layout = ((64, 64), None)
    need = streaming._state_bytes(layout, False)
    row = 128 * 4  # one held float32 row of both layers
    acc = repkern.StreamingCKA(max_state_bytes=need + 10 * row + row // 2)
    assert acc._hold_capacity(layout, torch.float32) == 10
    assert acc._hold_capacity(layout, torch.float64) == 5
    assert repkern.StreamingCKA(hold_rows=3)._hold_capacity(layout, torch.float32) == 3


# ---- MinibatchCKA == the published estimator ------------------------------------------------------


def _unbiased_hsic_numpy(k, l):
    """Song et al. (2012) HSIC₁ written out, numpy float64."""
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    one = np.ones(n)
    value = (kt * lt).sum() + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2)) \
        - 2 / (n - 2) * (kt @ one) @ (lt @ one)
    return value / (n * (n - 3))


def _gram_numpy(x, kernel, sigma):
    if kernel == "linear":
        return x @ x.T
    if kernel == "cosine":
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        return u @ u.T
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.exp(-d / (2 * sigma**2))


@pytest.mark.parametrize("kernel", ("linear", "cosine", "rbf"))
def test_minibatch_equals_published_formula(backend, kernel):
    sizes = [40, 40, 40, 33]
    xs = [t.to(backend.device) for t in _model_layers(153, (5, 9), seed=20, shift=2.0)]
    ys = [t.to(backend.device) for t in _model_layers(153, (4,), seed=30)]
    sigma = 2.5 if kernel == "rbf" else None
    acc = repkern.MinibatchCKA(kernel, sigma=sigma)
    for bx, by in zip(_split(xs, sizes), _split(ys, sizes)):
        acc.update(bx, by)
    got = acc.compute().cpu()
    assert got.shape == (2, 1) and got.dtype == torch.float64
    batches = [([t.cpu().numpy() for t in bx], [t.cpu().numpy() for t in by])
               for bx, by in zip(_split(xs, sizes), _split(ys, sizes))]
    expected = np.zeros((2, 1))
    for i in range(2):
        hxy = sum(_unbiased_hsic_numpy(_gram_numpy(bx[i], kernel, sigma), _gram_numpy(by[0], kernel, sigma))
                  for bx, by in batches)
        hxx = sum(_unbiased_hsic_numpy(_gram_numpy(bx[i], kernel, sigma), _gram_numpy(bx[i], kernel, sigma))
                  for bx, _ in batches)
        hyy = sum(_unbiased_hsic_numpy(_gram_numpy(by[0], kernel, sigma), _gram_numpy(by[0], kernel, sigma))
                  for _, by in batches)
        expected[i, 0] = hxy / math.sqrt(hxx * hyy)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


@pytest.mark.emu_smoke
@pytest.mark.parametrize("kernel", ("linear", "rbf"))
@pytest.mark.parametrize("debiased", (True, False))
def test_minibatch_matches_reference_float32(backend, kernel, debiased):
    """float32 through every path (linear: feature space; rbf: Gram path with a per-batch median)."""
    sizes = [48, 48, 31]
    xs = [t.float().to(backend.device) for t in _model_layers(127, (6, 3), seed=40, shift=5.0)]
    acc = repkern.MinibatchCKA(kernel, debiased=debiased)
    for batch in _split(xs, sizes):
        acc.update(batch)
    got = acc.compute()
    batches = [(list(b), None) for b in _split([t.cpu() for t in xs], sizes)]
    ref_low = reference.minibatch_cka(batches, kernel, debiased=debiased)
    ref64 = reference.minibatch_cka([([t.double() for t in b], None) for b, _ in batches], kernel, debiased=debiased)
    assert got.dtype == torch.float32
    assert_close_to_reference(got.cpu(), ref_low, ref64)
    assert torch.equal(got.diagonal().cpu(), torch.ones(2))


def test_minibatch_of_independent_data_is_near_zero_and_biased_is_inflated():
    """The reason for the unbiased estimator: independent layers, small batches."""
    g = torch.Generator().manual_seed(1)
    unbiased, biased = repkern.MinibatchCKA(), repkern.MinibatchCKA(debiased=False)
    for _ in range(20):
        x, y = torch.randn(16, 32, generator=g, dtype=torch.float64), torch.randn(16, 32, generator=g,
                                                                                 dtype=torch.float64)
        unbiased.update([x], [y])
        biased.update([x], [y])
    assert abs(unbiased.compute().item()) < 0.05
    assert biased.compute().item() > 0.5


# ---- merge, checkpoints ------------------------------------------------------------------------------


def _accumulators():
    return {"streaming": lambda: repkern.StreamingCKA(debiased=True),
            "minibatch": lambda: repkern.MinibatchCKA("rbf")}


@pytest.mark.parametrize("kind", ("streaming", "minibatch"))
def test_merge_in_any_order_equals_one_accumulator(kind):
    make = _accumulators()[kind]
    xs = _model_layers(160, (6, 4), seed=60, shift=9.0)
    ys = _model_layers(160, (5,), seed=70)
    batches = list(zip(_split(xs, [40, 40, 40, 40]), _split(ys, [40, 40, 40, 40])))
    single = make()
    for bx, by in batches:
        single.update(bx, by)
    parts = [make().update(*batches[0]).update(*batches[1]), make().update(*batches[2]), make().update(*batches[3])]
    forward = make().merge(parts[0]).merge(parts[1]).merge(parts[2])
    backward = make().merge(parts[2]).merge(parts[0]).merge(parts[1])
    empty_merge = make().update(*batches[0]).update(*batches[1]).merge(make())
    expected = single.compute()
    for merged in (forward, backward):
        assert merged.samples == 160 and merged.batches == 4
        torch.testing.assert_close(merged.compute(), expected, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(empty_merge.compute(), parts[0].compute(), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ("streaming", "minibatch"))
def test_state_dict_round_trips_exactly_and_continues(kind):
    make = _accumulators()[kind]
    xs = _model_layers(120, (6, 4), seed=80, shift=-3.0)
    batches = _split(xs, [50, 40, 30])
    acc = make().update(batches[0]).update(batches[1])
    buffer = io.BytesIO()
    torch.save(acc.state_dict(), buffer)
    buffer.seek(0)
    restored = make()
    restored.load_state_dict(torch.load(buffer))
    before, after = acc.state_dict(), restored.state_dict()
    assert before.keys() == after.keys() and before["layout"] == after["layout"]
    for key, value in before["stats"].items():
        assert torch.equal(value, after["stats"][key]), key
    assert torch.equal(acc.compute(), restored.compute())
    acc.update(batches[2])
    restored.update(batches[2])
    assert torch.equal(acc.compute(), restored.compute())
    fresh = make()
    for batch in batches:
        fresh.update(batch)
    # StreamingCKA adds its held rows at state_dict: the fresh one added all three batches together
    exact = 0 if kind == "minibatch" else None
    torch.testing.assert_close(restored.compute(), fresh.compute(), rtol=exact, atol=exact)


# ---- degenerate data ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ("streaming", "minibatch"))
def test_constant_layer_is_nan_with_warning_and_varying_constants_are_not_constant(kind):
    make = _accumulators()[kind]
    xs = _model_layers(60, (4, 3, 5), seed=90)
    xs[1] = torch.full_like(xs[1], 2.5)
    acc = make()
    for batch in _split(xs, [30, 30]):
        acc.update(batch)
    with pytest.warns(RuntimeWarning, match=r"xs\[1\]"):
        m = acc.compute()
    assert torch.isnan(m[1]).all() and torch.isnan(m[:, 1]).all()
    assert not torch.isnan(m[[0, 2]][:, [0, 2]]).any()
    if kind == "streaming":  # constant within each batch, different between batches: real variance
        xs[1] = torch.cat([torch.full((30, 3), 1.0), torch.full((30, 3), 2.0)]).double()
        acc = make()
        for batch in _split(xs, [30, 30]):
            acc.update(batch)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            m = acc.compute()
        torch.testing.assert_close(m, reference.cka_matrix(xs, None, "linear", debiased=True), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ("streaming", "minibatch"))
def test_nan_in_a_batch_gives_nan_for_that_layer_without_warning(kind):
    xs = _model_layers(60, (4, 3), seed=95)
    xs[0][37, 2] = math.nan
    acc = _accumulators()[kind]()
    for batch in _split(xs, [30, 30]):
        acc.update(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = acc.compute()
    assert torch.isnan(m[0]).all() and torch.isnan(m[:, 0]).all() and m[1, 1] == 1


# ---- bad input ----------------------------------------------------------------------------------------------


def test_bad_input_names_the_argument():
    x, y = torch.randn(10, 4), torch.randn(10, 3)
    with pytest.raises(ValueError, match="kernel.*MinibatchCKA"):
        repkern.StreamingCKA("rbf")
    with pytest.raises(ValueError, match="kernel"):
        repkern.MinibatchCKA("poly")
    with pytest.raises(TypeError, match="debiased"):
        repkern.MinibatchCKA(debiased=1)
    with pytest.raises(TypeError, match="max_state_bytes"):
        repkern.StreamingCKA(max_state_bytes=1.5)
    with pytest.raises(ValueError, match="sigma"):
        repkern.MinibatchCKA("rbf", sigma=-1.0)
    acc = repkern.StreamingCKA()
    with pytest.raises(ValueError, match="no data"):
        acc.compute()
    with pytest.raises(TypeError, match="xs"):
        acc.update(x)  # a tensor, not a sequence of layers
    with pytest.raises(TypeError, match=r"xs\[0\]"):
        acc.update([x.int()])
    with pytest.raises(ValueError, match=r"ys\[0\]"):
        acc.update([x], [torch.randn(9, 3)])  # different b within one call
    with pytest.raises(TypeError, match=r"ys\[0\]"):
        acc.update([x], [y.double()])
    acc.update([x], [y])
    with pytest.raises(ValueError, match="xs.*2 layers"):
        acc.update([x, x], [y])
    with pytest.raises(ValueError, match=r"ys\[0\].*width 5"):
        acc.update([x], [torch.randn(10, 5)])
    with pytest.raises(ValueError, match="ys=None"):
        acc.update([x])
    on_meta = repkern.StreamingCKA(device="meta")
    with pytest.raises(ValueError, match=r"xs\[0\].*device"):
        on_meta.update([x], [y])
    with pytest.raises(ValueError, match="incompatible"):
        acc.merge(repkern.StreamingCKA(debiased=True))
    with pytest.raises(TypeError, match="other"):
        acc.merge(repkern.MinibatchCKA())
    with pytest.raises(ValueError, match="other"):
        acc.merge(repkern.StreamingCKA().update([x, x], [y]))
    with pytest.raises(TypeError, match="state_dict"):
        acc.load_state_dict({"bogus": 1})
    sd = acc.state_dict()
    sd["stats"]["M/0,0"] = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="M/0,0"):
        repkern.StreamingCKA().load_state_dict(sd)
    tiny = repkern.StreamingCKA(debiased=True).update([x[:3]])
    with pytest.raises(ValueError, match="n >= 4"):
        tiny.compute()
    with pytest.raises(ValueError, match="at least 4 samples"):
        repkern.MinibatchCKA().update([x[:3]])
    with pytest.raises(RuntimeError, match="not initialized"):
        acc.all_reduce()


# ---- torch.distributed ---------------------------------------------------------------------------------------


def _distributed_worker(rank: int, world: int) -> None:
    xs = _model_layers(150, (5, 3), seed=100, shift=12.0)
    ys = _model_layers(150, (4,), seed=110)
    sizes = [40, 40, 40, 30]
    batches = list(zip(_split(xs, sizes), _split(ys, sizes)))
    mine = batches[:1] if rank == 0 else batches[1:]  # unequal shards
    for make in _accumulators().values():
        acc, single = make(), make()
        for bx, by in mine:
            acc.update(bx, by)
        for bx, by in batches:
            single.update(bx, by)
        acc.all_reduce()
        assert acc.samples == 150 and acc.batches == 4
        torch.testing.assert_close(acc.compute(), single.compute(), rtol=1e-12, atol=1e-13)
        # a rank that saw nothing contributes nothing
        lonely = make()
        if rank == 0:
            lonely.update(*batches[0])
        lonely.all_reduce()
        torch.testing.assert_close(lonely.compute(), make().update(*batches[0]).compute(), rtol=0, atol=0)
    odd = repkern.StreamingCKA(debiased=rank == 1)
    with pytest.raises(ValueError, match="incompatible"):
        odd.all_reduce()


def test_all_reduce_over_two_gloo_processes_equals_single_process():
    run_gloo_processes(_distributed_worker)


def _assert_same_state(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, dict):
            _assert_same_state(got[key], value)
        elif isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


def _sync_worker(rank: int, world: int) -> None:
    xs = _model_layers(150, (5, 3), seed=120, shift=7.0)
    ys = _model_layers(150, (4,), seed=130)
    batches = list(zip(_split(xs, [40, 40, 40, 30]), _split(ys, [40, 40, 40, 30])))
    mine = batches[:1] if rank == 0 else batches[1:]
    for make in _accumulators().values():
        acc, single, local = make(), make(), make()
        for bx, by in mine:
            acc.update(bx, by)
            local.update(bx, by)
        for bx, by in batches:
            single.update(bx, by)
        before = acc.state_dict()
        first = acc.compute(sync=True)
        torch.testing.assert_close(first, single.compute(), rtol=1e-12, atol=1e-13)
        # every evaluation sees each rank once: the local state is untouched, a second call agrees
        _assert_same_state(acc.state_dict(), before)
        assert torch.equal(acc.compute(sync=True), first)
        assert torch.equal(acc.compute(), local.compute())
        # a rank with no data (and no device) joins the collective and gets the others' result
        lonely = make()
        if rank == 0:
            lonely.update(*batches[0])
        got = lonely.compute(sync=True)
        torch.testing.assert_close(got, make().update(*batches[0]).compute(), rtol=0, atol=0)
        assert lonely.samples == (40 if rank == 0 else 0)
        assert (lonely.device is None) == (rank == 1)
    alignment = repkern.StreamingAlignment()
    for bx, by in mine:
        alignment.update(bx, by)
    whole = repkern.StreamingAlignment()
    for bx, by in batches:
        whole.update(bx, by)
    for options in ({}, {"alpha": 0.5, "score": "euclidean"}):
        torch.testing.assert_close(alignment.compute("shape_distance", sync=True, **options),
                                   whole.compute("shape_distance", **options), rtol=1e-10, atol=1e-10)
    assert alignment.samples == sum(b[0][0].shape[0] for b in mine)


def test_compute_sync_over_two_gloo_processes_leaves_the_local_state_alone():
    run_gloo_processes(_sync_worker)


def test_compute_sync_of_an_accumulator_without_device_gathers_on_the_groups_device(monkeypatch):
    seen = gather_devices(monkeypatch, streaming)
    for acc in (repkern.StreamingCKA(), repkern.MinibatchCKA(), repkern.StreamingAlignment()):
        with pytest.raises(Gathered):
            acc.compute(sync=True)
        with pytest.raises(Gathered):
            acc.all_reduce()
    assert seen == [torch.device("meta")] * 6
    x = _data((10, 3), 0)
    with pytest.raises(Gathered):
        repkern.StreamingCKA().update([x]).compute(sync=True)
    assert seen[-1] == torch.device("cpu")  # with data: where the data is


def test_group_device_follows_the_backend(monkeypatch):
    import torch.distributed as dist

    from repkern import _distributed

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for backend, device in (("nccl", "cuda:3"), ("cpu:gloo,cuda:nccl", "cuda:3"), ("gloo", "cpu")):
        monkeypatch.setattr(dist, "get_backend", lambda group=None, backend=backend: backend)
        assert _distributed.group_device() == torch.device(device)


@pytest.mark.parametrize("kind", ("streaming", "minibatch"))
def test_reset_forgets_the_data_and_keeps_the_settings(kind):
    make = _accumulators()[kind]
    xs = _model_layers(60, (5, 3), seed=140)
    ys = _model_layers(60, (4,), seed=150)
    acc = make()
    acc.update(xs, ys)
    acc.reset()
    assert acc.samples == 0 and acc.batches == 0 and acc.device is None
    assert acc.state_dict() == make().state_dict()
    with pytest.raises(ValueError, match="no data yet"):
        acc.compute()
    acc.update(xs[:1])  # the layout is forgotten too: another layout is fine
    torch.testing.assert_close(acc.compute(), make().update(xs[:1]).compute(), rtol=0, atol=0)
    assert acc.debiased == make().debiased
    placed = repkern.StreamingCKA(device="meta")
    placed.reset()
    assert placed.device == torch.device("meta")  # the device given at construction is a setting
