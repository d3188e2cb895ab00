"""repkern.StreamingAlignment: every metric from the streamed statistics equals the one-shot function over
all rows (odd batch sizes, a one-row batch, mean-shifted data), merges, checkpoints, torch.distributed,
memory independent of n, degenerate layers and bad options."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch

import repkern
from tests.conftest import run_gloo_processes
from tests.linear_oracles import netrep_linear_metric

SPLITS = ([157], [1, 40, 40, 76], [64, 64, 29], [13, 1, 101, 42])
N = 157


def _data(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _models(n=N, shift=0.0):
    """Layers of two models sharing a signal; uneven widths (padding), scales and offsets."""
    base = _data((n, 4), 0)
    xs = [base @ _data((4, 6), 1) + 0.5 * _data((n, 6), 2) + shift,
          torch.tanh(base @ _data((4, 9), 3)) * torch.linspace(0.1, 3, 9, dtype=torch.float64) + 0.3 * _data((n, 9), 4)]
    ys = [base[:, :3] @ _data((3, 5), 5) + _data((n, 5), 6) - shift, base @ _data((4, 7), 7) + _data((n, 7), 8)]
    return xs, ys


def _split(layers, sizes):
    return list(zip(*[t.split(sizes) for t in layers]))


def _stream(xs, ys, sizes, **kwargs):
    acc = repkern.StreamingAlignment(**kwargs)
    batches = _split(xs, sizes)
    for i, bx in enumerate(batches):
        acc.update(bx, None if ys is None else _split(ys, sizes)[i])
    return acc


CASES = [("shape_distance", {}, lambda x, y: repkern.shape_distance(x, y)),
         ("shape_distance", {"alpha": 0.3, "score": "euclidean"},
          lambda x, y: repkern.shape_distance(x, y, alpha=0.3, score="euclidean")),
         ("shape_distance", {"alpha": 0.05}, lambda x, y: repkern.shape_distance(x, y, alpha=0.05)),
         ("svcca", {}, lambda x, y: repkern.svcca(x, y)),
         ("svcca", {"dims": 3}, lambda x, y: repkern.svcca(x, y, dims=3)),
         ("svcca", {"keep": 0.7}, lambda x, y: repkern.svcca(x, y, keep=0.7)),
         ("pwcca", {}, lambda x, y: repkern.pwcca(x, y))]


def _one_shot(fn, xs, ys):
    cols = xs if ys is None else ys
    return torch.stack([torch.stack([fn(x, y) for y in cols]) for x in xs])


@pytest.mark.parametrize("hold_rows", (None, 0))
@pytest.mark.parametrize("sizes", SPLITS)
@pytest.mark.parametrize("symmetric", (False, True))
def test_every_metric_equals_one_shot(sizes, symmetric, hold_rows):
    """All batches held and added together (default), or each on its own (hold_rows=0)."""
    xs, ys = _models(shift=30.0)
    ys_arg = None if symmetric else ys
    acc = _stream(xs, ys_arg, sizes, hold_rows=hold_rows)
    assert acc.samples == N and acc.batches == len(sizes)
    for metric, options, fn in CASES:
        got = acc.compute(metric, **options)
        expected = _one_shot(fn, xs, ys_arg)
        assert got.dtype == torch.float64 and got.shape == expected.shape
        if symmetric:  # a layer against itself: exactly 0 (distance) or 1 (correlations)
            exact = 0.0 if metric == "shape_distance" else 1.0
            assert torch.equal(got.diagonal(), torch.full((len(xs),), exact, dtype=torch.float64))
            # the one-shot value of a layer against itself: rounding, up to sqrt(ε)·scale
            torch.testing.assert_close(expected.diagonal(), got.diagonal(), rtol=0, atol=1e-5)
            expected = expected.clone()
            expected.diagonal().copy_(got.diagonal())
            if metric != "pwcca":
                assert torch.equal(got, got.T)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9, msg=lambda m: f"{metric} {options}: {m}")
    cca = acc.compute("cca")
    cols = xs if symmetric else ys
    for i, x in enumerate(xs):
        for j, y in enumerate(cols):
            torch.testing.assert_close(cca[i][j], repkern.cca(x, y), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(acc.compute(), repkern.cka_matrix(xs, ys_arg), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(acc.compute("cka"), acc.compute())


def test_shape_distance_from_the_stream_matches_netrep():
    xs, ys = _models(shift=5.0)
    got = _stream(xs, ys, [1, 40, 40, 76]).compute("shape_distance", alpha=0.5)
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            np.testing.assert_allclose(got[i, j].item(), netrep_linear_metric(x.numpy(), y.numpy(), 0.5, "angular"),
                                       rtol=1e-10)


def test_float32_batches_use_float64_products():
    """Ill-conditioned, mean-shifted float32 layers: whitening needs the small eigenvalues, which float32
    batch products (StreamingCKA's) would bury in rounding. CCA of x with an invertible map of x is 1."""
    q, _ = torch.linalg.qr(_data((6, 6), 22))  # small directions mixed into every column
    x = ((_data((300, 6), 20) * torch.logspace(-3, 0, 6, dtype=torch.float64)) @ q + 100.0).float()
    m = (_data((6, 6), 21) + 3 * torch.eye(6, dtype=torch.float64)).float()
    y = x @ m
    acc = repkern.StreamingAlignment()
    for bx, by in zip(x.split(37), y.split(37)):
        acc.update([bx], [by])
    got = acc.compute("cca")[0][0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, repkern.cca(x, y), rtol=2e-6, atol=2e-6)
    assert got.min().item() > 1 - 2e-4  # y: a linear map of x, rounded to float32 (float32 products: 1 − 1e-3)


def test_merge_and_checkpoint():
    xs, ys = _models(shift=-4.0)
    parts = [_stream([t[:50] for t in xs], [t[:50] for t in ys], [1, 49]),
             _stream([t[50:120] for t in xs], [t[50:120] for t in ys], [70]),
             _stream([t[120:] for t in xs], [t[120:] for t in ys], [30, 7])]
    single = _stream(xs, ys, [N])
    forward = repkern.StreamingAlignment().merge(parts[0]).merge(parts[1]).merge(parts[2])
    backward = repkern.StreamingAlignment().merge(parts[2]).merge(parts[0]).merge(parts[1])
    buffer = io.BytesIO()
    torch.save(forward.state_dict(), buffer)
    buffer.seek(0)
    restored = repkern.StreamingAlignment()
    restored.load_state_dict(torch.load(buffer))
    for metric, options, _ in CASES:
        expected = single.compute(metric, **options)
        for acc in (forward, backward):
            torch.testing.assert_close(acc.compute(metric, **options), expected, rtol=1e-10, atol=1e-10)
        assert torch.equal(restored.compute(metric, **options), forward.compute(metric, **options))
    with pytest.raises(TypeError, match="other"):
        forward.merge(repkern.StreamingCKA())
    with pytest.raises(ValueError, match="state_dict"):
        repkern.StreamingCKA().load_state_dict(forward.state_dict())


def test_state_size_is_independent_of_the_number_of_rows():
    small, big = repkern.StreamingAlignment(), repkern.StreamingAlignment()
    for acc, n in ((small, 10), (big, 5000)):
        xs, ys = _models(n)
        for bx, by in zip(_split(xs, [n // 2, n - n // 2]), _split(ys, [n // 2, n - n // 2])):
            acc.update(bx, by)

    def size(acc):
        return sum(v.numel() * v.element_size() for v in acc.state_dict()["stats"].values())

    assert size(small) == size(big)


# ---- degenerate layers, bad options -------------------------------------------------------------------------------


def test_nan_and_constant_layers():
    xs, ys = _models()
    xs[0][77, 2] = math.nan
    ys[1] = torch.full_like(ys[1], 0.25)
    acc = _stream(xs, ys, [60, 97])
    with pytest.warns(RuntimeWarning, match=r"ys\[1\]: zero variance"):
        d = acc.compute("shape_distance")
    assert torch.isnan(d[0]).all() and torch.isnan(d[:, 1]).all() and not torch.isnan(d[1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # euclidean and cca are defined for a constant layer
        e = acc.compute("shape_distance", score="euclidean")
        cca = acc.compute("cca")
    torch.testing.assert_close(e[1, 1], torch.linalg.norm(xs[1] - xs[1].mean(0)))
    assert cca[0][0].shape == (5,) and torch.isnan(cca[0][0]).all() and cca[1][1].shape == (0,)
    with pytest.warns(RuntimeWarning, match=r"ys\[1\]"):
        assert torch.isnan(acc.compute("pwcca")[:, 1]).all()


def test_alpha_zero_names_the_rank_deficient_layer():
    xs, ys = _models()
    acc = _stream([xs[0]], [xs[0][:, :4], ys[0]], [80, 77])
    with pytest.raises(ValueError, match=r"ys\[0\]: .*zero-padded from 4 to 6.*alpha > 0"):
        acc.compute("shape_distance", alpha=0.0)
    acc.compute("shape_distance", alpha=0.01)


def test_bad_options_and_states():
    xs, ys = _models()
    acc = repkern.StreamingAlignment()
    with pytest.raises(ValueError, match="no data"):
        acc.compute("cca")
    acc.update([xs[0][:1]], [ys[0][:1]])
    with pytest.raises(ValueError, match="xs: cca needs n >= 2"):
        acc.compute("cca")
    acc.update([xs[0][1:]], [ys[0][1:]])
    with pytest.raises(ValueError, match="metric"):
        acc.compute("procrustes")
    with pytest.raises(TypeError, match="alpha: not an option of compute\\(metric='cca'\\)"):
        acc.compute("cca", alpha=0.5)
    with pytest.raises(TypeError, match="keep: not an option"):
        acc.compute("cka", keep=0.9)
    with pytest.raises(ValueError, match="alpha"):
        acc.compute("shape_distance", alpha=2.0)
    with pytest.raises(ValueError, match=r"dims: 6 SVD directions requested from ys\[0\], which has only d=5"):
        acc.compute("svcca", dims=6)
    with pytest.raises(ValueError, match="keep"):
        acc.compute("svcca", keep=0)
    with pytest.raises(ValueError, match=r"dims: 7 SVD directions requested from xs\[0\], which has only d=6"):
        repkern.StreamingAlignment().update([xs[0]]).compute("svcca", dims=7)  # a layer against itself too
    with pytest.raises(ValueError, match="max_state_bytes"):
        repkern.StreamingAlignment(max_state_bytes=64).update([xs[0]], [ys[0]])


# ---- torch.distributed ------------------------------------------------------------------------------------------


def _distributed_worker(rank: int, world: int) -> None:
    xs, ys = _models(shift=12.0)
    sizes = [1, 40, 40, 76]
    batches = list(zip(_split(xs, sizes), _split(ys, sizes)))
    mine = batches[:2] if rank == 0 else batches[2:]  # unequal shards, a one-row batch on rank 0
    acc, single = repkern.StreamingAlignment(), repkern.StreamingAlignment()
    for bx, by in mine:
        acc.update(bx, by)
    for bx, by in batches:
        single.update(bx, by)
    acc.all_reduce()
    assert acc.samples == N and acc.batches == 4
    for metric, options, _ in CASES:
        torch.testing.assert_close(acc.compute(metric, **options), single.compute(metric, **options), rtol=1e-10,
                                   atol=1e-10)
    cca, cca_single = acc.compute("cca"), single.compute("cca")
    torch.testing.assert_close(cca[1][0], cca_single[1][0], rtol=1e-10, atol=1e-10)
    odd = repkern.StreamingAlignment() if rank == 0 else repkern.StreamingCKA()
    with pytest.raises(ValueError, match="incompatible"):
        odd.all_reduce()


def test_all_reduce_over_two_gloo_processes_equals_single_process():
    run_gloo_processes(_distributed_worker)
