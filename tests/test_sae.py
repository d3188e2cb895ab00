"""repkern.sae_encode / sae_decode against the reference and against facts that need
no reference, on every backend (CPU kernels, CUDA kernels through the emulator, CUDA).

Shapes are chosen to reach every kernel instantiation: d_sae 256 (16-byte vector
loads) and 301 (scalar path), k in each register-slot class (k <= 32, 64, 128, 256),
all four dtypes, several column chunks and row blocks (small chunk_bytes)."""

from __future__ import annotations

import math

import pytest
import torch

import repkern
from repkern import CsrCodes, SparseCodes, reference
from repkern.ops import sae as sae_ops
from tests.conftest import assert_close_to_reference

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SMALL_CHUNKS = 8192  # bytes: 128-column chunks, row blocks of 16 rows (float32)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _sae(d_in, d_sae, dtype, device, seed=0, bias_scale=0.3):
    g = _gen(seed)
    W = (torch.randn(d_in, d_sae, generator=g, dtype=torch.float64) / math.sqrt(d_in)).to(dtype).to(device)
    b_enc = (bias_scale * torch.randn(d_sae, generator=g, dtype=torch.float64)).to(dtype).to(device)
    b_dec = (0.5 * torch.randn(d_in, generator=g, dtype=torch.float64)).to(dtype).to(device)
    return W, b_enc, b_dec


def _x(shape, dtype, device, seed=1):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).to(dtype).to(device)


def _ref_pair(fn, x, W, b_enc, b_dec, **kw):
    """Reference in the same precision and in float64."""
    low = fn(x.cpu(), W.cpu(), b_enc.cpu(), b_dec=b_dec.cpu(), **kw)
    high = fn(x.cpu().double(), W.cpu().double(), b_enc.cpu().double(), b_dec=b_dec.cpu().double(), **kw)
    return low, high


# ---- forward against the reference ----------------------------------------------------


@pytest.mark.emu_smoke
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu_first", (False, True))
def test_topk_matches_reference(backend, dtype, relu_first):
    W, b_enc, b_dec = _sae(13, 301, dtype, backend.device)
    x = _x((2, 9, 13), dtype, backend.device)
    kw = dict(activation="topk", k=5, relu_first=relu_first, output="sparse")
    codes = repkern.sae_encode(x, W, b_enc, b_dec=b_dec, chunk_bytes=SMALL_CHUNKS, **kw)
    low, high = _ref_pair(reference.sae_encode, x, W, b_enc, b_dec, **kw)
    assert isinstance(codes, SparseCodes) and codes.values.shape == (2, 9, 5) and codes.d_sae == 301
    assert codes.values.dtype == dtype and codes.indices.dtype == torch.int64
    assert_close_to_reference(codes.values.cpu(), low.values, high.values.double())
    assert torch.equal(codes.indices.cpu(), high.indices)
    dense = repkern.sae_encode(x, W, b_enc, b_dec=b_dec, chunk_bytes=SMALL_CHUNKS, **{**kw, "output": "dense"})
    assert torch.equal(dense.cpu(), codes.to_dense().cpu())


# register slots per lane: 1, 2, 4, 8; k = 32: the k-th rank in lane 31 (one slot), k = 33: in slot 0 of lane 16
@pytest.mark.parametrize("k", (5, 32, 33, 40, 100, 200))
@pytest.mark.parametrize("d_sae", (256, 301))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_topk_every_k_class(backend, k, d_sae, dtype):
    W, b_enc, b_dec = _sae(8, d_sae, dtype, backend.device, seed=k)
    x = _x((10, 8), dtype, backend.device, seed=d_sae)
    codes = repkern.sae_encode(x, W, b_enc, b_dec=b_dec, activation="topk", k=k, output="sparse",
                               chunk_bytes=SMALL_CHUNKS)
    _, high = _ref_pair(reference.sae_encode, x, W, b_enc, b_dec, activation="topk", k=k, output="sparse")
    assert torch.equal(codes.indices.cpu(), high.indices)
    torch.testing.assert_close(codes.values.cpu().double(), high.values, rtol=1e-5, atol=1e-5)
    h = reference.sae_pre_activations(x.cpu().double(), W.cpu().double(), b_enc.cpu().double(), b_dec.cpu().double())
    picked = h.gather(1, codes.indices.cpu())
    assert torch.all(picked[:, :-1] >= picked[:, 1:]), "sorted by rank"


