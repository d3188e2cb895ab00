"""repkern.similarity_matrix and repkern.similarity_test: against the per-pair functions, the reference
twins (every pair and every permuted y from scratch, the same permutations), and facts that need no
oracle (a layer against itself, symmetry, the kNN relabelling identity, p-values of related and of
independent data). The kNN metrics run on every backend (their lists come from the native kernels)."""

from __future__ import annotations

import pytest
import torch

import repkern
from repkern import reference
from repkern.ops import _second_order as so
from repkern.ops import knn as knn_ops
from repkern.ops import similarity as similarity_ops

PAIR = {"cka": repkern.cka, "mutual_knn": repkern.mutual_knn, "cycle_knn": repkern.cycle_knn, "cknna": repkern.cknna,
        "shape_distance": repkern.shape_distance, "svcca": repkern.svcca, "pwcca": repkern.pwcca, "rsa": repkern.rsa}

# (metric, similarity options, the per-pair function's keyword arguments)
CASES = [
    ("cka", {}, {}),
    ("cka", {"kernel": "rbf", "debiased": True}, {"kernel": "rbf", "debiased": True}),
    ("mutual_knn", {"k": 4}, {"k": 4}),
    ("mutual_knn", {"k": 3, "knn_metric": "euclidean"}, {"k": 3, "metric": "euclidean"}),
    ("cycle_knn", {"k": 4}, {"k": 4}),
    ("cycle_knn", {"k": 2, "knn_metric": "ip"}, {"k": 2, "metric": "ip"}),
    ("cknna", {"k": 5}, {"k": 5}),
    ("shape_distance", {}, {}),
    ("shape_distance", {"alpha": 0.3, "score": "euclidean"}, {"alpha": 0.3, "score": "euclidean"}),
    ("svcca", {}, {}),
    ("svcca", {"dims": (2, 3)}, {"dims": (2, 3)}),
    ("pwcca", {}, {}),
    ("rsa", {}, {}),
    ("rsa", {"rdm": "euclidean", "compare": "pearson"}, {"rdm": "euclidean", "compare": "pearson"}),
]
CASE_IDS = [f"{m}-{'-'.join(map(str, o.values())) or 'default'}" for m, o, _ in CASES]
KNN_CASES = [c for c in CASES if c[0] in ("mutual_knn", "cycle_knn", "cknna")]
SIMILARITIES = ("cka", "mutual_knn", "cknna", "svcca", "pwcca", "rsa")  # 1 for a layer against itself


