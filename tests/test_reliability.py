"""Reliability: each test pins one defect of the reliability issue (all-or-nothing checkpoint loads and
their format version, torch.compile with dynamic shapes, accumulators under inference_mode, edge values of
the arguments, clear exceptions, atomic saves and confined loads) and the crash-isolation helper."""

from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import repkern
from repkern import _validation, reference
from repkern.ops import cka as cka_ops
from repkern.results import CkaResult, load_result
from tests.isolation import WorkerCrash, note_case, run_isolated


def _data(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _layers(seed=0, n=40):
    base = _data(n, 4, seed=seed)
    return [base @ _data(4, 5, seed=seed + 1) + _data(n, 5, seed=seed + 2)], [base[:, :3] + _data(n, 3, seed=seed + 3)]


def _equal_states(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            if not _equal_states(x, y):
                return False
        elif isinstance(x, list) and x and isinstance(x[0], dict):
            if len(x) != len(y) or not all(_equal_states(p, q) for p, q in zip(x, y)):
                return False
        elif isinstance(x, torch.Tensor):
            same = (isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape
                    and bool(((x == y) | (x.isnan() & y.isnan()) if x.is_floating_point() else (x == y)).all()))
            if not same:
                return False
        elif x != y:
            return False
    return True


# ---- 2. checkpoint loads are all or nothing; state dicts carry a format version ----------------------


def _cka_accumulators():
    xs, ys = _layers()
    return [repkern.StreamingCKA().update(xs, ys), repkern.MinibatchCKA().update(xs, ys)]


def _corruptions(sd: dict):
    """(what, corrupted copy) pairs of a CKA accumulator's state dict."""
    key = sorted(sd["stats"])[-1]
    out = []
    for what, change in [
        ("a statistic of the wrong shape", lambda d: d["stats"].__setitem__(key, torch.zeros(1, dtype=torch.float64))),
        ("a statistic of the wrong dtype", lambda d: d["stats"].__setitem__(key, d["stats"][key].float())),
        ("a missing statistic", lambda d: d["stats"].pop(key)),
        ("an extra statistic", lambda d: d["stats"].__setitem__("M/9,9", torch.zeros(1, dtype=torch.float64))),
        ("negative samples", lambda d: d.__setitem__("samples", -3)),
        ("a float count", lambda d: d.__setitem__("batches", 1.5)),
        ("a missing key", lambda d: d.pop("samples")),
        ("an unknown format version", lambda d: d.__setitem__("format_version", 99)),
        ("a bad layout", lambda d: d.__setitem__("layout", {"xs": [0], "ys": None})),
        ("stats that are not a dict", lambda d: d.__setitem__("stats", [1, 2])),
    ]:
        copy = {k: (dict(v) if isinstance(v, dict) else v) for k, v in sd.items()}
        change(copy)
        out.append((what, copy))
    return out


@pytest.mark.parametrize("index", (0, 1), ids=("StreamingCKA", "MinibatchCKA"))
def test_rejected_cka_load_leaves_the_accumulator_unchanged(index):
    """Before: load_state_dict reset the accumulator, then validated (samples 40 -> 0 on a rejected load)."""
    donor = _cka_accumulators()[index]
    for what, bad in _corruptions(donor.state_dict()):
        target = _cka_accumulators()[index]
        before = target.state_dict()
        with pytest.raises((ValueError, TypeError), match="state_dict"):
            target.load_state_dict(bad)
        assert target.samples == 40, what
        assert _equal_states(target.state_dict(), before), what
        torch.testing.assert_close(target.compute(), _cka_accumulators()[index].compute())


def test_over_budget_streaming_load_raises_and_keeps_the_old_state():
    """Before: the budget was checked after the swap, so the over-budget state stayed loaded."""
    xs, ys = _layers()
    big = repkern.StreamingCKA().update(xs, ys).state_dict()
    small = repkern.StreamingCKA(max_state_bytes=300)
    with pytest.raises(ValueError, match="state_dict: StreamingCKA's exact statistics"):
        small.load_state_dict(big)
    assert small.samples == 0 and small.state_dict()["layout"] is None
    fits = repkern.StreamingCKA(max_state_bytes=300).update([xs[0][:, :2]])
    before = fits.state_dict()
    with pytest.raises(ValueError, match="max_state_bytes"):
        fits.load_state_dict(big)
    assert _equal_states(fits.state_dict(), before)


def test_rejected_sparsity_load_leaves_the_accumulator_unchanged():
    """Before: feature state and rows were overwritten before the row summaries were checked (rows 60 -> 30,
    old summaries with a new feature state)."""
    a = _data(60, 5, seed=1).relu()
    target = repkern.SparsityAccumulator(5).update(a)
    donor = repkern.SparsityAccumulator(5).update(a[:30]).state_dict()
    before = target.state_dict()
    expected = target.compute()
    corruptions = {
        "row summary of the wrong shape": {"row_histogram/hoyer": torch.zeros(3, dtype=torch.int64)},
        "row summary of the wrong dtype": {"row_sum/l1": torch.zeros((), dtype=torch.float32)},
        "negative rows": {"rows": -1},
        "rows not an int": {"rows": 30.0},
        "an unknown stat_dtype": {"stat_dtype": "int8"},
        "a stat_dtype that is a torch function": {"stat_dtype": "zeros"},
        "an unknown format version": {"format_version": "2"},
        "a feature state of the wrong shape": {"feature_state": torch.zeros(10, 4, dtype=torch.float64)},
    }
    for what, change in corruptions.items():
        bad = dict(donor, **change)
        with pytest.raises((ValueError, TypeError), match="state_dict"):
            target.load_state_dict(bad)
        assert target.compute().rows == 60, what
        assert _equal_states(target.state_dict(), before), what
    missing = dict(donor)
    del missing["row_sum/l1"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['row_sum/l1'\]"):
        target.load_state_dict(missing)
    assert target.compute().rows == expected.rows == 60
    torch.testing.assert_close(target.compute().mean, expected.mean)


def test_sparsity_kept_rows_are_checked_before_a_load():
    acc = repkern.SparsityAccumulator(4, keep_rows=True).update(_data(6, 4).relu()).update(_data(3, 4, seed=2))
    sd = acc.state_dict()
    restored = repkern.SparsityAccumulator(4, keep_rows=True)
    restored.load_state_dict(sd)
    assert _equal_states(restored.state_dict(), sd)
    for bad_rows in ([], [sd["kept_rows"][0]], "rows", [{"l0": torch.zeros(9)}]):
        target = repkern.SparsityAccumulator(4, keep_rows=True).update(_data(2, 4, seed=5))
        before = target.state_dict()
        with pytest.raises((ValueError, TypeError), match="kept_rows"):
            target.load_state_dict(dict(sd, kept_rows=bad_rows))
        assert _equal_states(target.state_dict(), before)


def test_state_dicts_carry_a_format_version():
    xs, ys = _layers()
    accs = [*_cka_accumulators(), repkern.SparsityAccumulator(5).update(xs[0])]
    for acc in accs:
        sd = acc.state_dict()
        assert sd["format_version"] == _validation.STATE_FORMAT_VERSION == 1
        fresh = type(acc)() if not isinstance(acc, repkern.SparsityAccumulator) else repkern.SparsityAccumulator(5)
        fresh.load_state_dict(sd)  # the current version is read
        legacy = dict(sd)
        del legacy["format_version"]  # written before the version was recorded: same layout, version 1
        fresh.load_state_dict(legacy)
        for version in (2, 0, "1", None, True):
            with pytest.raises(ValueError, match=f"format_version {version!r} is not supported"):
                fresh.load_state_dict(dict(sd, format_version=version))


# ---- 5. every public op under torch.compile(dynamic=True, fullgraph=True) ----------------------------

_W = _data(6, 10, seed=3)
_B, _WD, _BD = _data(10, seed=4), _data(10, 6, seed=5), _data(6, seed=6)
_THETA = _data(10, seed=7).abs()
_MIX = _data(3, 6, seed=8)


def _dense(codes):
    return codes if isinstance(codes, torch.Tensor) else codes.to_dense()


def _sparsity_fields(s):
    fields = [s.l0, s.l1, s.l2, s.hoyer, s.count, s.fire_count, s.mean, s.var, s.min, s.max, s.n_dead,
              s.density_histogram, s.nan_total]
    if s.gini is not None:
        fields += [s.gini, s.thresholded_l0, s.top_p_l1, s.effective_rank_l2]
    return fields


def _cka_test_fields(r):
    return [r.cka, r.p_value, r.ci_low, r.ci_high, r.null, r.bootstrap]


def _sae(activation, output, **kw):
    return lambda x, y: _dense(repkern.sae_encode(x, _W, _B, b_dec=_BD, activation=activation, output=output, **kw))


COMPILE_CASES = {
    "gram linear": lambda x, y: repkern.gram(x, "linear"),
    "gram cosine center": lambda x, y: repkern.gram(x, "cosine", center=True),
    "gram rbf median": lambda x, y: repkern.gram(x, "rbf", threshold=0.7, median="offdiag"),
    "gram rbf sigma": lambda x, y: repkern.gram(x, "rbf", sigma=1.3),
    "gram batched": lambda x, y: repkern.gram(torch.stack([x, 2 * x]), "linear", center=True),
    "hsic linear": lambda x, y: repkern.hsic(x, y),
    "hsic rbf debiased": lambda x, y: repkern.hsic(x, y, "rbf", debiased=True),
    "cka feature": lambda x, y: repkern.cka(x, y, method="feature"),
    "cka gram debiased": lambda x, y: repkern.cka(x, y, debiased=True, method="gram"),
    "cka tiled rbf": lambda x, y: repkern.cka(x, y, "rbf", method="tiled"),
    "cka cosine batched": lambda x, y: repkern.cka(torch.stack([x, x + 1]), torch.stack([y, -y]), "cosine"),
    "cka_from_grams": lambda x, y: repkern.cka_from_grams(x @ x.T, y @ y.T, debiased=True),
    "cka_matrix": lambda x, y: repkern.cka_matrix([x, y, x[:, :2]], [y, x]),
    "cka_matrix symmetric rbf": lambda x, y: repkern.cka_matrix([x, y], None, "rbf"),
    "sae relu dense": _sae("relu", "dense"),
    "sae relu sparse": _sae("relu", "sparse"),
    "sae topk dense": _sae("topk", "dense", k=3),
    "sae topk sparse relu_first": _sae("topk", "sparse", k=3, relu_first=True),
    "sae jumprelu dense": _sae("jumprelu", "dense", threshold=_THETA),
    "sae jumprelu sparse": _sae("jumprelu", "sparse", threshold=0.2),
    "sae batchtopk dense": _sae("batchtopk", "dense", k=2.5),
    "sae batchtopk sparse": _sae("batchtopk", "sparse", k=2.5),
    "sae batchtopk threshold": _sae("batchtopk", "sparse", threshold=0.3),
    "sae firings": lambda x, y: repkern.sae_encode(x, _W, _B, activation="topk", k=2, output="sparse",
                                                   count_firings=True)[1],
    "sae_decode dense": lambda x, y: repkern.sae_decode(torch.relu(x @ _W), _WD, _BD),
    "sae_decode SparseCodes": lambda x, y: repkern.sae_decode(
        repkern.sae_encode(x, _W, _B, activation="topk", k=4, output="sparse"), _WD, _BD),
    "sae_decode CsrCodes": lambda x, y: repkern.sae_decode(repkern.sae_encode(x, _W, _B, output="sparse"), _WD),
    "sparsity_stats": lambda x, y: _sparsity_fields(repkern.sparsity_stats(torch.relu(x), top_p=(0.2, 0.5))),
    "sparsity_stats unordered 3-d": lambda x, y: _sparsity_fields(
        repkern.sparsity_stats(x.reshape(1, -1, x.shape[-1]), ordered=False, eps=0.1)),
    "cka_test": lambda x, y: _cka_test_fields(repkern.cka_test(x, y, n_permutations=7, n_bootstrap=5, seed=3)),
    "knn cosine": lambda x, y: tuple(repkern.knn(x, 3)),
    "knn ip": lambda x, y: tuple(repkern.knn(x, 2, metric="ip")),
    "knn euclidean": lambda x, y: tuple(repkern.knn(y, 4, metric="euclidean")),
    "mutual_knn": lambda x, y: repkern.mutual_knn(x, y, 3),
    "cycle_knn euclidean": lambda x, y: repkern.cycle_knn(x, y, 2, metric="euclidean"),
    "cknna": lambda x, y: repkern.cknna(x, y, 3),
    "shape_distance": lambda x, y: repkern.shape_distance(x, y),
    "shape_distance euclidean alpha": lambda x, y: repkern.shape_distance(x, y, alpha=0.5, score="euclidean"),
    "shape_distance full whitening": lambda x, y: repkern.shape_distance(x[:, :4], y, alpha=0.0),
    "cca": lambda x, y: repkern.cca(x, y),
    # rank 3 < min(d1, d2) = 4: three correlations, a length known only from the data
    "cca rank-deficient": lambda x, y: repkern.cca(x[:, :3] @ _MIX, y),
    "svcca keep": lambda x, y: repkern.svcca(x, y, keep=0.9),
    "svcca dims": lambda x, y: repkern.svcca(x, y, dims=(3, 2)),
    "pwcca": lambda x, y: repkern.pwcca(x, y),
    "rdm correlation": lambda x, y: repkern.rdm(x),
    "rdm euclidean": lambda x, y: repkern.rdm(y, "euclidean"),
    "rsa": lambda x, y: repkern.rsa(x, y),
    "rsa euclidean pearson": lambda x, y: repkern.rsa(x, y, rdm="euclidean", compare="pearson"),
}


@pytest.mark.parametrize("name", list(COMPILE_CASES))
def test_every_op_compiles_fullgraph_with_dynamic_shapes(name):
    """Before: every op failed at the argument checks (math.isfinite on a symbolic float); cka_test also
    on its CPU generator and data-dependent branches; shape_distance, cca, svcca, pwcca and rsa on their
    branches on tensor values (NaN input, constant input, ranks, kept directions) and on math.isnan of
    alpha and keep. Three sample counts through one compiled function."""
    fn = COMPILE_CASES[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", dynamic=True, fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for n in (9, 13, 20):
            x, y = _data(n, 6, seed=n), _data(n, 4, seed=n + 1)
            torch.testing.assert_close(compiled(x, y), fn(x, y), equal_nan=True)


def test_compile_eager_backend_and_a_symbolic_float_argument():
    """dynamic=True makes float arguments symbolic: the checks of sigma, threshold, eps take them."""
    def fn(x, y, sigma, eps):
        return repkern.cka(x, y, "rbf", sigma=sigma), repkern.sparsity_stats(x.abs(), eps=eps).l0

    compiled = torch.compile(fn, backend="eager", dynamic=True, fullgraph=True)
    for n, sigma, eps in ((8, 1.5, 0.1), (11, 2.5, 0.3)):
        x, y = _data(n, 5, seed=n), _data(n, 3, seed=n + 1)
        torch.testing.assert_close(compiled(x, y, sigma, eps), fn(x, y, sigma, eps))


# ---- 6. accumulators first fed under torch.inference_mode() -----------------------------------------


def _fed_in_inference_mode(make, feed):
    with torch.inference_mode():
        acc = make()
        feed(acc)
    return acc


@pytest.mark.parametrize("kind", ("StreamingCKA", "MinibatchCKA"))
def test_cka_accumulator_from_inference_mode_updates_and_merges_outside(kind):
    """Before: the first update's statistics were inference tensors; the next in-place add outside
    inference mode raised RuntimeError."""
    cls = getattr(repkern, kind)
    xs, ys = _layers()
    xs2, ys2 = _layers(seed=10)
    acc = _fed_in_inference_mode(cls, lambda a: a.update(xs, ys))
    acc.update(xs2, ys2)  # outside
    expected = cls().update(xs, ys).update(xs2, ys2)
    torch.testing.assert_close(acc.compute(), expected.compute())
    other = _fed_in_inference_mode(cls, lambda a: a.update(xs2, ys2))
    plain = cls().update(xs, ys).merge(other)
    torch.testing.assert_close(plain.compute(), expected.compute())
    inferred = _fed_in_inference_mode(cls, lambda a: a.update(xs, ys))
    inferred.merge(cls().update(xs2, ys2))
    torch.testing.assert_close(inferred.compute(), expected.compute())
    restored = cls()
    restored.load_state_dict(_fed_in_inference_mode(cls, lambda a: a.update(xs, ys)).state_dict())
    restored.update(xs2, ys2)
    torch.testing.assert_close(restored.compute(), expected.compute())
    with torch.inference_mode():  # and back inside
        acc.update(xs, ys)
    assert acc.samples == 120


def test_sparsity_accumulator_from_inference_mode_updates_and_merges_outside():
    a, b = _data(30, 6, seed=1).relu(), _data(20, 6, seed=2).relu()
    expected = repkern.SparsityAccumulator(6, keep_rows=True).update(a).update(b).compute()
    created = _fed_in_inference_mode(lambda: repkern.SparsityAccumulator(6, keep_rows=True), lambda acc: None)
    fed = _fed_in_inference_mode(lambda: repkern.SparsityAccumulator(6, keep_rows=True), lambda acc: acc.update(a))
    for acc in (created.update(a), fed):
        acc.update(b)
        got = acc.compute()
        torch.testing.assert_close(got.mean, expected.mean)
        torch.testing.assert_close(got.hoyer, expected.hoyer, equal_nan=True)
    merged = repkern.SparsityAccumulator(6, keep_rows=True).update(a).merge(
        _fed_in_inference_mode(lambda: repkern.SparsityAccumulator(6, keep_rows=True), lambda acc: acc.update(b)))
    torch.testing.assert_close(merged.compute().var, expected.var)


# ---- 7. edge values: defined ----------------------------------------------------------------------


def test_one_dimensional_input_is_one_row():
    """Before: sparsity_stats(torch.rand(7)) raised TypeError in a reshape."""
    a = _data(7).abs()
    one = repkern.sparsity_stats(a)
    as_row = repkern.sparsity_stats(a[None])
    assert one.rows == 1 and one.l1.shape == () and one.top_p_l1.shape == (3,)
    for field in ("l0", "l1", "hoyer", "gini", "top_p_l1", "effective_rank_l1"):
        torch.testing.assert_close(getattr(one, field), getattr(as_row, field)[0])
    torch.testing.assert_close(reference.sparsity_stats(a).l1, one.l1)
    acc = repkern.SparsityAccumulator(7).update(a)
    torch.testing.assert_close(acc.compute().mean, one.mean)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("sigma", (1e-20, 1e-30, 1e-200, 1e200, 1e300))
def test_extreme_sigma_gives_the_limits(backend, dtype, sigma):
    """Before: σ = 1e-20 -> RuntimeError (float32 overflow), 1e-200 -> ZeroDivisionError, 1e200 ->
    OverflowError. Now σ² underflowing (or −1/(2σ²) overflowing the dtype) is the σ → 0 limit (1 where
    two rows coincide, else 0) and σ² overflowing is σ → ∞ (all ones), as in the reference."""
    x = _data(7, 3, seed=2, dtype=dtype).to(backend.device)
    x[4] = x[1]
    k = repkern.gram(x, "rbf", sigma=sigma)
    ref = reference.gram(x.cpu(), "rbf", sigma=sigma)
    if sigma < 1:
        expected = (reference.squared_distances(x.cpu().double()) == 0).to(dtype)
        assert bool(k[1, 4] == 1) and bool(k[0, 1] == 0)
    else:
        expected = torch.ones(7, 7, dtype=dtype)
    torch.testing.assert_close(k.cpu(), expected)
    torch.testing.assert_close(ref, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # σ → ∞: constant Grams, CKA NaN with a warning
        got = repkern.cka(x, 2 * x[:, :2], "rbf", sigma=sigma)
        want = reference.cka(x.cpu(), 2 * x[:, :2].cpu(), "rbf", sigma=sigma)
        assert torch.equal(torch.isnan(got.cpu()), torch.isnan(want))
        m = repkern.MinibatchCKA("rbf", sigma=sigma).update([x], [2 * x[:, :2]])
        assert m.compute().shape == (1, 1)


def test_huge_threshold_is_a_clear_error():
    """Before: threshold = 1e200 -> OverflowError in threshold**2. Now a ValueError naming threshold;
    the largest accepted threshold works, and a tiny one gives the σ → 0 limit."""
    x = _data(6, 3)
    big = _validation.MAX_THRESHOLD
    for call in (lambda t: repkern.gram(x, "rbf", threshold=t), lambda t: repkern.cka(x, x, "rbf", threshold=t),
                 lambda t: reference.gram(x, "rbf", threshold=t), lambda t: repkern.MinibatchCKA("rbf", threshold=t),
                 lambda t: repkern.cka_matrix([x], None, "rbf", threshold=t),
                 lambda t: repkern.cka_test(x, x, "rbf", threshold=t, n_permutations=2, n_bootstrap=2)):
        with pytest.raises(ValueError, match="threshold: .* too large"):
            call(1e200)
        with pytest.raises(ValueError, match="threshold"):
            call(big)
    assert torch.equal(repkern.gram(x, "rbf", threshold=big / 2), torch.ones(6, 6))
    torch.testing.assert_close(repkern.gram(x, "rbf", threshold=1e-200), torch.eye(6))


@pytest.mark.parametrize("budget", (1, 23, 24, 95, 96, 215))
def test_median_sample_too_small_is_an_error(budget):
    """Before: budgets of 24-95 bytes -> IndexError in the sampled median, <= 23 a 'sampled' median of 0 rows,
    96-215 a median of 2-3 rows (CKA 0.78 where the exact value is 0.50). A budget that allows neither the
    exact median nor MEDIAN_MIN_SAMPLE_ROWS sampled rows is now a ValueError naming max_gram_bytes."""
    x, y = _data(8, 5, seed=1), _data(8, 3, seed=2)
    with pytest.raises(ValueError, match="max_gram_bytes: .* too small for the RBF median"):
        repkern.cka(x, y, "rbf", max_gram_bytes=budget)
    with pytest.raises(ValueError, match="max_gram_bytes"):
        repkern.cka_plan(x, y, "rbf", max_gram_bytes=budget)
    # an explicit sigma needs no median: any budget works (tiled)
    torch.testing.assert_close(repkern.cka(x, y, "rbf", sigma=2.0, max_gram_bytes=budget),
                               reference.cka(x, y, "rbf", sigma=2.0))


def test_smallest_meaningful_median_sample_is_used():
    n = 300
    x = _data(n, 4)
    rows = cka_ops.MEDIAN_MIN_SAMPLE_ROWS
    budget = 2 * cka_ops.MEDIAN_WORKING_COPIES * 4 * rows * rows
    plan = repkern.cka_plan(x, x, "rbf", max_gram_bytes=budget)
    assert plan.median == "sampled" and plan.median_sample_rows == rows
    with pytest.raises(ValueError, match=f"at least {budget} .*allows {rows - 1}"):
        repkern.cka_plan(x, x, "rbf", max_gram_bytes=budget - 1)


# ---- 8. unclear exceptions -> ValueError / TypeError naming the argument ------------------------------


def test_sparse_codes_without_a_code_dim_are_value_errors():
    """Before: IndexError (tuple index out of range)."""
    W = _data(6, 4)
    zero_d = repkern.SparseCodes(torch.tensor(1.0), torch.tensor(0), 6)
    no_shape = repkern.CsrCodes(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([1.0]), ())
    for codes, field in ((zero_d, "codes.values"), (no_shape, "codes.shape")):
        with pytest.raises(ValueError, match=field):
            repkern.sae_decode(codes, W)
        with pytest.raises(ValueError, match=field):
            codes.to_dense()
    with pytest.raises(ValueError, match="codes.d_sae"):
        repkern.SparseCodes(torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int64), 0).to_dense()
    with pytest.raises(ValueError, match="codes.col_indices"):
        repkern.sae_decode(repkern.CsrCodes(torch.tensor([0, 1]), torch.tensor([[0]]), torch.tensor([1.0]), (1, 6)), W)


def test_workflows_with_no_layers_are_value_errors():
    """Before: compare_models(..., layers=[]) -> IndexError."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    batches = [torch.randn(5, 4)]
    with pytest.raises(ValueError, match="layers_a: no layers"):
        repkern.compare_models(model, None, batches, [], progress=False)
    with pytest.raises(ValueError, match="layers_b: no layers"):
        repkern.compare_models(model, nn.Sequential(nn.Linear(4, 4)), batches, "0", [], progress=False)
    with pytest.raises(ValueError, match="layers: no layers"):
        repkern.profile_sparsity(model, batches, [], progress=False)


def test_sae_weights_must_be_floating_tensors():
    """Before: integer weights -> RuntimeError (requires_grad), None / numpy -> AttributeError."""
    good = dict(W_enc=torch.ones(4, 6), b_enc=torch.ones(6), W_dec=torch.ones(6, 4), b_dec=torch.ones(4))
    for name in good:
        for bad, exc in ((good[name].long(), TypeError), (None, TypeError), (good[name].numpy(), TypeError),
                         (torch.ones(()), ValueError)):
            with pytest.raises(exc, match=name):
                repkern.SAE(**dict(good, **{name: bad}))
    with pytest.raises(TypeError, match="threshold"):
        repkern.SAE(**good, activation="jumprelu", threshold="0.5")


def _saelens(path, cfg, **extra):
    W_enc, W_dec = _data(4, 6, seed=1), _data(6, 4, seed=2)
    save_file(dict(W_enc=W_enc, b_enc=_data(6, seed=3), W_dec=W_dec, b_dec=_data(4, seed=4), **extra),
              str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("cfg, extra, exc, message", [
    ({"architecture": "batchtopk"}, {}, ValueError, "'batchtopk' needs a threshold tensor .* or k"),
    ({"architecture": "batchtopk", "k": None}, {}, ValueError, "'batchtopk' needs"),
    ({"architecture": "batchtopk", "k": "8"}, {}, TypeError, "k must be a number"),
    ({"architecture": "batchtopk"}, {"threshold": torch.empty(0)}, ValueError, "threshold must hold one value"),
    ({"architecture": "batchtopk"}, {"threshold": torch.ones(3)}, ValueError, "threshold must hold one value"),
    ({"architecture": "topk", "k": 3.9}, {}, ValueError, "k must be an integer, got 3.9"),
    ({"architecture": "topk", "k": True}, {}, TypeError, "k must be an integer, got bool"),
    ({"architecture": "topk", "k": "3"}, {}, TypeError, "k must be an integer"),
    ([1, 2], {}, ValueError, "cfg.json: expected a JSON object, got a JSON list"),
    ({"architecture": "standard", "apply_b_dec_to_input": "false"}, {}, ValueError, "apply_b_dec_to_input"),
    ({"architecture": "standard", "normalize_activations": ["none"]}, {}, ValueError, "normalize_activations"),
])
def test_saelens_config_errors_are_clear(tmp_path, cfg, extra, exc, message):
    """Before: float(None) TypeError, k silently truncated (3.9 -> 3, true -> 1), IndexError on an empty
    threshold, AttributeError on a list."""
    with pytest.raises(exc, match=message):
        repkern.SAE.load(_saelens(tmp_path, cfg, **extra))


def test_saelens_integral_float_k_and_one_value_threshold_load(tmp_path):
    sae = repkern.SAE.load(_saelens(tmp_path, {"architecture": "topk", "k": 3.0}))
    assert sae.k == 3 and isinstance(sae.k, int)
    (tmp_path / "b").mkdir()
    sae = repkern.SAE.load(_saelens(tmp_path / "b", {"architecture": "batchtopk"}, threshold=torch.tensor([0.25])))
    assert sae.activation == "batchtopk" and sae.threshold.shape == ()


def test_a_folder_with_two_checkpoint_formats_names_both(tmp_path):
    """Before: format='auto' silently picked the first match."""
    _saelens(tmp_path, {"architecture": "standard"})
    save_file({"encoder.weight": _data(6, 4), "encoder.bias": _data(6), "W_dec": _data(6, 4), "b_dec": _data(4)},
              str(tmp_path / "sae.safetensors"))
    np.savez(tmp_path / "params.npz", W_enc=np.ones((4, 6), np.float32))
    with pytest.raises(ValueError, match=r"several formats: saelens .*, sparsify .*, gemmascope .*format="):
        repkern.SAE.load(tmp_path)
    assert repkern.SAE.load(tmp_path, format="saelens").activation == "relu"


def test_cka_test_seed_range():
    """Before: seed=2**64 -> an overflow message that does not name seed."""
    x, y = _data(10, 3), _data(10, 2, seed=1)
    with pytest.raises(ValueError, match=r"seed: expected an int in \[0, 2\*\*64 - 1\]"):
        repkern.cka_test(x, y, seed=2**64, n_permutations=2, n_bootstrap=2)
    top = repkern.cka_test(x, y, seed=2**64 - 1, n_permutations=4, n_bootstrap=3)
    ref = reference.cka_test(x, y, seed=2**64 - 1, n_permutations=4, n_bootstrap=3)
    torch.testing.assert_close(top.null, ref.null.float(), rtol=1e-4, atol=1e-5)


def test_bench_csv_to_an_unwritable_path_is_a_clear_error(tmp_path, capsys):
    """Already handled (exit status 2, a one-line message, nothing run); kept as a regression test."""
    from repkern.__main__ import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    target = blocker / "out.csv"  # a folder that is a file
    assert main(["bench", "--op", "gram", "--quick", "--device", "cpu", "--csv", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"repkern bench: cannot write results to {target}") and "Traceback" not in err


# ---- 8/9. saved results: atomic writes, confined and checked loads -------------------------------------


def _cka_result(samples=10):
    return CkaResult(torch.rand(2, 3), ["a", "b"], ["x", "y", "z"], "linear", False, "exact", "mean", samples, 2)


def test_failing_save_leaves_no_partial_files(tmp_path):
    """Before: a failing JSON encode left a .pt and a truncated .json."""
    bad = _cka_result(samples=math.nan)  # not JSON (allow_nan=False)
    with pytest.raises(ValueError, match="JSON"):
        bad.save(tmp_path / "r")
    assert os.listdir(tmp_path) == []
    good = _cka_result()
    path = good.save(tmp_path / "r")
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    with pytest.raises(ValueError):
        bad.save(tmp_path / "r")
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    torch.testing.assert_close(load_result(path).matrix, good.matrix)


def test_every_save_in_the_package_is_atomic(tmp_path, monkeypatch):
    """A writer that fails half-way leaves the earlier file intact and no temporary file behind."""
    from repkern import _files, plots
    from repkern.bench import write_csv, write_json

    target = tmp_path / "out.csv"
    target.write_text("earlier\n")

    class Boom(Exception):
        pass

    def failing_write(self, *args, **kwargs):
        raise Boom

    monkeypatch.setattr("csv.DictWriter.writerows", failing_write)
    with pytest.raises(Boom):
        write_csv([{"op": "x"}], str(target))
    monkeypatch.undo()
    assert target.read_text() == "earlier\n" and sorted(os.listdir(tmp_path)) == ["out.csv"]
    with pytest.raises(TypeError):
        write_json([{"op": object()}], {}, str(target))  # not JSON: fails before writing
    assert target.read_text() == "earlier\n" and sorted(os.listdir(tmp_path)) == ["out.csv"]
    with pytest.raises(Boom):
        with _files.atomic_write(target) as f:
            f.write("partial")
            raise Boom
    assert target.read_text() == "earlier\n" and sorted(os.listdir(tmp_path)) == ["out.csv"]
    png = tmp_path / "m.png"
    plots.cka_heatmap(torch.rand(2, 2), ["a", "b"], ["c", "d"], str(png), title="t", xlabel="x", ylabel="y")
    assert png.read_bytes()[:4] == b"\x89PNG" and oct(png.stat().st_mode & 0o777) != "0o600"


@pytest.mark.parametrize("name", ("../r.pt", "/etc/passwd", "sub/r.pt", "..", ".", "", 5, None))
def test_load_result_reads_only_its_own_folder(tmp_path, name):
    """Before: load_result followed any path written in the JSON, '../' and absolute included."""
    (tmp_path / "inner").mkdir()
    (tmp_path / "inner" / "sub").mkdir()
    path = _cka_result().save(tmp_path / "inner" / "r")
    torch.save({"matrix": torch.zeros(2, 3)}, tmp_path / "r.pt")  # a plausible file outside the folder
    torch.save({"matrix": torch.zeros(2, 3)}, tmp_path / "inner" / "sub" / "r.pt")
    meta = json.loads(open(path).read())
    meta["tensors"] = name
    open(path, "w").write(json.dumps(meta))
    with pytest.raises(ValueError, match="'tensors' must name a file in the result's own folder"):
        load_result(path)


def test_load_result_checks_fields_and_shapes(tmp_path):
    """Before: a missing key -> KeyError; a matrix of the wrong shape was accepted."""
    path = _cka_result().save(tmp_path / "r")
    meta = json.loads(open(path).read())
    for key in ("kernel", "layers_a", "samples", "debiased"):
        broken = dict(meta)
        del broken[key]
        open(path, "w").write(json.dumps(broken))
        with pytest.raises(ValueError, match=f"missing field '{key}'"):
            load_result(path)
    for key, value, message in (("layers_a", ["a"], r"tensor 'matrix' has shape \(2, 3\), expected \(1, 3\)"),
                                ("samples", -1, "'samples' must be an int >= 0"),
                                ("debiased", "no", "'debiased' must be true or false"),
                                ("layers_b", "xyz", "'layers_b' must be a list of layer names")):
        open(path, "w").write(json.dumps(dict(meta, **{key: value})))
        with pytest.raises(ValueError, match=message):
            load_result(path)
    open(path, "w").write(json.dumps(meta))
    torch.save({"matrix": torch.zeros(3, 3)}, tmp_path / "r.pt")
    with pytest.raises(ValueError, match="expected \\(2, 3\\)"):
        load_result(path)
    (tmp_path / "r.pt").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable tensor file"):
        load_result(path)


def test_sparsity_profile_round_trip_and_missing_tensor(tmp_path):
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU())
    profile = repkern.profile_sparsity(model, [torch.randn(6, 4), torch.randn(3, 4)], ["0", "1"], progress=False)
    path = profile.save(tmp_path / "p")
    again = load_result(path)
    assert again.summary() == profile.summary()
    tensors = torch.load(tmp_path / "p.pt")
    del tensors["1/count"]
    torch.save(tensors, tmp_path / "p.pt")
    with pytest.raises(ValueError, match="no tensor '1/count'"):
        load_result(path)


# ---- crash isolation -------------------------------------------------------------------------------


def _crash_on(cases, bad):
    for case in cases:
        note_case(f"case {case}")
        if case == bad:
            import ctypes

            ctypes.string_at(0)  # a segfault, as a native bug would cause
    return len(cases)


def _raise_value_error(message):
    raise ValueError(message)


def _backend_setting():
    return os.environ.get("REPKERN_BACKEND"), os.environ.get("REPKERN_EMU_SCHEDULE")


def test_isolation_reports_the_crashing_case_and_recovers(monkeypatch):
    assert run_isolated(_crash_on, [1, 2, 3], None) == 3
    with pytest.raises(WorkerCrash, match=r"_crash_on: the isolated worker process killed by SIGSEGV in case: case 2"):
        run_isolated(_crash_on, [1, 2, 3], 2)
    assert run_isolated(_crash_on, [4], None) == 1  # a fresh worker
    with pytest.raises(ValueError, match="from the worker"):
        run_isolated(_raise_value_error, "from the worker")
    monkeypatch.setenv("REPKERN_BACKEND", "emu")
    monkeypatch.setenv("REPKERN_EMU_SCHEDULE", "reverse")
    assert run_isolated(_backend_setting) == ("emu", "reverse")
    monkeypatch.delenv("REPKERN_BACKEND")
    monkeypatch.delenv("REPKERN_EMU_SCHEDULE")
    assert run_isolated(_backend_setting) == (None, None)


# ---- found by the property and fuzz tests ----------------------------------------------------------


def test_empty_top_p_gives_empty_top_p_fields():
    """Found by test_properties: top_p=() crashed the reference (torch.stack of no histograms) and gave None
    top-p fields on the fast path. Now, as documented (last dim len(top_p)), (..., 0) fields and empty
    summaries everywhere."""
    a = _data(4, 7).abs()
    for got in (repkern.sparsity_stats(a, top_p=()), reference.sparsity_stats(a, top_p=()),
                repkern.SparsityAccumulator(7, top_p=(), keep_rows=True).update(a).compute()):
        assert got.top_p_l1.shape == got.top_p_l2.shape == (4, 0)
        assert got.row_histogram["top_p_l1"].shape == (0, 20) and got.row_mean["top_p_l2"].shape == (0,)
    acc = repkern.SparsityAccumulator(7, top_p=[]).update(a)
    restored = repkern.SparsityAccumulator(7, top_p=[])
    restored.load_state_dict(acc.state_dict())
    assert restored.compute().rows == 4
    assert repkern.sparsity_stats(a, top_p=(), ordered=False).top_p_l1 is None


def test_state_dict_settings_that_are_tensors_are_a_mismatch():
    """Found by test_fuzz: a config entry holding a tensor raised RuntimeError (ambiguous truth value)."""
    acc = repkern.SparsityAccumulator(5).update(_data(6, 5))
    sd = acc.state_dict()
    sd["config"] = dict(sd["config"], eps=torch.zeros(2))
    with pytest.raises(ValueError, match="state_dict: incompatible accumulator \\(eps="):
        repkern.SparsityAccumulator(5).load_state_dict(sd)
    xs, ys = _layers()
    sd = repkern.StreamingCKA().update(xs, ys).state_dict()
    sd["config"] = dict(sd["config"], debiased=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="state_dict: incompatible accumulator \\(debiased="):
        repkern.StreamingCKA().load_state_dict(sd)
