"""repkern.integrations.torchmetrics: the metrics give what repkern's accumulators give (update,
compute, reset, forward, merge_state, .to), sync across a gloo group at compute without touching the
local state, and a clear ImportError without torchmetrics."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

import repkern
from tests.conftest import run_gloo_processes

MODULE = "repkern.integrations.torchmetrics"


@pytest.fixture
def tm():
    return pytest.importorskip(MODULE)


def _data(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _layers(n, widths, seed):
    base = _data((n, 4), seed)
    return [base @ _data((4, w), seed + 1 + i) + 0.7 * _data((n, w), seed + 20 + i) for i, w in enumerate(widths)]


def _batches(layers, sizes):
    return list(zip(*[t.split(sizes) for t in layers]))


def test_import_without_torchmetrics_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # import torchmetrics now fails
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    with pytest.raises(ImportError, match=r'pip install "repkern\[torchmetrics\]"'):
        importlib.import_module(MODULE)


def test_cka_matches_the_accumulators(tm):
    xs, ys = _layers(90, (5, 3), seed=0), _layers(90, (4, 6), seed=40)
    sizes = [30, 30, 30]
    cases = [(tm.CKA(), repkern.StreamingCKA()),
             (tm.CKA(debiased=True), repkern.StreamingCKA(debiased=True)),
             (tm.CKA("rbf", minibatch=True, sigma=2.0), repkern.MinibatchCKA("rbf", sigma=2.0))]
    for metric, acc in cases:
        for bx, by in zip(_batches(xs, sizes), _batches(ys, sizes)):
            metric.update(bx, by)
            acc.update(bx, by)
        assert torch.equal(metric.compute(), acc.compute())
        assert metric.accumulator.samples == 90
    pair, acc = tm.CKA(), repkern.StreamingCKA()
    pair.update(xs[0], ys[1])  # single tensors: one pair, a 0-dim result for self.log
    acc.update([xs[0]], [ys[1]])
    assert pair.compute().shape == () and torch.equal(pair.compute(), acc.compute()[0, 0])


def test_forward_gives_the_batch_and_accumulates(tm):
    xs = _layers(80, (5, 3), seed=1)
    metric, whole = tm.CKA(), repkern.StreamingCKA()
    for batch in _batches(xs, [40, 40]):
        value = metric(batch)
        torch.testing.assert_close(value, repkern.StreamingCKA().update(batch).compute(), rtol=0, atol=0)
        whole.update(batch)
    assert metric.update_count == 2
    torch.testing.assert_close(metric.compute(), whole.compute(), rtol=1e-12, atol=1e-12)


def test_reset_and_merge_state(tm):
    x, y = _layers(60, (5, 4), seed=2)
    metric = tm.CKA()
    metric.update(x, y)
    metric.reset()
    assert metric.accumulator.samples == 0 and metric.update_count == 0
    metric.update(x[:30], y[:30])
    other = tm.CKA()
    other.update(x[30:], y[30:])
    metric.merge_state(other)
    torch.testing.assert_close(metric.compute(), repkern.StreamingCKA().update([x], [y]).compute()[0, 0],
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="dict of states"):
        metric.merge_state({"x": torch.zeros(1)})


@pytest.mark.parametrize("cls, metric, options", [("ShapeDistance", "shape_distance", {}),
                                                  ("ShapeDistance", "shape_distance", {"alpha": 0.5,
                                                                                       "score": "euclidean"}),
                                                  ("SVCCA", "svcca", {"keep": 0.9}), ("PWCCA", "pwcca", {})])
def test_alignment_metrics_match_streaming_alignment(tm, cls, metric, options):
    xs, ys = _layers(70, (5, 6), seed=3), _layers(70, (4,), seed=60)
    m, acc = getattr(tm, cls)(**options), repkern.StreamingAlignment()
    for bx, by in zip(_batches(xs, [35, 35]), _batches(ys, [35, 35])):
        m.update(bx, by)
        acc.update(bx, by)
    assert torch.equal(m.compute(), acc.compute(metric, **options))


def test_cca_of_a_single_pair_is_its_correlations(tm):
    x, y = _layers(50, (5, 4), seed=4)
    m = tm.CCA()
    m.update(x, y)
    assert torch.equal(m.compute(), repkern.StreamingAlignment().update([x], [y]).compute("cca")[0][0])


def test_sparsity_stats_match_the_accumulator(tm):
    a = torch.relu(_data((50, 8), 5))
    metric, acc = tm.SparsityStats(8, top_p=(0.1, 0.5)), repkern.SparsityAccumulator(8, top_p=(0.1, 0.5))
    for part in a.split([20, 30]):
        metric.update(part)
        acc.update(part)
    got, expected = metric.compute().to_dict(), acc.compute().to_dict()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    summary = tm.SparsityStats(8, top_p=(0.1, 0.5), summary=True)
    batch_value = summary(a)
    assert batch_value.keys() == summary.compute().keys()
    stats = acc.compute()
    assert batch_value["top_p_l1@0.5"] == stats.row_mean["top_p_l1"][1]
    assert batch_value["hoyer"] == stats.row_mean["hoyer"]
    assert batch_value["dead_fraction"] == int(stats.n_dead) / 8


def test_in_a_metric_collection_each_metric_keeps_its_own_accumulator(tm):
    """MetricCollection shares the states of metrics whose registered states agree: these register none."""
    from torchmetrics import MetricCollection

    x, y = _layers(40, (5, 4), seed=8)
    collection = MetricCollection({"cka": tm.CKA(), "shape": tm.ShapeDistance()})
    for bx, by in _batches([x, y], [20, 20]):
        collection.update(bx, by)
    values = collection.compute()
    acc = repkern.StreamingAlignment().update([x], [y])
    torch.testing.assert_close(values["cka"], acc.compute()[0, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(values["shape"], acc.compute("shape_distance")[0, 0], rtol=1e-10, atol=1e-10)


def test_moving_the_metric_moves_the_accumulator(tm):
    x = _data((20, 3), 6)
    metric = tm.CKA()
    metric.update(x)
    same = metric.accumulator
    metric.float()  # no device change: nothing rebuilt
    assert metric.accumulator is same
    metric.to("meta")
    assert metric.accumulator.device == torch.device("meta") and metric.accumulator.samples == 20
    metric.reset()
    assert metric.accumulator.device == torch.device("meta")  # the metric's device, not the first batch's


def test_settings_are_checked_at_construction(tm):
    with pytest.raises(ValueError, match="minibatch=True"):
        tm.CKA("rbf")
    with pytest.raises(ValueError, match="minibatch=True"):
        tm.CKA(sigma=1.0)
    with pytest.raises(ValueError, match="max_state_bytes"):
        tm.CKA(minibatch=True, max_state_bytes=1 << 20)
    with pytest.raises(ValueError, match="alpha"):
        tm.ShapeDistance(alpha=3.0)
    with pytest.raises(ValueError, match="d"):
        tm.SparsityStats(0)


# ---- DDP: two gloo processes ----------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int) -> None:
    tm = importlib.import_module(MODULE)
    xs, ys = _layers(120, (5, 3), seed=7), _layers(120, (4,), seed=80)
    batches = list(zip(_batches(xs, [30, 30, 30, 30]), _batches(ys, [30, 30, 30, 30])))
    mine = batches[:1] if rank == 0 else batches[1:]
    metric, whole = tm.CKA(compute_with_cache=False), repkern.StreamingCKA()  # every compute syncs
    for bx, by in mine:
        metric.update(bx, by)
    for bx, by in batches:
        whole.update(bx, by)
    # compute syncs (as Lightning's epoch-end compute does) through repkern's merge, every time from the
    # local state: two evaluations agree and the accumulator keeps only this rank's rows
    first = metric.compute()
    torch.testing.assert_close(first, whole.compute(), rtol=1e-12, atol=1e-13)
    assert torch.equal(metric.compute(), first)
    assert metric.accumulator.samples == 30 * len(mine)
    # a rank with no data takes part in the sync
    lonely = tm.ShapeDistance()
    if rank == 0:
        lonely.update(*batches[0])
    torch.testing.assert_close(lonely.compute(),
                               repkern.StreamingAlignment().update(*batches[0]).compute("shape_distance"),
                               rtol=0, atol=0)
    # dist_sync_on_step: forward gives the value of every rank's batch
    step = tm.SparsityStats(4, dist_sync_on_step=True, summary=True)
    value = step(ys[0][:60] if rank == 0 else ys[0][60:])
    expected = tm.SparsityStats(4, summary=True)
    expected.update(ys[0])
    for key, v in expected.compute().items():
        torch.testing.assert_close(value[key], v, rtol=1e-12, atol=1e-12)
    assert step.accumulator.compute().rows == 60


def test_ddp_sync_over_two_gloo_processes(tm):
    run_gloo_processes(_ddp_worker)