def related_layers(n=24, widths=(4, 6, 5), dtype=torch.float64, seed=0, noise=0.4):
    """Layers that share a latent signal (noisy linear maps of it), so their alignment is well above chance."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return [(latent @ torch.randn(3, d, generator=g, dtype=torch.float64)
             + noise * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype) for d in widths]


def per_pair(metric, kwargs, xs, ys):
    return torch.stack([torch.stack([PAIR[metric](x, y, **kwargs) for y in ys]) for x in xs])


def tolerance(dtype, metric=""):
    """A distance at 0 (a layer against itself) is a square root of a rounding-level difference:
    ~sqrt(eps)·‖x̄‖ for the euclidean shape score, which the matrix gives as exactly 0."""
    if metric == "shape_distance":
        return dict(rtol=1e-6, atol=1e-5) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-3)
    return dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)


# ---- similarity_matrix ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("metric,options,kwargs", CASES, ids=CASE_IDS)
def test_matrix_equals_per_pair_and_reference(metric, options, kwargs, dtype):
    xs = related_layers(dtype=dtype)
    ys = related_layers(widths=(3, 5), dtype=dtype, seed=1)[:1] + [xs[1]]  # xs[1] passed in both: computed once
    for cols in (None, ys):
        out = repkern.similarity_matrix(xs, cols, metric=metric, **options)
        expected = per_pair(metric, kwargs, xs, xs if cols is None else cols)
        assert out.dtype == repkern._common.stat_dtype(dtype) and out.shape == expected.shape
        torch.testing.assert_close(out, expected.to(out.dtype), **tolerance(dtype, metric))
        ref = reference.similarity_matrix(xs, cols, metric=metric, **options)
        # the shape references whiten through an SVD of the data: distances near 0 differ by ~sqrt(eps)
        torch.testing.assert_close(out.double(), ref.double(), **tolerance(torch.float32, metric))


@pytest.mark.parametrize("metric,options,kwargs", KNN_CASES, ids=[i for i, c in zip(CASE_IDS, CASES) if c in KNN_CASES])
def test_knn_matrix_on_every_backend(backend, metric, options, kwargs):
    xs = [t.to(backend.device) for t in related_layers(n=40, widths=(5, 7), dtype=torch.float32)]
    out = repkern.similarity_matrix(xs, metric=metric, tile_bytes=16 * 16 * 4, **options)
    torch.testing.assert_close(out, per_pair(metric, kwargs, xs, xs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric,options,kwargs", CASES, ids=CASE_IDS)
def test_layer_against_itself(metric, options, kwargs):
    x = related_layers()[1]
    twin = x.clone()  # another tensor object: computed as a pair, not recognised as the same layer
    out = repkern.similarity_matrix([x], [x, twin], metric=metric, **options)
    if metric in SIMILARITIES:
        assert out[0, 0] == 1
        torch.testing.assert_close(out[0, 1], torch.ones((), dtype=out.dtype), rtol=0, atol=1e-12)
    elif metric == "shape_distance":
        assert out[0, 0] == 0
        # sqrt of a float64 rounding-level difference: ~sqrt(2 eps) rad, or ~sqrt(eps)·‖x̄‖ (euclidean)
        assert abs(out[0, 1].item()) < 1e-7 * (1 + (x - x.mean(0)).norm().item())
    else:  # cycle_knn: i need not be a neighbour of its own neighbours
        assert out[0, 0] == out[0, 1] == repkern.cycle_knn(x, x, **kwargs)


@pytest.mark.parametrize("metric,options,kwargs", CASES, ids=CASE_IDS)
def test_symmetry(metric, options, kwargs):
    xs = related_layers(widths=(4, 6, 5, 3))
    out = repkern.similarity_matrix(xs, metric=metric, **options)
    symmetric = metric in ("cka", "mutual_knn", "shape_distance", "rsa") or (metric == "svcca" and "dims" not in options)
    if symmetric:
        assert torch.equal(out, out.T)
    else:  # every entry computed in its own order
        torch.testing.assert_close(out, per_pair(metric, kwargs, xs, xs), rtol=1e-9, atol=1e-12)
        assert not torch.equal(out, out.T)


@pytest.mark.parametrize("metric,options,module,name", [
    ("mutual_knn", {"k": 3}, knn_ops, "knn"),
    ("cknna", {"k": 3}, knn_ops, "knn"),
    ("rsa", {}, similarity_ops, "condensed_dissimilarities"),
    ("pwcca", {}, so, "spectrum"),
])
def test_each_layer_computed_once(monkeypatch, metric, options, module, name):
    """The per-layer object (kNN lists, RDM, spectrum) once per distinct layer for the matrix, once per
    input for the test however many permutations."""
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or original(*a, **kw))
    xs = related_layers(widths=(4, 6, 5))
    repkern.similarity_matrix(xs, [xs[2], related_layers(seed=3)[0]], metric=metric, **options)
    assert len(calls) == 4  # xs[2] in both xs and ys counts once
    calls.clear()
    repkern.similarity_test(xs[0], xs[1], metric=metric, n_permutations=20, **options)
    assert len(calls) == 2


def test_matrix_degenerate_layers():
    xs = related_layers()
    nan_layer = xs[0].clone()
    nan_layer[3, 1] = torch.nan
    constant = torch.ones_like(xs[1])
    out = repkern.similarity_matrix([nan_layer, xs[2]], metric="shape_distance")
    assert torch.isnan(out[0]).all() and torch.isnan(out[:, 0]).all() and out[1, 1] == 0
    with pytest.warns(RuntimeWarning, match=r"similarity_matrix: xs\[1\]"):
        out = repkern.similarity_matrix([xs[2], constant], metric="svcca")
    assert torch.isnan(out[1]).all() and torch.isnan(out[:, 1]).all() and out[0, 0] == 1
    with pytest.raises(ValueError, match=r"xs\[1\]: full whitening"):
        repkern.similarity_matrix([xs[0], xs[1][:, :1].repeat(1, 3)], metric="shape_distance", alpha=0)


def test_reference_backend_runs_the_reference(monkeypatch):
    xs = related_layers()
    monkeypatch.setenv("REPKERN_BACKEND", "reference")
    assert torch.equal(repkern.similarity_matrix(xs, metric="pwcca"), reference.similarity_matrix(xs, metric="pwcca"))
    fast = repkern.similarity_test(xs[0], xs[1], metric="rsa", n_permutations=5)
    ref = reference.similarity_test(xs[0], xs[1], metric="rsa", n_permutations=5)
    assert torch.equal(fast.null, ref.null)


# ---- similarity_test ------------------------------------------------------------------------------------


def test_knn_relabel_identity(backend):
    """A new kNN search on y[π] returns π⁻¹(N_y(π(i))) for row i, with the same similarities."""
    y = related_layers(n=37, widths=(6,), dtype=torch.float32)[0].to(backend.device)
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(5)).to(backend.device)
    inv = torch.argsort(perm)
    vals, idx = repkern.knn(y, 6, tile_bytes=16 * 16 * 4)
    vals_p, idx_p = repkern.knn(y[perm], 6, tile_bytes=16 * 16 * 4)
    assert torch.equal(idx_p, inv[idx[perm]])
    torch.testing.assert_close(vals_p, vals[perm], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("metric,options,kwargs", KNN_CASES, ids=[i for i, c in zip(CASE_IDS, CASES) if c in KNN_CASES])
def test_knn_null_equals_reference_exactly(backend, metric, options, kwargs):
    x, y = (t.to(backend.device) for t in related_layers(n=30, widths=(5, 4)))
    fast = repkern.similarity_test(x, y, metric=metric, n_permutations=40, seed=11, **options)
    ref = reference.similarity_test(x, y, metric=metric, n_permutations=40, seed=11, **options)
    if metric == "cknna":  # sums of the same terms in another order
        torch.testing.assert_close(fast.null, ref.null, rtol=1e-12, atol=1e-14)
    else:  # counts: exact
        assert torch.equal(fast.null, ref.null)
    assert fast.p_value == ref.p_value
    torch.testing.assert_close(fast.value, PAIR[metric](x, y, **kwargs), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("metric,options,kwargs", CASES, ids=CASE_IDS)
def test_null_equals_reference(metric, options, kwargs):
    x, y = related_layers(n=20, widths=(4, 5), noise=1.0)[:2]
    fast = repkern.similarity_test(x, y, metric=metric, n_permutations=30, seed=2, **options)
    ref = reference.similarity_test(x, y, metric=metric, n_permutations=30, seed=2, **options)
    assert fast.null.shape == (30,) and fast.null.dtype == torch.float64 and fast.metric == metric
    torch.testing.assert_close(fast.null, ref.null, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(fast.value, PAIR[metric](x, y, **kwargs), rtol=1e-9, atol=1e-9)
    assert fast.p_value == ref.p_value


@pytest.mark.parametrize("metric,options,kwargs", CASES, ids=CASE_IDS)
def test_p_values(metric, options, kwargs):
    x, y, _ = related_layers(n=30, widths=(4, 5, 3), noise=0.3)
    related = repkern.similarity_test(x, y, metric=metric, n_permutations=99, seed=0, **options)
    assert related.p_value == pytest.approx(0.01)  # no permutation reaches the observed alignment
    # permuting y's rows destroys the alignment: the null sits on the unaligned side of the value
    if metric == "shape_distance":
        assert related.null.min() > related.value
    else:
        assert related.null.max() < related.value
    g = torch.Generator().manual_seed(7)
    independent = torch.randn(30, 5, generator=g, dtype=torch.float64)
    unrelated = repkern.similarity_test(x, independent, metric=metric, n_permutations=99, seed=0, **options)
    assert unrelated.p_value > 0.01


def test_p_value_direction_for_a_distance():
    x, y = related_layers(n=16, widths=(3, 3))[:2]
    res = repkern.similarity_test(x, y, metric="shape_distance", n_permutations=50, seed=4)
    assert res.p_value.item() == pytest.approx((1 + (res.null <= res.value).sum().item()) / 51)
    sim = repkern.similarity_test(x, y, metric="svcca", n_permutations=50, seed=4)
    assert sim.p_value.item() == pytest.approx((1 + (sim.null >= sim.value).sum().item()) / 51)


def test_seed_reproducible_and_float32():
    x, y = related_layers(n=20, widths=(4, 5), dtype=torch.float32, noise=2.0)[:2]
    a = repkern.similarity_test(x, y, metric="mutual_knn", k=3, n_permutations=60, seed=9)
    b = repkern.similarity_test(x, y, metric="mutual_knn", k=3, n_permutations=60, seed=9)
    c = repkern.similarity_test(x, y, metric="mutual_knn", k=3, n_permutations=60, seed=10)
    assert torch.equal(a.null, b.null) and not torch.equal(a.null, c.null)
    assert a.value.dtype == a.null.dtype == a.p_value.dtype == torch.float32
    none = repkern.similarity_test(x, y, metric="rsa", n_permutations=0)
    assert none.null.shape == (0,) and torch.isnan(none.p_value) and not torch.isnan(none.value)
    assert "SimilarityTestResult(metric='rsa'" in repr(none)


def test_cka_delegates_to_cka_test():
    x, y = related_layers(n=20, widths=(4, 5))[:2]
    res = repkern.similarity_test(x, y, metric="cka", n_permutations=25, seed=3, debiased=True)
    expected = repkern.cka_test(x, y, debiased=True, n_permutations=25, n_bootstrap=0, seed=3)
    assert torch.equal(res.value, expected.cka) and torch.equal(res.null, expected.null)
    assert torch.equal(res.p_value, expected.p_value)


def test_test_degenerate_inputs():
    x, y = related_layers(n=20, widths=(4, 5))[:2]
    bad = y.clone()
    bad[0, 0] = torch.inf
    for metric, options in (("svcca", {}), ("rsa", {}), ("shape_distance", {})):
        res = repkern.similarity_test(x, bad, metric=metric, n_permutations=5, **options)
        assert torch.isnan(res.value) and torch.isnan(res.null).all() and torch.isnan(res.p_value)
    with pytest.warns(RuntimeWarning, match="similarity_test: y"):
        res = repkern.similarity_test(x, torch.ones_like(y), metric="pwcca", n_permutations=5)
    assert torch.isnan(res.value) and torch.isnan(res.p_value)


# ---- bad input ------------------------------------------------------------------------------------------

X, Y = related_layers(n=10, widths=(3, 4))[:2]

BAD_MATRIX = [
    (dict(xs=[X], metric="cosine"), ValueError, "metric: expected one of"),
    (dict(xs=[X], metric="mutual_knn"), TypeError, "k: similarity_matrix.*needs the option k"),
    (dict(xs=[X], metric="mutual_knn", k=3, similarity="cosine"), TypeError, "similarity: not an option"),
    (dict(xs=[X], metric="svcca", alpha=1.0), TypeError, r"alpha: not an option of similarity_matrix\(metric='svcca'\)"),
    (dict(xs=[X], metric="mutual_knn", k=10), ValueError, "k: expected 1 <= k < n"),
    (dict(xs=[X], metric="cycle_knn", k=2, knn_metric="l1"), ValueError, "knn_metric: expected one of"),
    (dict(xs=[X], ys=[Y[:9]], metric="rsa"), ValueError, r"ys\[0\]: has n=9 samples"),
    (dict(xs=[X], ys=[Y.float()], metric="pwcca"), TypeError, r"ys\[0\]: dtype"),
    (dict(xs=X, metric="pwcca"), TypeError, "xs: expected a list or tuple"),
    (dict(xs=[X, Y], metric="svcca", dims=4), ValueError, r"dims: 4 SVD directions requested from xs\[0\]"),
    (dict(xs=[X, X[:, :1]], metric="rsa"), ValueError, r"xs\[1\]: the correlation distance"),
    (dict(xs=[X[:3]], metric="cknna", k=1), ValueError, "xs\\[0\\]: cknna needs n >= 4"),
    (dict(xs=[X], metric="shape_distance", alpha=2.0), ValueError, "alpha: expected a number in"),
    (dict(xs=[X], metric="cka", kernel="poly"), ValueError, "kernel: expected one of"),
]


@pytest.mark.parametrize("args,exc,message", BAD_MATRIX)
@pytest.mark.parametrize("fn", [repkern.similarity_matrix, reference.similarity_matrix])
def test_matrix_bad_arguments_name_the_argument(fn, args, exc, message):
    args = dict(args)
    xs, ys = args.pop("xs"), args.pop("ys", None)
    with pytest.raises(exc, match=message):
        fn(xs, ys, **args)


BAD_TEST = [
    (dict(metric="rsa", n_permutations=-1), ValueError, "n_permutations: expected >= 0"),
    (dict(metric="rsa", n_permutations=2.0), TypeError, "n_permutations: expected an int"),
    (dict(metric="rsa", seed=2**64), ValueError, "seed: expected an int in"),
    (dict(metric="rsa", seed=True), TypeError, "seed: expected an int"),
    (dict(metric="cka", method="gram"), TypeError, "method: not an option of similarity_test"),
    (dict(metric="mutual_knn", k=3, y=Y[:9]), ValueError, "y: expected n = 10 rows"),
    (dict(metric="pwcca", y=Y[:9]), ValueError, "y: has n=9 samples"),
    (dict(metric="cknna", k=0), ValueError, "k: expected 1 <= k < n"),
    (dict(metric="svcca", dims=5), ValueError, "dims: 5 SVD directions requested from x"),
    (dict(metric="rsa", compare="kendall"), ValueError, "compare: expected one of"),
    (dict(metric="knn"), ValueError, "metric: expected one of"),
]


@pytest.mark.parametrize("args,exc,message", BAD_TEST)
@pytest.mark.parametrize("fn", [repkern.similarity_test, reference.similarity_test])
def test_test_bad_arguments_name_the_argument(fn, args, exc, message):
    args = dict(args)
    y = args.pop("y", Y)
    with pytest.raises(exc, match=message):
        fn(X, y, **args)
