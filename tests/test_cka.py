"""repkern.hsic / cka / cka_from_grams / cka_matrix against the reference and
against facts that need no reference, on every backend (CPU kernels, the CUDA
kernels through the emulator, CUDA)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import repkern
from repkern import _common, reference
from repkern.ops import cka as cka_ops
from tests.conftest import assert_close_to_reference

KERNELS = ("linear", "cosine", "rbf")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _data(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def _related(n, d1, d2, dtype, device, seed=0, batch=()):
    """y depends on x (CKA well away from 0 and 1)."""
    x = _data((*batch, n, d1), torch.float64, "cpu", seed)
    mix = _data((d1, d2), torch.float64, "cpu", seed + 1)
    y = x @ mix + 0.7 * _data((*batch, n, d2), torch.float64, "cpu", seed + 2)
    return x.to(dtype=dtype, device=device), y.to(dtype=dtype, device=device)


def _methods(kernel):
    return ("feature", "gram", "tiled") if kernel == "linear" else ("gram", "tiled")


def _check(fn, ref_fn, x, y, **kwargs):
    fast = fn(x, y, **kwargs)
    ref_kwargs = {k: v for k, v in kwargs.items() if k not in ("method", "max_gram_bytes")}
    ref_low = ref_fn(x.cpu(), y.cpu(), **ref_kwargs)
    ref64 = ref_fn(x.cpu().double(), y.cpu().double(), **ref_kwargs)
    assert fast.dtype == _common.stat_dtype(x.dtype)
    assert_close_to_reference(fast.cpu(), ref_low, ref64)
    return fast


# ---- against the reference, every path --------------------------------------------------------


@pytest.mark.parametrize("n", (45, 72))  # 72: 16-byte loads in the CUDA kernel; 45: the scalar fallback
@pytest.mark.parametrize("debiased", (False, True))
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_cka_matches_reference_on_every_path(backend, kernel, debiased, dtype, n):
    x, y = _related(n, 5, 3, dtype, backend.device)
    for method in _methods(kernel):
        _check(repkern.cka, reference.cka, x, y, kernel=kernel, debiased=debiased, method=method)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_low_precision_inputs(backend, kernel, dtype):
    x, y = _related(40, 6, 4, dtype, backend.device)
    for method in _methods(kernel):
        _check(repkern.cka, reference.cka, x, y, kernel=kernel, debiased=True, method=method)
        _check(repkern.hsic, reference.hsic, x, y, kernel=kernel, method=method)


@pytest.mark.parametrize("debiased", (False, True))
@pytest.mark.parametrize("kernel", KERNELS)
def test_hsic_matches_reference(backend, kernel, debiased):
    x, y = _related(33, 4, 6, torch.float64, backend.device)
    for method in _methods(kernel):
        _check(repkern.hsic, reference.hsic, x, y, kernel=kernel, debiased=debiased, method=method)


@pytest.mark.parametrize("kwargs", ({"sigma": 1.7}, {"threshold": 0.6}, {"median": "offdiag"},
                                    {"median": "offdiag", "threshold": 1.5}))
def test_rbf_bandwidth_options(backend, kwargs):
    x, y = _related(40, 5, 3, torch.float64, backend.device)
    for method in ("gram", "tiled"):
        _check(repkern.cka, reference.cka, x, y, kernel="rbf", method=method, **kwargs)
        _check(repkern.hsic, reference.hsic, x, y, kernel="rbf", debiased=True, method=method, **kwargs)


@pytest.mark.emu_smoke
@pytest.mark.parametrize("kernel", KERNELS)
def test_smoke_every_kernel_variant(backend, kernel):
    """Every CUDA kernel instantiation on the emulator in a small case: float32 and
    float64, 16-byte and scalar loads (n = 36 / 37), untiled and tiled, median and
    fixed-sigma RBF."""
    for dtype in (torch.float32, torch.float64):
        for n in (36, 37):
            x, y = _related(n, 3, 2, dtype, backend.device, seed=n)
            for method in ("gram", "tiled"):
                _check(repkern.cka, reference.cka, x, y, kernel=kernel, method=method)
                if kernel == "rbf":
                    _check(repkern.cka, reference.cka, x, y, kernel=kernel, method=method, sigma=2.0)


@pytest.mark.parametrize("debiased", (False, True))
def test_cka_from_grams_matches_reference(backend, debiased):
    x, y = _related(38, 4, 3, torch.float64, backend.device, batch=(2,))
    k, l = reference.gram(x, "rbf"), reference.gram(y, "linear")
    for dtype in DTYPES:
        _check(repkern.cka_from_grams, reference.cka_from_grams, k.to(dtype), l.to(dtype), debiased=debiased)


# ---- the native kernel itself -----------------------------------------------------------------


@pytest.mark.emu_smoke
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_terms_kernel_on_blocks(backend, dtype):
    """Direct call: 10 matrices and all 55 pairs (several CUDA launches), on a
    diagonal block (upper triangle only: the lower one is garbage here) and on an
    off-diagonal block (read whole, mirrored into column sums)."""
    n, m = 70, 10
    xs = [_data((n, 3), torch.float64, "cpu", seed=a) for a in range(m)]
    ks = [x @ x.T for x in xs]
    pairs = [(a, b) for a in range(m) for b in range(a, m)]
    pairs_t = torch.tensor(pairs, dtype=torch.int64)

    def run(blocks, r0, c0, diagonal):
        cross = torch.zeros(len(pairs), dtype=torch.float64, device=backend.device)
        row_sums = torch.zeros(m, n, dtype=torch.float64, device=backend.device)
        diag = torch.zeros(m, n, dtype=torch.float64, device=backend.device)
        cka_ops._native_terms(cka_ops.GramKind.LINEAR, blocks, None, None, pairs_t, cross, row_sums, diag, r0,
                               c0, diagonal)
        return cross.cpu(), row_sums.cpu(), diag.cpu()

    upper_only = [torch.where(torch.ones(n, n, dtype=torch.bool).triu(), k, torch.full_like(k, 1e30)) for k in ks]
    cross, row_sums, diag = run([k.to(dtype=dtype, device=backend.device) for k in upper_only], 0, 0, True)
    kd = [k.to(dtype).double() for k in ks]  # the values the kernel saw
    torch.testing.assert_close(cross, torch.stack([(kd[a] * kd[b]).sum() for a, b in pairs]), rtol=1e-12, atol=0)
    torch.testing.assert_close(row_sums, torch.stack([k.sum(1) for k in kd]), rtol=1e-12, atol=1e-9)
    assert torch.equal(diag, torch.stack([k.diagonal() for k in kd]))

    r0, c0, rows, cols = 5, 40, 30, 29  # rows 5..34 × cols 40..68
    blocks = [k[r0 : r0 + rows, c0 : c0 + cols].contiguous().to(dtype=dtype, device=backend.device) for k in ks]
    cross, row_sums, diag = run(blocks, r0, c0, False)
    bd = [b.cpu().double() for b in blocks]
    torch.testing.assert_close(cross, torch.stack([2 * (bd[a] * bd[b]).sum() for a, b in pairs]), rtol=1e-12, atol=0)
    expected = torch.zeros(m, n, dtype=torch.float64)
    for a in range(m):
        expected[a, r0 : r0 + rows] += bd[a].sum(1)
        expected[a, c0 : c0 + cols] += bd[a].sum(0)
    torch.testing.assert_close(row_sums, expected, rtol=1e-12, atol=1e-9)
    assert torch.all(diag == 0), "off-diagonal blocks write no diagonal"


def test_terms_kernel_rejects_bad_arguments():
    t = torch.zeros(4, 4, dtype=torch.float64)
    sums, cross = torch.zeros(1, 4, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    pairs = torch.tensor([[0, 0]])

    def call(blocks=(t,), pairs=pairs, sums=sums, r0=0, c0=0, diagonal=True, kind=cka_ops.GramKind.LINEAR):
        cka_ops._native_terms(kind, list(blocks), None, None, pairs, cross, sums, sums.clone(), r0, c0, diagonal)

    with pytest.raises(ValueError, match="pairs: matrix index out of range"):
        call(pairs=torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="r0/c0"):
        call(r0=1, diagonal=False)
    with pytest.raises(ValueError, match="diagonal_block"):
        call(blocks=(t[:3].contiguous(),))
    with pytest.raises(ValueError, match="aux: required"):
        call(kind=cka_ops.GramKind.COSINE)
    with pytest.raises(ValueError, match="blocks: must be float32 or float64"):
        call(blocks=(t.half(),))


# ---- facts that need no reference -------------------------------------------------------------


@pytest.mark.parametrize("debiased", (False, True))
@pytest.mark.parametrize("kernel", KERNELS)
def test_cka_of_x_with_itself_is_one(backend, kernel, debiased):
    x = _data((50, 7), torch.float32, backend.device)
    for method in _methods(kernel):
        torch.testing.assert_close(repkern.cka(x, x, kernel, debiased=debiased, method=method).cpu(),
                                   torch.tensor(1.0), atol=2e-6, rtol=0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_invariant_to_orthogonal_transforms_and_isotropic_scaling(backend, kernel):
    x, y = _related(60, 5, 4, torch.float64, backend.device)
    q, _ = torch.linalg.qr(_data((5, 5), torch.float64, "cpu", seed=9))
    base = repkern.cka(x, y, kernel, debiased=True)
    for method in _methods(kernel):
        for xt, yt in ((x @ q.to(x.device), y), (x, 37.0 * y), (1e-3 * (x @ q.to(x.device)), 250.0 * y)):
            torch.testing.assert_close(repkern.cka(xt, yt, kernel, debiased=True, method=method), base,
                                       rtol=1e-9, atol=1e-12)


def test_debiased_cka_of_independent_data_is_near_zero_biased_is_not(backend):
    x = _data((256, 512), torch.float32, backend.device, seed=1)
    y = _data((256, 512), torch.float32, backend.device, seed=2)
    biased = repkern.cka(x, y).item()
    debiased = repkern.cka(x, y, debiased=True).item()
    assert abs(debiased) < 0.02, debiased
    assert biased > 0.5, biased  # ≈ d/(n + d) for independent Gaussians


def test_small_case_by_hand(backend):
    """x = (1, −1, 1, −1): centered already, K = x xᵀ = ±1, ‖HKH‖² = n² = 16:
    biased HSIC(x, x) = 16/(n−1)² = 16/9; unbiased: Σ K̃∘K̃ = 12, K̃ row sums all −1,
    total −4: [12 + 16/((n−1)(n−2)) − (2/(n−2))·4]/(n(n−3)) = (12 + 8/3 − 4)/4 = 8/3."""
    x = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]], dtype=torch.float64, device=backend.device)
    for method in ("feature", "gram", "tiled"):
        assert repkern.hsic(x, x, method=method).item() == pytest.approx(16 / 9, rel=1e-14)
        assert repkern.hsic(x, x, debiased=True, method=method).item() == pytest.approx(8 / 3, rel=1e-14)


@pytest.mark.parametrize("kernel", KERNELS)
def test_tiled_equals_untiled_forward_and_gradient(backend, kernel):
    x, y = _related(150, 6, 4, torch.float64, backend.device, seed=3)
    budget = 3 * (150 * 149 // 2) * 8  # exact RBF median still fits; tiles of 64 rows: 3 × 3, edge tiles of 22
    assert repkern.cka_plan(x, y, kernel, method="tiled", max_gram_bytes=budget).tile == 64
    results = []
    for method, mgb in (("gram", None), ("tiled", budget)):
        xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
        value = repkern.cka(xr, yr, kernel, debiased=True, method=method, max_gram_bytes=mgb)
        value.backward()
        results.append((value.detach(), xr.grad, yr.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_tiled_rbf_median_exact_while_it_fits_else_seeded_sample(backend):
    x, y = _related(150, 6, 4, torch.float64, backend.device, seed=4)
    distances = 3 * (150 * 149 // 2) * 8  # packed distances and two working copies of them
    exact = repkern.cka_plan(x, y, "rbf", method="tiled", max_gram_bytes=distances)
    assert exact.median == "exact" and exact.median_sample_rows is None
    _check(repkern.cka, reference.cka, x, y, kernel="rbf", method="tiled", max_gram_bytes=distances)
    sampled = repkern.cka_plan(x, y, "rbf", method="tiled", max_gram_bytes=distances - 1)
    assert sampled.median == "sampled" and sampled.median_seed == cka_ops.MEDIAN_SEED
    assert sampled.median_sample_rows == math.isqrt((distances - 1) // (6 * 8)) < 150
    first = repkern.cka(x, y, "rbf", method="tiled", max_gram_bytes=distances - 1)
    again = repkern.cka(x, y, "rbf", method="tiled", max_gram_bytes=distances - 1)
    assert torch.equal(first, again), "seeded: the same rows every call"
    assert abs(first.item() - reference.cka(x.cpu(), y.cpu(), "rbf").item()) < 0.02


@pytest.mark.parametrize("median", ("full", "offdiag"))
def test_sampled_median_is_the_median_of_the_sampled_pairs(median):
    """With all rows sampled the estimate is the exact numpy median; with fewer it is
    the matching quantile of the sampled rows' distances."""
    x = _data((41, 3), torch.float64, "cpu", seed=5)
    d = reference.squared_distances(x)
    med, positions = cka_ops._median_sampled(x, median == "offdiag", 41)
    torch.testing.assert_close(med, reference.median_squared_distance(d, median))
    flat = d.reshape(-1)[positions]
    torch.testing.assert_close(flat.mean(), med)
    med20, _ = cka_ops._median_sampled(x, median == "offdiag", 20)
    rows = torch.randperm(41, generator=torch.Generator().manual_seed(cka_ops.MEDIAN_SEED))[:20]
    sub = d[rows][:, rows]
    pairs = sub[torch.ones(20, 20, dtype=torch.bool).triu(1)]
    assert pairs.min() <= med20 <= pairs.max()
    assert abs((pairs <= med20).double().mean().item() - 0.5) < 0.05


