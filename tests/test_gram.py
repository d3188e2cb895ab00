"""repkern.gram against the reference and against facts that need no reference,
on every backend (CPU kernels, CUDA kernels through the emulator, CUDA)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import repkern
from repkern import reference
from tests.conftest import assert_close_to_reference

KERNELS = ("linear", "cosine", "rbf")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _data(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def _check(x, kernel, **kwargs):
    fast = repkern.gram(x, kernel, **kwargs)
    ref_low = reference.gram(x.cpu(), kernel, **kwargs)
    ref64 = reference.gram(x.cpu().double(), kernel, **kwargs)
    assert_close_to_reference(fast.cpu(), ref_low, ref64)
    return fast


@pytest.mark.emu_smoke
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("center", (False, True))
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_all_dtypes(backend, kernel, center, dtype):
    x = _data((2, 70, 9), dtype, backend.device)
    k = _check(x, kernel, center=center)
    assert k.dtype == dtype and k.shape == (2, 70, 70)


@pytest.mark.parametrize("n,d", [(1, 1), (3, 1), (3, 5), (64, 4), (257, 3), (300, 2)])
@pytest.mark.parametrize("kernel", KERNELS)
def test_matches_reference_odd_shapes(backend, kernel, n, d):
    # 257 rows: 9 tiles (odd), 300 rows: 10 tiles (even) in the CUDA tile-pair mapping.
    x = _data((n, d), torch.float32, backend.device, seed=n)
    _check(x, kernel)
    if n >= 2:
        _check(x, kernel, center=True)


@pytest.mark.parametrize("median", ("full", "offdiag"))
@pytest.mark.parametrize("threshold", (1.0, 0.5))
def test_rbf_bandwidth_options(backend, median, threshold):
    x = _data((3, 40, 6), torch.float64, backend.device)
    _check(x, "rbf", median=median, threshold=threshold)
    _check(x, "rbf", sigma=1.7)


def test_rbf_reproduces_kornblith_gram_rbf(backend):
    """Kornblith et al.'s numpy gram_rbf(x, threshold), written out independently."""
    x = _data((50, 7), torch.float64, backend.device)
    xn = x.cpu().numpy()
    for threshold in (1.0, 0.7):
        dot = xn @ xn.T
        sq_norms = np.diag(dot)
        sq_distances = -2 * dot + sq_norms[:, None] + sq_norms[None, :]
        sq_median = np.median(sq_distances)
        expected = np.exp(-sq_distances / (2 * threshold**2 * sq_median))
        got = repkern.gram(x, "rbf", threshold=threshold).cpu().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_offdiag_median_is_median_of_pairs(backend):
    x = _data((9, 3), torch.float64, backend.device)  # 72 off-diagonal entries: even count
    xn = x.cpu().numpy()
    d2 = ((xn[:, None, :] - xn[None, :, :]) ** 2).sum(-1)
    med = np.median(d2[~np.eye(9, dtype=bool)])
    got = repkern.gram(x, "rbf", median="offdiag").cpu().numpy()
    np.testing.assert_allclose(got, np.exp(-d2 / (2 * med)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
def test_facts(backend, kernel):
    x = _data((4, 33, 5), torch.float32, backend.device)
    k = repkern.gram(x, kernel)
    assert torch.equal(k, k.mT), "exactly symmetric"
    if kernel != "linear":
        assert torch.all(torch.diagonal(k, dim1=-2, dim2=-1) == 1), "unit diagonal"
        assert k.abs().max() <= 1 + 1e-6
    kc = repkern.gram(x, kernel, center=True)
    assert kc.sum(-1).abs().max() < 1e-4 * max(1.0, k.abs().max().item()), "centered rows sum to 0"


def test_linear_gram_of_orthonormal_rows_is_identity(backend):
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    k = repkern.gram(q.to(backend.device), "linear")
    torch.testing.assert_close(k.cpu(), torch.eye(16, dtype=torch.float64), atol=1e-12, rtol=0)


def test_cosine_is_scale_invariant_and_zero_rows_give_zero(backend):
    x = _data((10, 4), torch.float64, backend.device)
    scaled = x * torch.linspace(0.1, 100, 10, dtype=torch.float64, device=backend.device)[:, None]
    torch.testing.assert_close(repkern.gram(scaled, "cosine"), repkern.gram(x, "cosine"), atol=1e-12, rtol=0)
    x[3] = 0
    k = repkern.gram(x, "cosine").cpu()
    assert torch.all(k[3] == 0) and torch.all(k[:, 3] == 0)
    _check(x, "cosine")


def test_rbf_identical_rows_give_sigma_zero_limit(backend):
    x = torch.ones(6, 3, device=backend.device)
    x[5] = 2.0  # median distance 0: 1 where rows coincide, 0 elsewhere
    k = repkern.gram(x, "rbf").cpu()
    expected = torch.ones(6, 6)
    expected[5, :5] = expected[:5, 5] = 0
    assert torch.equal(k, expected)
    _check(x, "rbf")


@pytest.mark.parametrize("kernel", KERNELS)
def test_nan_propagates_to_its_row_and_column(backend, kernel):
    x = _data((12, 4), torch.float32, backend.device)
    x[2, 1] = math.nan
    k = repkern.gram(x, kernel, sigma=2.0 if kernel == "rbf" else None).cpu()
    nan = torch.isnan(k)
    assert nan[2].all() and nan[:, 2].all()
    nan[2] = False
    nan[:, 2] = False
    assert not nan.any()
    _check(x, kernel, sigma=2.0 if kernel == "rbf" else None)


def test_linear_inf_row_is_nan_and_an_overflowing_finite_row_is_not(backend):
    """The NaN-row pass runs only when a diagonal ‖x_i‖² is not finite: an Inf row must still give
    NaN (not ±inf) in its row and column, and a finite row whose ‖x_i‖² overflows keeps its finite
    products with the other rows."""
    x = torch.zeros(6, 3, device=backend.device)
    x[:, 0] = torch.arange(1.0, 7.0)
    x[:, 1] = 0.5  # without the NaN-row pass, x_1 · x_j would be +inf
    x[1, 1] = math.inf
    x[4, 2] = 3e38  # x_4 · x_4 overflows; x_4 · x_j = 5 x_j,0 + 0.25 for j != 1 stays finite
    k = repkern.gram(x).cpu()
    assert torch.isnan(k[1]).all() and torch.isnan(k[:, 1]).all()
    rest = [0, 2, 3, 5]
    assert torch.equal(k[4, rest], 5 * torch.tensor([1.0, 3, 4, 6]) + 0.25) and k[4, 4] == math.inf
    torch.testing.assert_close(k, k.mT, rtol=0, atol=0, equal_nan=True)


def test_batch_dims_equal_a_loop(backend):
    x = _data((2, 3, 20, 5), torch.float32, backend.device)
    k = repkern.gram(x, "rbf", center=True)
    assert k.shape == (2, 3, 20, 20)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(k[i, j], repkern.gram(x[i, j], "rbf", center=True))


def test_non_contiguous_and_expanded_inputs(backend):
    base = _data((5, 40), torch.float32, backend.device)
    x = base.mT  # (40, 5), non-contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(repkern.gram(x, "rbf"), repkern.gram(x.contiguous(), "rbf"))
    row = _data((1, 6), torch.float32, backend.device)
    expanded = row.expand(4, 10, 6)  # stride-0 batch and sample dims: every entry equal
    k = repkern.gram(expanded, "linear")
    torch.testing.assert_close(k, torch.full((4, 10, 10), (row * row).sum().item(), device=backend.device))


def test_empty_batch(backend):
    x = torch.zeros(0, 5, 3, device=backend.device)
    assert repkern.gram(x, "rbf").shape == (0, 5, 5)


@pytest.mark.parametrize(
    "call,exc,message",
    [
        (lambda: repkern.gram(torch.ones(4, 3, dtype=torch.int64)), TypeError, "x: expected float32"),
        (lambda: repkern.gram(torch.ones(4, 3, dtype=torch.bool)), TypeError, "x: expected float32"),
        (lambda: repkern.gram([[1.0, 2.0]]), TypeError, "x: expected a torch.Tensor"),
        (lambda: repkern.gram(torch.ones(4)), ValueError, r"x: expected at least 2 dimensions \(\.\.\., n, d\)"),
        (lambda: repkern.gram(torch.ones(0, 3)), ValueError, "x: needs n >= 1"),
        (lambda: repkern.gram(torch.ones(3, 0)), ValueError, "x: needs d >= 1"),
        (lambda: repkern.gram(torch.ones(3, 2), "poly"), ValueError, "kernel: expected one of"),
        (lambda: repkern.gram(torch.ones(3, 2), "rbf", sigma=-1.0), ValueError, "sigma: expected a finite number > 0"),
        (lambda: repkern.gram(torch.ones(3, 2), "rbf", sigma=0.0), ValueError, "sigma"),
        (lambda: repkern.gram(torch.ones(3, 2), "rbf", sigma=math.nan), ValueError, "sigma"),
        (lambda: repkern.gram(torch.ones(3, 2), "rbf", sigma="1"), TypeError, "sigma: expected a real number"),
        (lambda: repkern.gram(torch.ones(3, 2), "rbf", threshold=0), ValueError, "threshold"),
        (lambda: repkern.gram(torch.ones(3, 2), center=1), TypeError, "center: expected a bool"),
        (lambda: repkern.gram(torch.ones(3, 2), "rbf", median="mean"), ValueError, "median: expected one of"),
        (lambda: repkern.gram(torch.ones(1, 2), "rbf", median="offdiag"), ValueError, "median='offdiag' needs n >= 2"),
    ],
)
def test_bad_input_names_the_argument(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_bad_backend_setting(monkeypatch):
    monkeypatch.setenv("REPKERN_BACKEND", "gpu")
    with pytest.raises(ValueError, match="REPKERN_BACKEND must be one of"):
        repkern.gram(torch.ones(3, 2))


def test_reference_backend_is_the_reference(monkeypatch):
    monkeypatch.setenv("REPKERN_BACKEND", "reference")
    x = _data((10, 3), torch.float32, "cpu")
    assert torch.equal(repkern.gram(x, "rbf", center=True), reference.gram(x, "rbf", center=True))


GRAD_CASES = [
    ("linear", {}),
    ("linear", {"center": True}),
    ("cosine", {}),
    ("cosine", {"center": True}),
    ("rbf", {"sigma": 1.3}),
    ("rbf", {}),
    ("rbf", {"median": "offdiag", "threshold": 0.8}),
    ("rbf", {"center": True}),
]


@pytest.mark.parametrize("kernel,kwargs", GRAD_CASES)
def test_gradients_match_reference(backend, kernel, kwargs):
    x = _data((2, 11, 3), torch.float64, backend.device).requires_grad_()
    weights = _data((2, 11, 11), torch.float64, backend.device)
    (repkern.gram(x, kernel, **kwargs) * weights).sum().backward()
    xr = x.detach().cpu().requires_grad_()
    (reference.gram(xr, kernel, **kwargs) * weights.cpu()).sum().backward()
    torch.testing.assert_close(x.grad.cpu(), xr.grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kernel,kwargs", GRAD_CASES)
def test_gradcheck(kernel, kwargs):
    x = _data((7, 3), torch.float64, "cpu").requires_grad_()
    assert torch.autograd.gradcheck(lambda t: repkern.gram(t, kernel, **kwargs), (x,))


def test_low_precision_gradient_flows():
    x = _data((9, 4), torch.bfloat16, "cpu").requires_grad_()
    repkern.gram(x, "rbf").sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


def test_opcheck():
    x = _data((2, 9, 3), torch.float64, "cpu")
    scale = torch.tensor([-0.3, -0.1], dtype=torch.float64)
    for args in [
        (x, "linear", None, "full", 1.0, False),
        (x, "cosine", None, "full", 1.0, True),
        (x, "rbf", scale, "full", 1.0, False),
        (x, "rbf", scale, "full", 1.0, True),
        (x, "rbf", None, "full", 0.7, False),
        (x, "rbf", None, "offdiag", 1.0, True),
    ]:
        torch.library.opcheck(torch.ops.repkern.gram.default, args)


def test_torch_compile_fullgraph():
    def loss(x):
        return repkern.gram(x, "rbf", center=True).square().mean() + repkern.gram(x, "cosine").mean()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x = _data((2, 16, 4), torch.float32, "cpu").requires_grad_()
    out = compiled(x)
    out.backward()
    x_ref = x.detach().clone().requires_grad_()
    expected = loss(x_ref)
    expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_torch_compile_default_backend():
    """Inductor (the default backend) around the opaque custom ops."""
    compiled = torch.compile(lambda x: repkern.gram(x, "rbf").mean(), fullgraph=True)
    x = _data((12, 3), torch.float32, "cpu")
    torch.testing.assert_close(compiled(x), repkern.gram(x, "rbf").mean())


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 10, 11])
@pytest.mark.parametrize("median", ["full", "offdiag"])
def test_median_selection_from_the_upper_triangle(n, median):
    """The op selects order statistics from the n(n−1)/2 upper-triangle values (each
    counted twice); compare with a sort of the whole matrix, NaN rows included."""
    from repkern.ops.gram import median_sq_dist

    if median == "offdiag" and n < 2:
        pytest.skip("no off-diagonal entries")
    x = _data((3, n, 2), torch.float64, "cpu", seed=n)
    if n >= 4:
        x[1, 2] = math.nan  # NaN distances sort last
    d = reference.squared_distances(x)
    med, positions = median_sq_dist(d.clone(), median == "offdiag")
    expected = reference.median_squared_distance(d, median)
    torch.testing.assert_close(med, expected, equal_nan=True)
    at_positions = d.reshape(3, n * n).gather(1, positions)
    diagonal = positions // n == positions % n
    at_positions = torch.where(diagonal, torch.zeros_like(at_positions), at_positions)
    torch.testing.assert_close(at_positions.mean(1), med, equal_nan=True)