def test_topk_beyond_the_native_maximum_uses_the_torch_merge():
    W, b_enc, b_dec = _sae(6, 700, torch.float32, "cpu")
    x = _x((7, 6), torch.float32, "cpu")
    for relu_first in (False, True):
        kw = dict(activation="topk", k=300, relu_first=relu_first, output="sparse")
        codes = repkern.sae_encode(x, W, b_enc, b_dec=b_dec, chunk_bytes=4096, **kw)
        ref = reference.sae_encode(x.double(), W.double(), b_enc.double(), b_dec=b_dec.double(), **kw)
        torch.testing.assert_close(codes.values.double(), ref.values, rtol=1e-5, atol=1e-5)
        if not relu_first:  # relu_first: many zeros tie; the order among them is ours (lower index first)
            assert torch.equal(codes.indices, ref.indices)
        else:
            zero = codes.values == 0
            assert torch.all(codes.indices[zero].reshape(7, -1).diff(dim=1) > 0)


@pytest.mark.parametrize("activation", ("relu", "jumprelu"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d_sae", (256, 301))
def test_dense_matches_reference(backend, activation, dtype, d_sae):
    W, b_enc, b_dec = _sae(11, d_sae, dtype, backend.device)
    x = _x((3, 7, 11), dtype, backend.device)
    theta = torch.rand(d_sae, generator=_gen(5)).to(backend.device) if activation == "jumprelu" else None
    kw = dict(activation=activation, threshold=theta)
    codes, fire = repkern.sae_encode(x, W, b_enc, b_dec=b_dec, chunk_bytes=SMALL_CHUNKS, count_firings=True, **kw)
    low, high = _ref_pair(reference.sae_encode, x, W, b_enc, b_dec, **{**kw, "threshold": theta.cpu()
                                                                       if theta is not None else None})
    assert codes.shape == (3, 7, d_sae) and codes.dtype == dtype
    assert_close_to_reference(codes.cpu(), low, high)
    assert torch.equal(fire.cpu(), (codes.cpu() != 0).reshape(-1, d_sae).sum(0)), "firings counted in the same pass"


@pytest.mark.emu_smoke
@pytest.mark.parametrize("activation", ("relu", "jumprelu", "batchtopk"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("d_sae", (256, 301))
def test_csr_matches_reference(backend, activation, dtype, d_sae):
    W, b_enc, b_dec = _sae(9, d_sae, dtype, backend.device, bias_scale=1.0)
    x = _x((40, 9), dtype, backend.device)
    kw = dict(activation=activation)
    if activation == "jumprelu":
        kw["threshold"] = 0.5
    if activation == "batchtopk":
        kw["k"] = 6
    codes = repkern.sae_encode(x, W, b_enc, b_dec=b_dec, output="sparse", chunk_bytes=SMALL_CHUNKS, **kw)
    assert isinstance(codes, CsrCodes) and codes.shape == (40, d_sae)
    _, high = _ref_pair(reference.sae_encode, x, W, b_enc, b_dec, **kw)
    torch.testing.assert_close(codes.to_dense().cpu().double(), high, rtol=1e-5, atol=1e-6)
    rows = codes.row_indices().cpu()
    cols = codes.col_indices.cpu()
    assert torch.all(codes.values != 0)
    same_row = rows[1:] == rows[:-1]
    assert torch.all(cols[1:][same_row] > cols[:-1][same_row]), "columns ascend within a row"
    if activation == "batchtopk":
        assert codes.values.numel() == 6 * 40, "k·N codes over the batch (enough positive pre-activations)"


@pytest.mark.parametrize("form", ("dense", "topk", "csr"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d_in", (16, 13))
def test_decode_matches_reference(backend, form, dtype, d_in):
    W, b_enc, b_dec = _sae(d_in, 200, dtype, backend.device)
    W_dec = W.mT.contiguous()
    x = _x((2, 5, d_in), dtype, backend.device)
    if form == "dense":
        codes = repkern.sae_encode(x, W, b_enc, b_dec=b_dec)
    elif form == "topk":
        codes = repkern.sae_encode(x, W, b_enc, b_dec=b_dec, activation="topk", k=37, output="sparse")
    else:
        codes = repkern.sae_encode(x, W, b_enc, b_dec=b_dec, output="sparse")
    out = repkern.sae_decode(codes, W_dec, b_dec)
    cpu_codes = type(codes)(*[c.cpu() if isinstance(c, torch.Tensor) else c for c in codes]) if form != "dense" \
        else codes.cpu()
    low = reference.sae_decode(cpu_codes, W_dec.cpu(), b_dec.cpu())
    high = reference.sae_decode(cpu_codes.to_dense().double() if form != "dense" else cpu_codes.double(),
                                W_dec.cpu().double(), b_dec.cpu().double())
    assert out.shape == (2, 5, d_in) and out.dtype == dtype
    assert_close_to_reference(out.cpu(), low, high)


def test_decode_of_a_known_sparse_code(backend):
    W_dec = torch.arange(12, dtype=torch.float32).reshape(4, 3).to(backend.device)
    codes = SparseCodes(torch.tensor([[2.0, -1.0]], device=backend.device),
                        torch.tensor([[3, 0]], device=backend.device), 4)
    out = repkern.sae_decode(codes, W_dec, torch.ones(3, device=backend.device))
    assert torch.equal(out.cpu(), torch.tensor([[2 * 9.0 - 0 + 1, 2 * 10.0 - 1 + 1, 2 * 11.0 - 2 + 1]]))


# ---- facts ------------------------------------------------------------------------------


def test_ties_lower_index_wins(backend):
    """Equal pre-activations everywhere: TopK keeps features 0..k−1, BatchTopK the
    lowest flat indices (row-major)."""
    d_in, d_sae = 4, 300
    W = torch.zeros(d_in, d_sae, device=backend.device)
    b_enc = torch.full((d_sae,), 0.5, device=backend.device)
    x = torch.randn(6, d_in, generator=_gen(0)).to(backend.device)
    codes = repkern.sae_encode(x, W, b_enc, activation="topk", k=7, output="sparse", chunk_bytes=SMALL_CHUNKS)
    assert torch.equal(codes.indices.cpu(), torch.arange(7).expand(6, 7))
    assert torch.all(codes.values == 0.5)
    batch = repkern.sae_encode(x, W, b_enc, activation="batchtopk", k=2.5, output="sparse", chunk_bytes=SMALL_CHUNKS)
    flat = batch.row_indices().cpu() * d_sae + batch.col_indices.cpu()
    assert torch.equal(flat, torch.arange(15)), "int(2.5 · 6) = 15 codes: the lowest flat indices"


def test_relu_first_changes_indices_only_when_few_are_positive(backend):
    W = torch.zeros(2, 10, device=backend.device)
    b_enc = torch.tensor([-5.0, -1, 3, -2, -0.5, -3, -4, -6, -7, -8], device=backend.device)
    x = torch.zeros(1, 2, device=backend.device)
    topk = repkern.sae_encode(x, W, b_enc, activation="topk", k=3, output="sparse")
    assert topk.indices.tolist() == [[2, 4, 1]] and topk.values.tolist() == [[3.0, 0.0, 0.0]]
    first = repkern.sae_encode(x, W, b_enc, activation="topk", k=3, relu_first=True, output="sparse")
    assert first.indices.tolist() == [[2, 0, 1]] and first.values.tolist() == [[3.0, 0.0, 0.0]]


def test_jumprelu_threshold_is_strict(backend):
    W = torch.zeros(1, 4, device=backend.device)
    b_enc = torch.tensor([0.5, 0.7, 1.0, 0.2], device=backend.device)
    theta = torch.tensor([0.5, 0.5, 1.5, 0.0], device=backend.device)
    x = torch.zeros(1, 1, device=backend.device)
    for output in ("dense", "sparse"):
        codes = repkern.sae_encode(x, W, b_enc, activation="jumprelu", threshold=theta, output=output)
        dense = codes if output == "dense" else codes.to_dense()
        assert dense.cpu().tolist() == [[0.0, pytest.approx(0.7), 0.0, pytest.approx(0.2)]]


@pytest.mark.emu_smoke
def test_nan_rows_give_nan_codes_and_others_are_unaffected(backend):
    W, b_enc, b_dec = _sae(6, 260, torch.float32, backend.device)
    x = _x((5, 6), torch.float32, backend.device)
    x[2, 3] = math.nan
    # The same GEMM shape with a finite row 2: torch's GEMM may block 4 and 5 rows differently, so only
    # equal shapes give bit-identical rows.
    clean = x.clone()
    clean[2] = 0
    others = [0, 1, 3, 4]
    topk = repkern.sae_encode(x, W, b_enc, b_dec=b_dec, activation="topk", k=4, output="sparse")
    assert torch.isnan(topk.values[2]).all() and topk.indices[2].tolist() == [0, 1, 2, 3]
    ref = repkern.sae_encode(clean, W, b_enc, b_dec=b_dec, activation="topk", k=4, output="sparse")
    assert torch.equal(topk.values[others], ref.values[others]) and torch.equal(topk.indices[others], ref.indices[others])
    dense = repkern.sae_encode(x, W, b_enc, b_dec=b_dec)
    assert torch.isnan(dense[2]).all() and not torch.isnan(torch.cat([dense[:2], dense[3:]])).any()
    csr = repkern.sae_encode(x, W, b_enc, b_dec=b_dec, output="sparse")
    assert torch.equal(csr.crow_indices.diff()[2].cpu(), torch.tensor(260)), "NaN codes are stored (nonzero)"


def test_large_pre_encoder_bias_stays_accurate(backend):
    """x ≈ b_dec with |b_dec| ~ 1e3: subtracting b_dec from x keeps float32 accurate;
    the folded form b_enc − b_dec W_enc (x W − b_dec W) loses it to cancellation."""
    W, b_enc, _ = _sae(64, 256, torch.float32, backend.device)
    b_dec = 1000 * torch.randn(64, generator=_gen(3)).to(backend.device)
    x = b_dec + 0.01 * _x((20, 64), torch.float32, backend.device)
    codes = repkern.sae_encode(x, W, b_enc, b_dec=b_dec)
    h64 = reference.sae_pre_activations(x.cpu().double(), W.cpu().double(), b_enc.cpu().double(),
                                        b_dec.cpu().double())
    err = (codes.cpu().double() - torch.relu(h64)).abs().max().item()
    folded = x.cpu() @ W.cpu() + (b_enc.cpu() - b_dec.cpu() @ W.cpu())
    folded_err = (torch.relu(folded).double() - torch.relu(h64)).abs().max().item()
    assert err < 1e-5 < folded_err


def test_chunking_does_not_change_results(backend, monkeypatch):
    W, b_enc, b_dec = _sae(10, 520, torch.float32, backend.device)
    x = _x((33, 10), torch.float32, backend.device)
    for kw in (dict(activation="topk", k=9, output="sparse"), dict(output="sparse"),
               dict(activation="batchtopk", k=3.0, output="sparse"), dict(activation="relu")):
        one = repkern.sae_encode(x, W, b_enc, b_dec=b_dec, chunk_bytes=1 << 30, **kw)
        small = repkern.sae_encode(x, W, b_enc, b_dec=b_dec, chunk_bytes=600, **kw)
        for a, b in zip(one, small) if not isinstance(one, torch.Tensor) else [(one, small)]:
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
    monkeypatch.setenv("REPKERN_SAE_CHUNK_BYTES", "600")
    assert sae_ops.chunk_budget(None) == 600
    monkeypatch.setenv("REPKERN_SAE_CHUNK_BYTES", "lots")
    with pytest.raises(ValueError, match="REPKERN_SAE_CHUNK_BYTES"):
        repkern.sae_encode(x, W, b_enc)


def test_plan_bounds_the_chunk():
    rows, cols = sae_ops.plan_chunks(4096, 768, 24576, 4, 128, 32 << 20, False)
    assert rows * cols * 4 <= 32 << 20 and cols % 128 == 0 and rows == 4096
    rows, cols = sae_ops.plan_chunks(10**6, 768, 24576, 4, 128, 32 << 20, False)
    assert cols == 128 and rows * cols * 4 <= 32 << 20, "row blocks when N is large"


def test_mixed_dtypes_compute_in_the_weights_dtype(backend):
    W, b_enc, b_dec = _sae(12, 256, torch.bfloat16, backend.device)
    x = _x((9, 12), torch.float32, backend.device)
    codes = repkern.sae_encode(x, W, b_enc.float(), b_dec=b_dec.double(), activation="topk", k=6, output="sparse")
    same = repkern.sae_encode(x.bfloat16(), W, b_enc, b_dec=b_dec, activation="topk", k=6, output="sparse")
    assert codes.values.dtype == torch.bfloat16
    assert torch.equal(codes.values, same.values) and torch.equal(codes.indices, same.indices)


def test_non_contiguous_inputs(backend):
    """sparsify stores the encoder as (d_sae, d_in): W_enc = encoder.weight.T is a view."""
    W, b_enc, b_dec = _sae(12, 260, torch.float32, backend.device)
    encoder_weight = W.mT.contiguous()
    x = _x((12, 9), torch.float32, backend.device).mT  # (9, 12), non-contiguous
    for kw in (dict(activation="topk", k=5, output="sparse"), dict(output="sparse"), dict()):
        got = repkern.sae_encode(x, encoder_weight.mT, b_enc, b_dec=b_dec, **kw)
        want = repkern.sae_encode(x.contiguous(), W, b_enc, b_dec=b_dec, **kw)
        for a, b in zip(got, want) if not isinstance(got, torch.Tensor) else [(got, want)]:
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(a, b)
    codes = repkern.sae_encode(x, W, b_enc, activation="topk", k=5, output="sparse")
    torch.testing.assert_close(repkern.sae_decode(codes, W.mT), repkern.sae_decode(codes, W.mT.contiguous()))


def test_empty_batch_and_one_dimensional_input(backend):
    W, b_enc, b_dec = _sae(5, 130, torch.float32, backend.device)
    empty = torch.zeros(0, 5, device=backend.device)
    assert repkern.sae_encode(empty, W, b_enc).shape == (0, 130)
    assert repkern.sae_encode(empty, W, b_enc, activation="topk", k=3, output="sparse").values.shape == (0, 3)
    assert repkern.sae_encode(empty, W, b_enc, output="sparse").values.numel() == 0
    assert repkern.sae_encode(empty, W, b_enc, activation="batchtopk", k=2, output="sparse").values.numel() == 0
    one = repkern.sae_encode(_x((5,), torch.float32, backend.device), W, b_enc, activation="topk", k=3,
                             output="sparse")
    assert one.values.shape == (3,) and repkern.sae_decode(one, W.mT.contiguous()).shape == (5,)


def test_reference_backend_is_the_reference(monkeypatch):
    W, b_enc, b_dec = _sae(6, 50, torch.float32, "cpu")
    x = _x((4, 6), torch.float32, "cpu")
    monkeypatch.setenv("REPKERN_BACKEND", "reference")
    got = repkern.sae_encode(x, W, b_enc, b_dec=b_dec, activation="topk", k=3)
    assert torch.equal(got, reference.sae_encode(x, W, b_enc, b_dec=b_dec, activation="topk", k=3))


# ---- bad input ----------------------------------------------------------------------------

_W = torch.zeros(4, 10)
_b = torch.zeros(10)
_x4 = torch.zeros(3, 4)


@pytest.mark.parametrize(
    "call,exc,message",
    [
        (lambda: repkern.sae_encode(torch.zeros(3, 5), _W, _b), ValueError, "x: last dimension 5 does not match d_in=4"),
        (lambda: repkern.sae_encode(_x4.long(), _W, _b), TypeError, "x: expected float32"),
        (lambda: repkern.sae_encode(_x4, _W[0], _b), ValueError, r"W_enc: expected at least 2 dimensions"),
        (lambda: repkern.sae_encode(_x4, _W, torch.zeros(9)), ValueError, r"b_enc: expected shape \(d_sae,\)"),
        (lambda: repkern.sae_encode(_x4, _W, _b, b_dec=torch.zeros(5)), ValueError, r"b_dec: expected shape"),
        (lambda: repkern.sae_encode(_x4, _W, _b, activation="gelu"), ValueError, "activation: expected one of"),
        (lambda: repkern.sae_encode(_x4, _W, _b, activation="topk", k=11), ValueError, r"k: must be in \[1, d_sae=10\]"),
        (lambda: repkern.sae_encode(_x4, _W, _b, activation="topk", k=0), ValueError, "k: must be in"),
        (lambda: repkern.sae_encode(_x4, _W, _b, activation="topk", k=2.0), TypeError, "k: activation='topk' needs an int"),
        (lambda: repkern.sae_encode(_x4, _W, _b, activation="topk"), TypeError, "k: activation='topk' needs an int"),
        (lambda: repkern.sae_encode(_x4, _W, _b, activation="jumprelu"), ValueError, "threshold: activation='jumprelu'"),
        (lambda: repkern.sae_encode(_x4, _W, _b, activation="jumprelu", threshold=-0.1), ValueError,
         "threshold: must be finite and >= 0"),
        (lambda: repkern.sae_encode(_x4, _W, _b, activation="jumprelu", threshold=torch.full((10,), math.nan)),
         ValueError, "threshold: must be finite"),
        (lambda: repkern.sae_encode(_x4, _W, _b, activation="jumprelu", threshold=torch.zeros(3)), ValueError,
         r"threshold: expected \(d_sae,\) or a scalar"),
        (lambda: repkern.sae_encode(_x4, _W, _b, activation="batchtopk"), ValueError, "k, threshold: activation='batchtopk'"),
        (lambda: repkern.sae_encode(_x4, _W, _b, activation="batchtopk", k=2, threshold=0.1), ValueError, "exactly one"),
        (lambda: repkern.sae_encode(_x4, _W, _b, activation="batchtopk", k=-1.0), ValueError, "k: must be in"),
        (lambda: repkern.sae_encode(_x4, _W, _b, k=3), ValueError, "k: only used by"),
        (lambda: repkern.sae_encode(_x4, _W, _b, threshold=0.1), ValueError, "threshold: only used by"),
        (lambda: repkern.sae_encode(_x4, _W, _b, relu_first=True), ValueError, "relu_first: only meaningful"),
        (lambda: repkern.sae_encode(_x4, _W, _b, output="coo"), ValueError, "output: expected one of"),
        (lambda: repkern.sae_encode(_x4, _W, _b, chunk_bytes=0), ValueError, "chunk_bytes: expected a positive"),
        (lambda: repkern.sae_encode(_x4, _W, _b, bandwidth=0.0), ValueError, "bandwidth"),
        (lambda: repkern.sae_encode(_x4, _W, _b, count_firings=1), TypeError, "count_firings: expected a bool"),
        (lambda: repkern.sae_encode(_x4, _W, _b.to("meta")), ValueError, "b_enc: repkern supports CPU and CUDA tensors"),
        (lambda: repkern.sae_decode(torch.zeros(3, 9), _W.mT), ValueError, "codes: last dimension 9 does not match"),
        (lambda: repkern.sae_decode(SparseCodes(torch.ones(1, 2), torch.tensor([[0, 10]]), 10), _W.mT), ValueError,
         r"codes: indices must lie in \[0, d_sae=10\)"),
        (lambda: repkern.sae_decode(SparseCodes(torch.ones(1, 2), torch.tensor([[0, 1]]), 12), _W.mT), ValueError,
         "codes: d_sae=12 does not match"),
        (lambda: repkern.sae_decode(CsrCodes(torch.tensor([0, 3]), torch.tensor([0, 1]), torch.ones(2), (1, 10)),
                                    _W.mT), ValueError, "crow_indices must rise from 0 to nnz"),
        (lambda: repkern.sae_decode(torch.zeros(3, 10), _W.mT, torch.zeros(5)), ValueError, r"b_dec: expected shape"),
    ],
)
def test_bad_input_names_the_argument(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


# ---- gradients ------------------------------------------------------------------------------

GRAD_CASES = [
    ("relu", {}),
    ("jumprelu", {"threshold": "learned"}),
    ("topk", {"k": 6}),
    ("topk", {"k": 6, "relu_first": True}),
    ("batchtopk", {"k": 4.0}),
    ("batchtopk", {"threshold": 0.2}),
]


def _grad_inputs(device, d_sae=140, seed=0):
    W, b_enc, b_dec = _sae(7, d_sae, torch.float64, device, seed=seed, bias_scale=0.8)
    x = _x((2, 5, 7), torch.float64, device, seed=seed + 1)
    theta = (0.05 + 0.5 * torch.rand(d_sae, generator=_gen(seed + 2))).to(device)
    return [t.requires_grad_() for t in (x, W, b_enc, b_dec, theta)]


def _kwargs(activation, kw, theta):
    kw = dict(kw)
    if kw.get("threshold") == "learned":
        kw["threshold"] = theta
    return dict(activation=activation, **kw)


@pytest.mark.parametrize("activation,kw", GRAD_CASES)
@pytest.mark.parametrize("output", ("dense", "sparse"))
def test_gradients_match_reference(backend, activation, kw, output):
    x, W, b_enc, b_dec, theta = _grad_inputs(backend.device)
    weights = torch.randn(10, 140, generator=_gen(9), dtype=torch.float64).to(backend.device)
    kwargs = _kwargs(activation, kw, theta)
    codes = repkern.sae_encode(x, W, b_enc, b_dec=b_dec, output=output, chunk_bytes=SMALL_CHUNKS, **kwargs)
    dense = codes if output == "dense" else codes.to_dense()
    stored = dense.detach().reshape(10, 140) != 0 if output == "sparse" and activation != "topk" else None
    (dense.reshape(10, 140) * weights).sum().backward()
    leaves = [t.detach().cpu().requires_grad_() for t in (x, W, b_enc, b_dec, theta)]
    ref = reference.sae_encode(leaves[0], leaves[1], leaves[2], b_dec=leaves[3],
                               **_kwargs(activation, kw, leaves[4])).reshape(10, 140)
    # Sparse outputs have a gradient only on their stored codes (TopK: all k slots).
    w_ref = weights.cpu() if stored is None else weights.cpu() * stored.cpu()
    if output == "sparse" and activation == "topk":
        mask = torch.zeros(10, 140, dtype=torch.bool).scatter(1, codes.indices.reshape(10, -1).cpu(), True)
        w_ref = weights.cpu() * mask
    (ref * w_ref).sum().backward()
    for name, fast, slow in zip(("x", "W_enc", "b_enc", "b_dec", "threshold"), (x, W, b_enc, b_dec, theta), leaves):
        if slow.grad is None:
            assert fast.grad is None or not fast.grad.any(), name
            continue
        torch.testing.assert_close(fast.grad.cpu(), slow.grad, rtol=1e-9, atol=1e-10, msg=name)


def test_jumprelu_threshold_gradient_is_the_rectangle_estimator():
    """One feature, θ = 1, bandwidth 0.1: rows with |h − θ| < 0.05 contribute −θ/ε each."""
    W = torch.ones(1, 1, dtype=torch.float64)
    theta = torch.tensor([1.0], requires_grad=True)
    x = torch.tensor([[0.97], [1.02], [1.2], [0.5]], dtype=torch.float64)
    codes = repkern.sae_encode(x, W, torch.zeros(1, dtype=torch.float64), activation="jumprelu", threshold=theta,
                               bandwidth=0.1)
    codes.sum().backward()
    assert theta.grad.item() == pytest.approx(2 * -(1.0 / 0.1))


@pytest.mark.parametrize("activation,kw", GRAD_CASES)
@pytest.mark.parametrize("output", ("dense", "sparse"))
def test_gradcheck(activation, kw, output):
    x, W, b_enc, b_dec, theta = _grad_inputs("cpu", d_sae=30, seed=3)
    kwargs = _kwargs(activation, kw, theta.detach())  # θ's estimator is not a derivative: not gradchecked

    def fn(x, W, b_enc, b_dec):
        codes = repkern.sae_encode(x, W, b_enc, b_dec=b_dec, output=output, chunk_bytes=1024, **kwargs)
        return codes if output == "dense" else codes.values

    assert torch.autograd.gradcheck(fn, (x, W, b_enc, b_dec))


@pytest.mark.parametrize("form", ("dense", "topk", "csr"))
def test_decode_gradients(backend, form):
    W, b_enc, b_dec = _sae(6, 40, torch.float64, backend.device, bias_scale=1.0)
    x = _x((9, 6), torch.float64, backend.device)
    W_dec = W.mT.contiguous().requires_grad_()
    b = b_dec.clone().requires_grad_()
    if form == "topk":
        codes = repkern.sae_encode(x, W, b_enc, activation="topk", k=5, output="sparse")
        values = codes.values.clone().requires_grad_()
        codes = codes._replace(values=values)
    elif form == "csr":
        codes = repkern.sae_encode(x, W, b_enc, output="sparse")
        values = codes.values.clone().requires_grad_()
        codes = codes._replace(values=values)
    else:
        values = repkern.sae_encode(x, W, b_enc).requires_grad_()
        codes = values
    assert torch.autograd.gradcheck(lambda v, w, bb: repkern.sae_decode(codes._replace(values=v) if form != "dense"
                                                                        else v, w, bb), (values, W_dec, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d_in", (16, 13))  # vector and scalar loads
def test_decode_gradients_every_dtype(backend, dtype, d_in):
    W, b_enc, b_dec = _sae(d_in, 64, dtype, backend.device)
    x = _x((6, d_in), dtype, backend.device)
    codes = repkern.sae_encode(x, W, b_enc, activation="topk", k=8, output="sparse")
    values = codes.values.detach().requires_grad_()
    W_dec = W.mT.contiguous().requires_grad_()
    target = _x((6, d_in), dtype, backend.device, seed=4)
    (repkern.sae_decode(codes._replace(values=values), W_dec, b_dec) * target).sum().backward()
    vals64 = values.detach().cpu().double().requires_grad_()
    wd64 = W_dec.detach().cpu().double().requires_grad_()
    (reference.sae_decode(codes._replace(values=vals64.to(dtype).double(), indices=codes.indices.cpu()),
                          wd64, b_dec.cpu().double()) * target.cpu().double()).sum().backward()
    tol = 4 * torch.finfo(dtype).eps if dtype != torch.float64 else 1e-12
    assert values.grad.dtype == dtype and W_dec.grad.dtype == dtype
    torch.testing.assert_close(values.grad.cpu().double(), vals64.grad, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(W_dec.grad.cpu().double(), wd64.grad, rtol=tol, atol=tol * 10)


# ---- custom ops -----------------------------------------------------------------------------


def test_opcheck():
    W, b_enc, b_dec = _sae(5, 40, torch.float64, "cpu")
    x = _x((6, 5), torch.float64, "cpu")
    theta = torch.rand(40, generator=_gen(2))
    for args in [
        (x, W, b_enc, b_dec, None, "topk", 4.0, False, 0.001, 1 << 20),
        (x, W, b_enc, None, None, "topk", 4.0, True, 0.001, 512),
        (x, W, b_enc, b_dec, None, "relu", 0.0, False, 0.001, 1 << 20),
        (x, W, b_enc, b_dec, theta, "jumprelu", 0.0, False, 0.001, 1 << 20),
        (x, W, b_enc, b_dec, None, "batchtopk", 3.0, False, 0.001, 1 << 20),
    ]:
        torch.library.opcheck(torch.ops.repkern.sae_encode_sparse.default, args)
    for args in [(x, W, b_enc, b_dec, None, 0.001, 1 << 20, False), (x, W, b_enc, b_dec, theta, 0.001, 512, True),
                 (x.float(), W.bfloat16(), b_enc.bfloat16(), None, theta, 0.001, 512, True)]:
        torch.library.opcheck(torch.ops.repkern.sae_encode_dense.default, args)
    codes = repkern.sae_encode(x, W, b_enc, activation="topk", k=4, output="sparse")
    crow = torch.arange(0, 25, 4)
    torch.library.opcheck(torch.ops.repkern.sae_decode_sparse.default,
                          (crow, codes.indices.reshape(-1), codes.values.reshape(-1), W.mT.contiguous(), b_dec))


def test_torch_compile_fullgraph_training_step():
    W, b_enc, b_dec = _sae(8, 64, torch.float32, "cpu")
    params = [t.clone().requires_grad_() for t in (W, W.mT.contiguous(), b_enc, b_dec)]

    def loss(x, W_enc, W_dec, b_enc, b_dec):
        codes = repkern.sae_encode(x, W_enc, b_enc, b_dec=b_dec, activation="topk", k=5, output="sparse")
        recon = repkern.sae_decode(codes, W_dec, b_dec)
        dense = repkern.sae_encode(x, W_enc, b_enc, b_dec=b_dec)
        csr = repkern.sae_encode(x, W_enc, b_enc, b_dec=b_dec, activation="batchtopk", k=3, output="sparse")
        csr_recon = repkern.sae_decode(csr, W_dec, b_dec)  # data-dependent nnz
        return (recon - x).square().mean() + 1e-3 * dense.abs().mean() + (csr_recon - x).square().mean()

    x = _x((12, 8), torch.float32, "cpu")
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    out = compiled(x, *params)
    out.backward()
    eager_params = [t.detach().clone().requires_grad_() for t in params]
    expected = loss(x, *eager_params)
    expected.backward()
    torch.testing.assert_close(out, expected)
    for a, b in zip(params, eager_params):
        torch.testing.assert_close(a.grad, b.grad)


# ---- torch.sparse forms --------------------------------------------------------------------


@pytest.mark.parametrize("batch_shape", [(), (7,), (2, 3)])
def test_to_torch_sparse(batch_shape):
    W, b_enc, b_dec = _sae(8, 40, torch.float32, "cpu")
    x = _x((*batch_shape, 8), torch.float32, "cpu")
    topk = repkern.sae_encode(x, W, b_enc, b_dec=b_dec, activation="topk", k=5, output="sparse")
    coo = topk.to_sparse_coo()
    assert coo.layout == torch.sparse_coo and coo.shape == (*batch_shape, 40)
    assert coo._nnz() == 5 * math.prod(batch_shape)
    assert torch.equal(coo.to_dense(), topk.to_dense())
    relu = repkern.sae_encode(x, W, b_enc, b_dec=b_dec, output="sparse")
    csr = relu.to_sparse_csr()
    assert csr.layout == torch.sparse_csr and csr.shape == (math.prod(batch_shape), 40)
    assert torch.equal(csr.to_dense().reshape(relu.shape), relu.to_dense())


def test_to_torch_sparse_rejects_out_of_range_indices():
    # Codes built by hand: torch's invariant check, not a memory error.
    with pytest.raises(RuntimeError):
        SparseCodes(torch.ones(2, 3), torch.tensor([[0, 1, 9], [0, 1, 2]]), 4).to_sparse_coo()
    with pytest.raises(RuntimeError):
        CsrCodes(torch.tensor([0, 1, 2]), torch.tensor([0, 9]), torch.ones(2), (2, 4)).to_sparse_csr()