def test_input_stats_equal_the_separate_checks():
    """finite / constant / peak from one per-column min-max equal all_finite, constant_rows and
    max |x| on the special values: NaN, ±Inf, -0.0 against 0.0, constant inputs."""
    base = _data((3, 7, 4), torch.float32, "cpu")
    cases = [base, base[:, :1].expand(3, 7, 4).clone(), torch.zeros(2, 5, 3)]
    signed = torch.zeros(2, 5, 3)
    signed[0, 2, 1] = -0.0
    signed[1, 3, 0] = -2.5
    nan, inf, const_inf = base.clone(), base.clone(), torch.full((1, 4, 2), -math.inf)
    nan[1, 3, 2] = math.nan
    inf[2, 0, 1] = math.inf
    cases += [signed, nan, inf, const_inf]
    for x in cases:
        finite, constant, peak = cka_ops._input_stats(x)
        assert torch.equal(finite, _common.all_finite(x))
        assert torch.equal(constant, _common.constant_rows(x))
        torch.testing.assert_close(peak, x.abs().amax((-2, -1)), equal_nan=True)


def test_cka_matrix_equals_a_loop_of_cka(backend):
    layers = [_data((40, d), torch.float64, backend.device, seed=d) for d in (3, 6, 2, 5, 4)]
    layers[3] = layers[3] + layers[1][:, :5]  # some structure
    for kernel in KERNELS:
        for method in _methods(kernel):
            m = repkern.cka_matrix(layers[:3], layers[2:], kernel, debiased=True, method=method)
            loop = torch.stack([torch.stack([repkern.cka(a, b, kernel, debiased=True) for b in layers[2:]])
                                for a in layers[:3]])
            torch.testing.assert_close(m, loop, rtol=1e-10, atol=1e-12)
            ref = reference.cka_matrix(layers[:3], layers[2:], kernel, debiased=True)
            torch.testing.assert_close(m.cpu(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
def test_cka_matrix_symmetric_with_unit_diagonal(backend, kernel):
    layers = [_data((30, d), torch.float32, backend.device, seed=d) for d in (4, 2, 7, 3, 5, 6, 1, 8, 2, 3)]
    for method in _methods(kernel):
        m = repkern.cka_matrix(layers, kernel=kernel, method=method)
        assert m.shape == (10, 10) and m.dtype == torch.float32
        assert torch.equal(m, m.T)
        assert torch.all(m.diagonal() == 1)
        torch.testing.assert_close(m.cpu(), reference.cka_matrix([t.cpu() for t in layers], kernel=kernel),
                                   rtol=2e-5, atol=2e-5)


def test_cka_matrix_constant_layer_is_nan_with_warning_others_computed(backend):
    layers = [_data((30, d), torch.float64, backend.device, seed=d) for d in (3, 4, 5)]
    with_constant = layers[:1] + [torch.full((30, 2), 3.5, dtype=torch.float64, device=backend.device)] + layers[1:]
    for kernel in KERNELS:
        for method in _methods(kernel):
            with pytest.warns(RuntimeWarning, match=r"repkern.cka_matrix: xs\[1\]: zero variance"):
                m = repkern.cka_matrix(with_constant, kernel=kernel, method=method)
            assert torch.isnan(m[1]).all() and torch.isnan(m[:, 1]).all()
            keep = [0, 2, 3]
            torch.testing.assert_close(m[keep][:, keep], repkern.cka_matrix(layers, kernel=kernel, method=method))


def test_cka_matrix_counts_a_shared_tensor_once(monkeypatch):
    layers = [_data((30, d), torch.float64, "cpu", seed=d) for d in (3, 4)]
    seen = []
    original = torch.ops.repkern.hsic_terms

    def spy(xs, *args):
        seen.append(len(xs))
        return original(xs, *args)

    monkeypatch.setattr(torch.ops.repkern, "hsic_terms", spy)
    m = repkern.cka_matrix(layers, layers, "rbf")
    assert seen == [2]
    torch.testing.assert_close(m, repkern.cka_matrix(layers, kernel="rbf"))


def test_batch_dims_equal_a_loop(backend):
    x, y = _related(25, 4, 3, torch.float32, backend.device, batch=(2, 3))
    for kernel in KERNELS:
        c = repkern.cka(x, y, kernel, debiased=True)
        h = repkern.hsic(x, y, kernel)
        assert c.shape == (2, 3) and h.shape == (2, 3)
        for i in range(2):
            for j in range(3):
                torch.testing.assert_close(c[i, j], repkern.cka(x[i, j], y[i, j], kernel, debiased=True))
                torch.testing.assert_close(h[i, j], repkern.hsic(x[i, j], y[i, j], kernel))


def test_kornblith_reference_formulas_in_numpy(backend):
    """Kornblith et al. (2019), github.com/google-research/google-research/blob/master/
    representation_similarity: gram_linear, gram_rbf, center_gram, cka,
    feature_space_linear_cka, written out independently here."""

    def gram_linear(x):
        return x.dot(x.T)

    def gram_rbf(x, threshold=1.0):
        dot_products = x.dot(x.T)
        sq_norms = np.diag(dot_products)
        sq_distances = -2 * dot_products + sq_norms[:, None] + sq_norms[None, :]
        sq_median_distance = np.median(sq_distances)
        return np.exp(-sq_distances / (2 * threshold**2 * sq_median_distance))

    def center_gram(gram, unbiased=False):
        gram = gram.copy()
        if unbiased:
            n = gram.shape[0]
            np.fill_diagonal(gram, 0)
            means = np.sum(gram, 0, dtype=np.float64) / (n - 2)
            means -= np.sum(means) / (2 * (n - 1))
            gram -= means[:, None]
            gram -= means[None, :]
            np.fill_diagonal(gram, 0)
        else:
            means = np.mean(gram, 0, dtype=np.float64)
            means -= np.mean(means) / 2
            gram -= means[:, None]
            gram -= means[None, :]
        return gram

    def cka(gram_x, gram_y, debiased=False):
        gram_x = center_gram(gram_x, unbiased=debiased)
        gram_y = center_gram(gram_y, unbiased=debiased)
        scaled_hsic = gram_x.ravel().dot(gram_y.ravel())
        return scaled_hsic / (np.linalg.norm(gram_x) * np.linalg.norm(gram_y))

    def debiased_dot(xty, sum_sq_rows_x, sum_sq_rows_y, sq_norm_x, sq_norm_y, n):
        return (xty - n / (n - 2.0) * sum_sq_rows_x.dot(sum_sq_rows_y)
                + sq_norm_x * sq_norm_y / ((n - 1) * (n - 2)))

    def feature_space_linear_cka(x, y, debiased=False):
        x = x - np.mean(x, 0, keepdims=True)
        y = y - np.mean(y, 0, keepdims=True)
        dot_similarity = np.linalg.norm(x.T.dot(y)) ** 2
        norm_x, norm_y = np.linalg.norm(x.T.dot(x)), np.linalg.norm(y.T.dot(y))
        if debiased:
            n = x.shape[0]
            ssx, ssy = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)
            sqx, sqy = np.sum(ssx), np.sum(ssy)
            dot_similarity = debiased_dot(dot_similarity, ssx, ssy, sqx, sqy, n)
            norm_x = np.sqrt(debiased_dot(norm_x**2, ssx, ssx, sqx, sqx, n))
            norm_y = np.sqrt(debiased_dot(norm_y**2, ssy, ssy, sqy, sqy, n))
        return dot_similarity / (norm_x * norm_y)

    x, y = _related(64, 10, 7, torch.float64, backend.device, seed=11)
    xn, yn = x.cpu().numpy(), y.cpu().numpy()
    for debiased in (False, True):
        expected = cka(gram_linear(xn), gram_linear(yn), debiased)
        for method in ("feature", "gram", "tiled"):
            assert repkern.cka(x, y, debiased=debiased, method=method).item() == pytest.approx(expected, rel=1e-10)
        assert feature_space_linear_cka(xn, yn, debiased) == pytest.approx(expected, rel=1e-10)
        for threshold in (1.0, 0.5):
            expected = cka(gram_rbf(xn, threshold), gram_rbf(yn, threshold), debiased)
            for method in ("gram", "tiled"):
                got = repkern.cka(x, y, "rbf", debiased=debiased, threshold=threshold, method=method).item()
                assert got == pytest.approx(expected, rel=1e-10)
        k, l = torch.from_numpy(gram_rbf(xn)).to(backend.device), torch.from_numpy(gram_linear(yn)).to(backend.device)
        got = repkern.cka_from_grams(k, l, debiased=debiased).item()
        assert got == pytest.approx(cka(gram_rbf(xn), gram_linear(yn), debiased), rel=1e-10)


# ---- numerics and degenerate input ----------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
def test_large_float32_inputs_do_not_overflow(backend, kernel):
    x, y = _related(64, 8, 5, torch.float32, backend.device, seed=6)
    for method in _methods(kernel):
        for debiased in (False, True):
            got = repkern.cka(1e4 * x, 1e4 * y, kernel, debiased=debiased, method=method)
            expected = reference.cka(x.cpu().double(), y.cpu().double(), kernel, debiased=debiased)
            torch.testing.assert_close(got.cpu().double(), expected, rtol=2e-5, atol=2e-5)
        h = repkern.hsic(1e4 * x, 1e4 * y, kernel, method=method)
        h_ref = reference.hsic(1e4 * x.cpu().double(), 1e4 * y.cpu().double(), kernel)
        torch.testing.assert_close(h.cpu().double(), h_ref, rtol=2e-5, atol=0)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_ordinary_16_bit_activations_do_not_overflow(backend, dtype):
    """Activations of magnitude ~100 (fp16 max 65504): x·xᵀ and Σ K∘K would overflow
    in 16 bits and, for the latter, come close in float32 without normalization."""
    x, y = _related(64, 32, 24, torch.float32, backend.device, seed=7)
    x16, y16 = (120 * x).to(dtype), (120 * y).to(dtype)
    for kernel in KERNELS:
        for method in _methods(kernel):
            got = repkern.cka(x16, y16, kernel, debiased=True, method=method)
            expected = reference.cka(x16.cpu().double(), y16.cpu().double(), kernel, debiased=True)
            assert torch.isfinite(got)
            torch.testing.assert_close(got.cpu().double(), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_nan_and_inf_inputs_give_nan_without_warning(backend, kernel):
    x, y = _related(20, 3, 3, torch.float32, backend.device, batch=(3,))
    x[1, 4, 2] = math.nan
    y[2, 0, 0] = math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in _methods(kernel):
            for fn in (repkern.cka, repkern.hsic):
                out = fn(x, y, kernel, method=method).cpu()
                assert not torch.isnan(out[0]) and torch.isnan(out[1:]).all()
                ref = getattr(reference, fn.__name__)
                assert_close_to_reference(out, ref(x.cpu(), y.cpu(), kernel), ref(x.cpu().double(), y.cpu().double(),
                                                                                   kernel))


@pytest.mark.parametrize("kernel", KERNELS)
def test_constant_input_gives_nan_and_a_warning_naming_it(backend, kernel):
    x, y = _related(20, 3, 3, torch.float64, backend.device, batch=(2,))
    y[1] = 2.5  # all rows equal
    for method in _methods(kernel):
        with pytest.warns(RuntimeWarning, match=r"repkern.cka: y\[1\]: zero variance"):
            c = repkern.cka(x, y, kernel, method=method)
        assert not torch.isnan(c[0]) and torch.isnan(c[1])
        with pytest.warns(RuntimeWarning, match=r"repkern.cka: x: zero variance"):
            assert torch.isnan(repkern.cka(y[1], x[0], kernel, method=method))
    k = reference.gram(y, "linear")
    with pytest.warns(RuntimeWarning, match=r"repkern.cka_from_grams: l\[1\]"):
        assert torch.isnan(repkern.cka_from_grams(reference.gram(x, kernel), k)[1])


@pytest.mark.parametrize("debiased", (False, True))
def test_self_hsic_at_rounding_level_is_nan_with_warning(backend, debiased):
    """Both self-HSICs are squared norms (‖HKH‖²_F, and ‖Ũ_K‖²_F for the U-centered
    K), so only rounding makes them <= 0 or tiny: a constant Gram with one entry one
    ulp off has no resolvable variance, whatever sign its computed self-HSIC has."""
    k = torch.full((6, 6), 0.3, dtype=torch.float64)
    k[1, 2] = k[2, 1] = math.nextafter(0.3, 1.0)
    l = reference.gram(_data((6, 2), torch.float64, "cpu"), "rbf")
    assert torch.isnan(reference.cka_from_grams(k, l, debiased=debiased))
    with pytest.warns(RuntimeWarning, match=r"repkern.cka_from_grams: k: zero variance"):
        assert torch.isnan(repkern.cka_from_grams(k.to(backend.device), l.to(backend.device), debiased=debiased))


def test_sums_stay_accurate_over_many_tiles():
    """n = 6000 in float32 over 64-row tiles (4 700 tile pairs): the cross-tile sums are
    float64, so the tiled result matches the float64 feature-space value."""
    x, y = _related(6000, 3, 2, torch.float32, "cpu", seed=8)
    budget = 3 * 2 * 64 * 64 * 4
    tiled = repkern.cka(x, y, debiased=True, method="tiled", max_gram_bytes=budget)
    exact = reference.feature_space_linear_cka(x.double(), y.double(), debiased=True)
    assert abs(tiled.item() - exact.item()) < 2e-6


# ---- training-loop use ----------------------------------------------------------------------------

GRAD_CASES = [("linear", {}), ("cosine", {}), ("rbf", {}), ("rbf", {"sigma": 1.3}),
              ("rbf", {"median": "offdiag", "threshold": 0.8})]


@pytest.mark.parametrize("debiased", (False, True))
@pytest.mark.parametrize("kernel,kwargs", GRAD_CASES)
def test_gradients_match_reference(backend, kernel, kwargs, debiased):
    x, y = _related(21, 4, 3, torch.float64, backend.device, seed=2)
    xr, yr = x.cpu().requires_grad_(), y.cpu().requires_grad_()
    expected = torch.autograd.grad(reference.cka(xr, yr, kernel, debiased=debiased, **kwargs), (xr, yr))
    for method in _methods(kernel):
        xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
        budget = 3 * 4 * 8 * 8 * 8  # tiled: below 64 rows, two tiles per edge (11 rows here)
        got = torch.autograd.grad(repkern.cka(xg, yg, kernel, debiased=debiased, method=method,
                                              max_gram_bytes=budget, **kwargs), (xg, yg))
        for g, e in zip(got, expected):
            torch.testing.assert_close(g.cpu(), e, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("kernel,kwargs", GRAD_CASES)
def test_gradcheck(kernel, kwargs):
    x, y = _related(11, 3, 2, torch.float64, "cpu", seed=3)
    x.requires_grad_()
    y.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: repkern.cka(a, b, kernel, debiased=True, **kwargs), (x, y))
    for method in _methods(kernel):  # the full Jacobian above; random projections of it on every path
        for debiased in (False, True):
            assert torch.autograd.gradcheck(
                lambda a, b: repkern.cka(a, b, kernel, debiased=debiased, method=method, **kwargs), (x, y),
                fast_mode=True)
        assert torch.autograd.gradcheck(lambda a, b: repkern.hsic(a, b, kernel, method=method, **kwargs), (x, y),
                                        fast_mode=True)
    layers = [x, y, (x[:, :2] * y).detach().requires_grad_()]
    assert torch.autograd.gradcheck(lambda *ls: repkern.cka_matrix(list(ls), kernel=kernel, **kwargs), layers,
                                    fast_mode=True)


def test_gradcheck_from_grams():
    x, y = _related(9, 3, 2, torch.float64, "cpu", seed=4)
    k = reference.gram(x, "rbf").requires_grad_()
    l = reference.gram(y, "cosine").requires_grad_()
    for debiased in (False, True):
        assert torch.autograd.gradcheck(lambda a, b: repkern.cka_from_grams(a, b, debiased=debiased), (k, l))


def test_one_minus_cka_is_a_loss():
    """Gradient steps on x under 1 − CKA(x, y) raise the alignment with y."""
    x, y = _related(64, 8, 8, torch.float32, "cpu", seed=12)
    x = (0.3 * x + torch.randn_like(x)).requires_grad_()
    opt = torch.optim.Adam([x], lr=0.05)
    start = repkern.cka(x, y, "rbf").item()
    for _ in range(30):
        opt.zero_grad()
        loss = 1 - repkern.cka(x, y, "rbf", debiased=True)
        loss.backward()
        opt.step()
    assert repkern.cka(x, y, "rbf").item() > start + 0.2


def test_low_precision_gradient_flows():
    x, y = _related(16, 4, 3, torch.bfloat16, "cpu")
    x.requires_grad_()
    repkern.cka(x, y, "rbf", debiased=True).backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


def test_opcheck():
    x = _data((2, 12, 3), torch.float64, "cpu", seed=1)
    y = _data((2, 12, 2), torch.float64, "cpu", seed=2)
    pairs = [0, 2, 0, 0, 2, 2, 1, 3, 1, 1, 3, 3]
    scale = torch.full((4,), -0.3, dtype=torch.float64)
    for args in [
        ([x, y], "linear", None, "full", 1.0, pairs, 12, 0, 12),
        ([x, y], "cosine", None, "full", 1.0, pairs, 5, 0, 5),
        ([x, y], "rbf", None, "full", 0.7, pairs, 12, 0, 6),
        ([x, y], "rbf", None, "offdiag", 1.0, pairs, 5, 0, 5),
        ([x, y], "rbf", None, "full", 1.0, pairs, 5, 8, 5),
        ([x, y], "rbf", scale, "full", 1.0, pairs, 5, 0, 5),
    ]:
        torch.library.opcheck(torch.ops.repkern.hsic_terms.default, args)
    torch.library.opcheck(torch.ops.repkern.hsic_terms_from_grams.default, ([x @ x.mT, y @ y.mT], pairs))


def test_torch_compile_fullgraph():
    def loss(a, b):
        return ((1 - repkern.cka(a, b, "rbf", debiased=True)).sum() + repkern.hsic(a, b, "cosine").sum()
                + repkern.cka_matrix([a[0], b[0], a[1]], kernel="linear").sum())

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x, y = _related(16, 4, 3, torch.float32, "cpu", batch=(2,))
    xa, ya = x.clone().requires_grad_(), y.clone().requires_grad_()
    out = compiled(xa, ya)
    out.backward()
    xb, yb = x.clone().requires_grad_(), y.clone().requires_grad_()
    expected = loss(xb, yb)
    expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ya.grad, yb.grad)


def test_torch_compile_default_backend():
    compiled = torch.compile(lambda a, b: repkern.cka(a, b, "rbf", method="tiled"), fullgraph=True)
    x, y = _related(20, 3, 2, torch.float32, "cpu")
    torch.testing.assert_close(compiled(x, y), repkern.cka(x, y, "rbf", method="tiled"))


# ---- plans, budgets, bad input ----------------------------------------------------------------------


def test_plan_cost_model_and_budget(monkeypatch):
    wide = torch.zeros(64, 4096)
    tall = torch.zeros(4096, 64)
    assert repkern.cka_plan(tall, tall).method == "feature"  # n·d² << n²·d
    assert repkern.cka_plan(wide, wide).method == "gram"  # n²·d << n·d²
    assert repkern.cka_plan(tall, tall, "rbf").method == "gram"
    plan = repkern.cka_plan(tall, tall, "rbf", max_gram_bytes=2 * 4096 * 4096 * 4 - 1)
    assert plan.method == "tiled" and plan.median == "exact" and plan.gram_bytes == 2 * 4096 * 4096 * 4
    monkeypatch.setenv("REPKERN_MAX_GRAM_BYTES", str(1 << 20))
    plan = repkern.cka_plan(tall, tall, "rbf")
    assert plan.method == "tiled" and plan.median == "sampled" and plan.max_gram_bytes == 1 << 20
    assert plan.median_sample_rows == 209 and plan.tile == 192
    assert repkern.cka_plan([tall, tall, tall], kernel="cosine").method == "tiled"
    monkeypatch.setenv("REPKERN_MAX_GRAM_BYTES", "lots")
    with pytest.raises(ValueError, match="REPKERN_MAX_GRAM_BYTES must be a positive integer"):
        repkern.cka(tall, tall)


def test_reference_backend_is_the_reference(monkeypatch):
    monkeypatch.setenv("REPKERN_BACKEND", "reference")
    x, y = _related(20, 3, 2, torch.float32, "cpu")
    assert torch.equal(repkern.cka(x, y, "rbf", debiased=True), reference.cka(x, y, "rbf", debiased=True))
    assert torch.equal(repkern.cka_matrix([x, y]), reference.cka_matrix([x, y]))


def test_empty_batch():
    x = torch.zeros(0, 5, 3)
    assert repkern.cka(x, x).shape == (0,) and repkern.hsic(x, x, "rbf").shape == (0,)


X = torch.ones(6, 3)


@pytest.mark.parametrize(
    "call,exc,message",
    [
        (lambda: repkern.cka(X.long(), X), TypeError, "x: expected float32"),
        (lambda: repkern.cka(X, [[1.0]]), TypeError, "y: expected a torch.Tensor"),
        (lambda: repkern.cka(X, X.double()), TypeError, "y: dtype torch.float64 differs from x's torch.float32"),
        (lambda: repkern.cka(X, X.to("meta")), ValueError, "y: repkern supports CPU and CUDA tensors"),
        (lambda: repkern.cka(X, torch.ones(5, 3)), ValueError, "y: has n=5 samples but x has n=6"),
        (lambda: repkern.cka(torch.ones(2, 6, 3), torch.ones(3, 6, 3)), ValueError, "y: batch dims"),
        (lambda: repkern.cka(torch.ones(3), X), ValueError, r"x: expected at least 2 dimensions"),
        (lambda: repkern.cka(torch.ones(6, 0), X), ValueError, "x: needs n >= 1 samples and d >= 1"),
        (lambda: repkern.cka(X[:3], X[:3], debiased=True), ValueError, r"x: the unbiased estimator .* n >= 4"),
        (lambda: repkern.hsic(X[:1], X[:1]), ValueError, "x: HSIC needs n >= 2"),
        (lambda: repkern.cka(X, X, "poly"), ValueError, "kernel: expected one of"),
        (lambda: repkern.cka(X, X, debiased=1), TypeError, "debiased: expected a bool"),
        (lambda: repkern.cka(X, X, "rbf", sigma=0.0), ValueError, "sigma"),
        (lambda: repkern.cka(X, X, "rbf", threshold=-1), ValueError, "threshold"),
        (lambda: repkern.cka(X, X, "rbf", median="mean"), ValueError, "median: expected one of"),
        (lambda: repkern.cka(X, X, method="fast"), ValueError, "method: expected one of"),
        (lambda: repkern.cka(X, X, "rbf", method="feature"), ValueError, "method: 'feature' needs kernel='linear'"),
        (lambda: repkern.cka(X, X, max_gram_bytes=0), ValueError, "max_gram_bytes: expected a positive"),
        (lambda: repkern.cka(X, X, max_gram_bytes=1.5), TypeError, "max_gram_bytes: expected an int"),
        (lambda: repkern.cka_from_grams(torch.ones(4, 3), torch.ones(4, 3)), ValueError, "k: expected square"),
        (lambda: repkern.cka_from_grams(torch.ones(4, 4), torch.ones(5, 5)), ValueError, "l: shape"),
        (lambda: repkern.cka_matrix(X), TypeError, "xs: expected a list or tuple"),
        (lambda: repkern.cka_matrix([]), ValueError, "xs: expected at least one layer"),
        (lambda: repkern.cka_matrix([X, torch.ones(2, 6, 3)]), ValueError, r"xs\[1\]: expected shape \(n, d\)"),
        (lambda: repkern.cka_matrix([X, torch.ones(5, 3)]), ValueError, r"xs\[1\]: has n=5 samples but xs\[0\]"),
        (lambda: repkern.cka_matrix([X], [X.double()]), TypeError, r"ys\[0\]: dtype"),
        (lambda: repkern.cka_matrix([X], [X[:3]]), ValueError, r"ys\[0\]: has n=3 samples but xs\[0\] has n=6"),
    ],
)
def test_bad_input_names_the_argument(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_square_sum64_matches_float64_squares_in_blocks(dtype):
    """_common.square_sum64 over rows and over whole matrices, with several row blocks and a partial one
    (300 rows of 700: blocks of 93), against the float64 sum of exact squares; its input is left alone and
    its gradient is 2t; torch.compile gives the same values."""
    g = torch.Generator().manual_seed(5)
    t = (torch.randn((2, 300, 700), generator=g, dtype=torch.float64) * 3).to(dtype)
    before = t.clone()
    oracle_rows, oracle_all = t.double().square().sum(-1), t.double().square().sum((-2, -1))
    rows, whole = _common.square_sum64(t, -1), _common.square_sum64(t, (-2, -1))
    assert torch.equal(t, before) and rows.dtype == whole.dtype == torch.float64
    torch.testing.assert_close(rows, oracle_rows, rtol=1e-12, atol=0)
    torch.testing.assert_close(whole, oracle_all, rtol=1e-12, atol=0)
    leaf = t.double().requires_grad_()
    _common.square_sum64(leaf, -1).sum().backward()
    torch.testing.assert_close(leaf.grad, 2 * leaf.detach(), rtol=0, atol=0)
    compiled = torch.compile(lambda u: _common.square_sum64(u, (-2, -1)), fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(t), oracle_all, rtol=1e-12, atol=0)


def test_feature_path_past_one_square_block_matches_reference():
    """n·d above _common.SQUARE_BLOCK: the debiased terms from blocked row norms."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn((400, 300), generator=g, dtype=torch.float64)
    y = x[:, :200] @ torch.randn((200, 250), generator=g, dtype=torch.float64) + torch.randn((400, 250), generator=g,
                                                                                               dtype=torch.float64)
    assert x.numel() > _common.SQUARE_BLOCK
    for debiased in (False, True):
        got = repkern.cka(x, y, debiased=debiased, method="feature")
        expected = reference.cka(x, y, "linear", debiased=debiased)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
