"""SAE encoding and decoding: ``repkern.sae_encode`` / ``repkern.sae_decode`` and their custom ops.

Fused chunked encode: x' = x − b_dec (N, d_in) once, then d_sae in column chunks
(and N in row blocks) sized so that one chunk of pre-activations, in the
accumulation dtype, stays within a byte budget (``chunk_bytes`` argument, env
``REPKERN_SAE_CHUNK_BYTES``, default 32 MiB). Per chunk, torch.matmul computes
x' W_enc[:, chunk] and ONE native kernel adds b_enc and applies the activation:
writing dense codes, compacting nonzeros (CSR), or merging each row's running
top-k — so TopK and sparse outputs never hold [N, d_sae].

Instead of the usual folding of b_dec into the bias (b_enc' = b_enc − b_dec W_enc),
repkern subtracts b_dec from x: it costs N·d_in instead of d_in·d_sae
operations and avoids the cancellation of x W − b_dec W when x ≈ b_dec (b_dec is
usually the data's median, far larger than the deviations).

Custom ops (fake impls and autograd registered):
  repkern::sae_encode_dense(x (N,d_in), W_enc, b_enc, b_dec?, threshold?, bandwidth, chunk_bytes,
      count_firings) -> (codes (N, d_sae) in W_enc's dtype, firings (d_sae,) int64 or (0,))
  repkern::sae_encode_sparse(x, W_enc, b_enc, b_dec?, threshold?, activation, k, relu_first,
      bandwidth, chunk_bytes) -> (crow (N+1,), cols (nnz,), values (nnz,) in the acc dtype)
  repkern::sae_decode_sparse(crow, cols, values, W_dec, b_dec?) -> (N, d_in)
  repkern::sae_spmm, repkern::sae_sddmm: the gathers below, used by the backward passes
Sparse backward touches only the stored (row, column) pairs: W_enc and b_enc
gradients by a gather over the columns' entries (CSC), the x gradient by a
gather of W_enc rows, the decode's value gradients by one dot product per entry.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from repkern import _common, _native, _validation, reference
from repkern._constants import SAE_MAX_TOPK
from repkern.results.sae import CsrCodes, SparseCodes

__all__ = ["sae_encode", "sae_decode", "DEFAULT_CHUNK_BYTES"]

SAE_ACTIVATE = _native.kernel("sae_activate")
SAE_SPARSIFY = _native.kernel("sae_sparsify")
SAE_TOPK_MERGE = _native.kernel("sae_topk_merge")
SAE_SPMM = _native.kernel("sae_spmm")
SAE_SDDMM = _native.kernel("sae_sddmm")

DEFAULT_CHUNK_BYTES = 32 << 20
CHUNK_ALIGN = 128  # chunk widths are multiples of this (vector loads stay aligned)


def chunk_budget(chunk_bytes: Optional[int]) -> int:
    """The chunk budget in bytes: the argument, else REPKERN_SAE_CHUNK_BYTES, else 32 MiB."""
    return _validation.byte_budget("chunk_bytes", chunk_bytes, env="REPKERN_SAE_CHUNK_BYTES",
                                   default=DEFAULT_CHUNK_BYTES)


def plan_chunks(n_rows: int, d_in: int, d_sae: int, acc_size: int, min_cols: int, budget: int,
                cast_weights: bool) -> tuple[int, int]:
    """(rows per block, columns per chunk): one chunk of pre-activations (rows × cols
    × acc_size), plus the chunk of W_enc cast to the acc dtype when `cast_weights`,
    fits `budget` — unless even `min_cols` columns of a single row do not."""
    per_col_weights = d_in * acc_size if cast_weights else 0
    cols = budget // max(1, n_rows * acc_size + per_col_weights)
    cols = min(d_sae, max(min_cols, cols // CHUNK_ALIGN * CHUNK_ALIGN))
    rows = (budget - cols * per_col_weights) // max(1, cols * acc_size)
    return max(1, min(n_rows, rows)), cols


def _chunk_gemm(xa: Tensor, W: Tensor, c0: int, c1: int, out: Tensor) -> None:
    """out (rows, c1 − c0) = xa (rows, d_in) · W[:, c0:c1], accumulated in out.dtype."""
    w = W[:, c0:c1]
    if w.dtype == out.dtype:
        torch.matmul(xa, w, out=out)
        return
    if w.is_cuda:  # 16-bit GEMM with float32 output (recent torch); x' rounded to W's dtype
        try:
            out.copy_(torch.mm(xa.to(w.dtype), w, out_dtype=out.dtype))
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    torch.matmul(xa, w.to(out.dtype), out=out)


def _chunks(xa: Tensor, W: Tensor, min_cols: int, budget: int):
    """Yields (r0, r1, c0, c1, pre) over row blocks and column chunks; `pre` (rows, cols)
    holds xa[r0:r1] · W[:, c0:c1] in xa's dtype (one buffer, reused)."""
    n, d_in = xa.shape
    d_sae = W.shape[1]
    acc = xa.dtype
    rows, cols = plan_chunks(n, d_in, d_sae, acc.itemsize, min_cols, budget,
                             W.dtype != acc and not W.is_cuda)
    buffer = torch.empty(rows * cols, dtype=acc, device=xa.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        for c0 in range(0, d_sae, cols):
            c1 = min(d_sae, c0 + cols)
            pre = buffer[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            _chunk_gemm(xa[r0:r1], W, c0, c1, pre)
            yield r0, r1, c0, c1, pre


def _centered_input(x: Tensor, b_dec: Optional[Tensor]) -> Tensor:
    """x' = x − b_dec (N, d_in) in the accumulation dtype."""
    xa = x.to(_common.acc_dtype(x.dtype))
    return xa - b_dec.to(xa.dtype) if b_dec is not None else xa.contiguous()


# ---- forward passes ------------------------------------------------------------------


def _topk_native(xa, W, bias, k, relu_first, budget):
    n = xa.shape[0]
    vals = torch.empty((n, k), dtype=xa.dtype, device=xa.device)
    cols = torch.empty((n, k), dtype=torch.int64, device=xa.device)
    for r0, r1, c0, c1, pre in _chunks(xa, W, max(k, CHUNK_ALIGN), budget):
        _native.call(SAE_TOPK_MERGE, xa.device, pre, bias[c0:c1], vals[r0:r1], cols[r0:r1], c0, c0 == 0,
                     relu_first)
    return vals, cols


def _topk_torch(xa, W, bias, k, relu_first, budget):
    """Same contract as the native merge for k > SAE_MAX_TOPK: stable sorts keep the
    lower column first among equal values (state columns precede the chunk's)."""
    n = xa.shape[0]
    vals = torch.empty((n, k), dtype=xa.dtype, device=xa.device)
    cols = torch.empty((n, k), dtype=torch.int64, device=xa.device)
    state = {}
    for r0, r1, c0, c1, pre in _chunks(xa, W, max(k, CHUNK_ALIGN), budget):
        h = pre + bias[c0:c1]
        ranked = torch.relu(h) if relu_first else h
        v, i = torch.sort(ranked, dim=1, descending=True, stable=True)
        v, i = v[:, :k], i[:, :k] + c0
        if r0 in state:
            v, i = torch.cat([state[r0][0], v], 1), torch.cat([state[r0][1], i], 1)
            v, order = torch.sort(v, dim=1, descending=True, stable=True)
            v, i = v[:, :k], i.gather(1, order[:, :k])
        state[r0] = (v, i)
        if c1 == W.shape[1]:
            vals[r0:r1], cols[r0:r1] = state.pop(r0)
    return vals, cols


def topk_candidates(xa: Tensor, W: Tensor, bias: Tensor, k: int, relu_first: bool, budget: int):
    """Each row's k best (h or relu(h) when relu_first, h = xa W + bias) without the
    dense h: (values (N, k) in xa's dtype, sorted by rank; columns (N, k) int64).
    Ties: lower column first. NaN ranks above every number."""
    run = _topk_native if k <= SAE_MAX_TOPK else _topk_torch
    return run(xa, W, bias, k, relu_first, budget)


def _ge_nan_high(v: Tensor, ref: Tensor) -> Tensor:
    """v >= ref in the ranking order (NaN above every number)."""
    return torch.isnan(v) if bool(torch.isnan(ref)) else (v >= ref) | torch.isnan(v)


def _batch_topk(xa, W, bias, k_avg, budget):
    """BatchTopK: the int(k·N) largest relu(h) over all N rows, as (rows, cols, values)
    sorted row-major; zeros dropped. Exact: each row contributes its top-kc candidates,
    and kc doubles until no row's last candidate could tie with or beat the cut."""
    n, d_sae = xa.shape[0], W.shape[1]
    keep = _common.batch_topk_count(k_avg, n)
    if keep == 0:
        empty = torch.empty(0, dtype=torch.int64, device=xa.device)
        return empty, empty, xa.new_empty(0)
    kc = min(d_sae, max(1, 2 * -(-keep // n)))
    while True:
        vals, cols = topk_candidates(xa, W, bias, kc, True, budget)
        flat = vals.reshape(-1)
        order = torch.sort(flat, descending=True, stable=True).indices[:keep]
        if kc == d_sae:
            break
        cut = flat[order[-1]]
        last = vals[:, -1]
        if not bool((_ge_nan_high(last, cut) & (last != 0)).any()):
            break
        kc = min(d_sae, 2 * kc)
    selected = order[flat[order] != 0]
    rows = selected // kc
    sel_cols = cols.reshape(-1)[selected]
    sorted_pos = torch.argsort(rows * d_sae + sel_cols)
    return rows[sorted_pos], sel_cols[sorted_pos], flat[selected][sorted_pos]


def _csr_threshold(xa, W, bias, theta, budget):
    """Nonzero codes relu(h)·[h > θ] (θ None: ReLU) as (crow, cols, values): per chunk a
    count pass and a write pass of the native kernel, then the chunks' pieces are
    placed row by row (O(nnz))."""
    n = xa.shape[0]
    device = xa.device
    row_totals = torch.zeros(n, dtype=torch.int64, device=device)
    pieces = []  # (r0, c0, counts, cols, vals)
    error = _native.index_error_word(device)  # of every write pass, read once at the end
    for r0, r1, c0, c1, pre in _chunks(xa, W, CHUNK_ALIGN, budget):
        th = theta[c0:c1] if theta is not None else None
        counts = torch.empty(r1 - r0, dtype=torch.int64, device=device)
        _native.call(SAE_SPARSIFY, device, pre, bias[c0:c1], th, counts, None, None, None, None, c0)
        offsets = counts.cumsum(0) - counts
        nnz = int(counts.sum())
        cols = torch.empty(nnz, dtype=torch.int64, device=device)
        vals = torch.empty(nnz, dtype=xa.dtype, device=device)
        _native.call(SAE_SPARSIFY, device, pre, bias[c0:c1], th, None, offsets, cols, vals, error, c0)
        pieces.append((r0, counts, offsets, cols, vals))
    _native.raise_index_errors(error)
    crow = torch.zeros(n + 1, dtype=torch.int64, device=device)
    for r0, counts, *_ in pieces:
        row_totals[r0 : r0 + counts.numel()] += counts
    crow[1:] = row_totals.cumsum(0)
    total = int(crow[-1])
    out_cols = torch.empty(total, dtype=torch.int64, device=device)
    out_vals = torch.empty(total, dtype=xa.dtype, device=device)
    filled = crow[:-1].clone()  # next free position of each row (chunks come in column order)
    for r0, counts, offsets, cols, vals in pieces:
        rb = counts.numel()
        local = torch.arange(rb, device=device).repeat_interleave(counts, output_size=cols.numel())
        dest = filled[r0 + local] + (torch.arange(cols.numel(), device=device) - offsets[local])
        out_cols[dest] = cols
        out_vals[dest] = vals
        filled[r0 : r0 + rb] += counts
    return crow, out_cols, out_vals


def _csr_from_rows(rows: Tensor, cols: Tensor, vals: Tensor, n: int):
    crow = torch.zeros(n + 1, dtype=torch.int64, device=cols.device)
    crow[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    return crow, cols, vals


# ---- repkern::sae_encode_sparse ------------------------------------------------------


@torch.library.custom_op("repkern::sae_encode_sparse", mutates_args=())
def _encode_sparse_op(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Optional[Tensor], threshold: Optional[Tensor], activation: str,
    k: float, relu_first: bool, bandwidth: float, chunk_bytes: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """x (N, d_in), weights in one dtype -> CSR (crow (N+1,), cols (nnz,), values (nnz,) acc).
    activation: 'topk' (k per row, rows in rank order), 'batchtopk' (int(k·N) over the
    batch), 'relu' / 'jumprelu' (threshold (d_sae,) float32)."""
    n = x.shape[0]
    xa = _centered_input(x, b_dec)
    bias = b_enc.to(xa.dtype)
    if activation == "topk":
        vals, cols = topk_candidates(xa, W_enc, bias, int(k), relu_first, chunk_bytes)
        crow = torch.arange(0, n * int(k) + 1, int(k), dtype=torch.int64, device=x.device)
        return crow, cols.reshape(-1), torch.relu(vals).reshape(-1)
    if activation == "batchtopk":
        rows, cols, vals = _batch_topk(xa, W_enc, bias, k, chunk_bytes)
        return _csr_from_rows(rows, cols, vals, n)
    return _csr_threshold(xa, W_enc, bias, threshold, chunk_bytes)


@_encode_sparse_op.register_fake
def _(x, W_enc, b_enc, b_dec, threshold, activation, k, relu_first, bandwidth, chunk_bytes):
    n = x.shape[0]
    nnz = n * int(k) if activation == "topk" else torch.library.get_ctx().new_dynamic_size()
    acc = _common.acc_dtype(x.dtype)
    return (x.new_empty((n + 1,), dtype=torch.int64), x.new_empty((nnz,), dtype=torch.int64),
            x.new_empty((nnz,), dtype=acc))


def _encode_sparse_setup(ctx, inputs, output):
    x, W_enc, b_enc, b_dec, threshold, activation, k, relu_first, bandwidth, chunk_bytes = inputs
    crow, cols, vals = output
    ctx.mark_non_differentiable(crow, cols)
    ctx.bandwidth = bandwidth
    ctx.has_b_dec = b_dec is not None
    ctx.dtypes = (x.dtype, W_enc.dtype, b_enc.dtype, b_dec.dtype if b_dec is not None else None)
    ctx.save_for_backward(x, W_enc, b_dec, threshold, crow, cols, vals)


# The two gathers as custom ops of their own, so that the backward passes that use
# them can be traced (torch.compile) like any other torch code.


@torch.library.custom_op("repkern::sae_spmm", mutates_args=())
def _spmm_op(crow: Tensor, cols: Tensor, vals: Tensor, dense: Optional[Tensor], bias: Optional[Tensor]
             ) -> tuple[Tensor, Tensor]:
    """CSR rows × dense (K, D): (Σ_e vals[e] · dense[cols[e]] (+ bias) (rows, D) in vals'
    dtype — (0, 0) without dense —, Σ_e vals[e] (rows,) in the accumulation dtype).
    ValueError unless crow rises from 0 to nnz and (with dense) cols lie in [0, K): checked by the
    kernels, whatever the caller did (on CUDA the check costs one sync)."""
    rows = crow.numel() - 1
    out = vals.new_empty((rows, dense.shape[1]) if dense is not None else (0, 0))
    sums = vals.new_empty((rows,), dtype=_common.acc_dtype(vals.dtype))
    error = _native.index_error_word(vals.device)
    _native.call(SAE_SPMM, vals.device, crow, cols, vals, dense, bias, out if dense is not None else None, sums,
                 error)
    _native.raise_index_errors(error)
    return out, sums


@_spmm_op.register_fake
def _(crow, cols, vals, dense, bias):
    rows = crow.shape[0] - 1
    return (vals.new_empty((rows, dense.shape[1]) if dense is not None else (0, 0)),
            vals.new_empty((rows,), dtype=_common.acc_dtype(vals.dtype)))


@torch.library.custom_op("repkern::sae_sddmm", mutates_args=())
def _sddmm_op(rows: Tensor, cols: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """a[rows[e]] · b[cols[e]] for each entry e -> (nnz,) in the accumulation dtype. ValueError for
    an index outside a's or b's rows (checked by the kernels; on CUDA one sync)."""
    out = a.new_empty(rows.shape, dtype=_common.acc_dtype(a.dtype))
    error = _native.index_error_word(a.device)
    _native.call(SAE_SDDMM, a.device, rows, cols, a, b, out, error)
    _native.raise_index_errors(error)
    return out


@_sddmm_op.register_fake
def _(rows, cols, a, b):
    return a.new_empty(rows.shape, dtype=_common.acc_dtype(a.dtype))


def _csc(crow: Tensor, cols: Tensor, d_sae: int):
    """The transpose of a CSR pattern: (col_ptr (d_sae+1,), rows of the entries sorted by
    column (stable), the permutation)."""
    rows = CsrCodes(crow, cols, cols, ()).row_indices()
    order = torch.sort(cols, stable=True).indices
    counts = torch.zeros(d_sae, dtype=torch.int64, device=cols.device).scatter_add_(0, cols, torch.ones_like(cols))
    col_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return col_ptr, rows[order], order


def _encode_sparse_backward(ctx, _g_crow, _g_cols, g_vals):
    x, W_enc, b_dec, threshold, crow, cols, vals = ctx.saved_tensors
    need_x, need_w, need_b, need_bdec, need_theta = ctx.needs_input_grad[:5]
    n, d_in = x.shape
    d_sae = W_enc.shape[1]
    acc = vals.dtype
    g = g_vals.to(acc) if g_vals is not None else torch.zeros_like(vals)
    gh = torch.where(vals > 0, g, torch.zeros_like(g))  # ReLU: stored codes with h > 0
    grads = [None] * 10
    if need_w or need_b or need_bdec or need_theta:
        col_ptr, csc_rows, order = _csc(crow, cols, d_sae)
        dense = _centered_input(x, b_dec) if need_w else None
        gw_t, g_bias = torch.ops.repkern.sae_spmm(col_ptr, csc_rows, gh[order], dense, None)
        if need_w:
            grads[1] = gw_t.mT.to(ctx.dtypes[1])
        if need_b:
            grads[2] = g_bias.to(ctx.dtypes[2])
        if need_bdec:
            grads[3] = -(W_enc.to(acc) @ g_bias).to(ctx.dtypes[3])
        if need_theta:  # JumpReLU straight-through estimator on the stored codes
            th = threshold.to(acc)[cols]
            term = -(th / ctx.bandwidth) * _common.rectangle((vals - th) / ctx.bandwidth) * g
            _, g_theta = torch.ops.repkern.sae_spmm(col_ptr, csc_rows, term[order], None, None)
            grads[4] = g_theta.to(threshold.dtype)
    if need_x:
        w_rows = W_enc.to(acc).mT.contiguous()  # (d_sae, d_in): rows gathered with full-width loads
        gx, _ = torch.ops.repkern.sae_spmm(crow, cols, gh, w_rows, None)
        grads[0] = gx.to(ctx.dtypes[0])
    return tuple(grads)


_encode_sparse_op.register_autograd(_encode_sparse_backward, setup_context=_encode_sparse_setup)


# ---- repkern::sae_encode_dense -------------------------------------------------------


@torch.library.custom_op("repkern::sae_encode_dense", mutates_args=())
def _encode_dense_op(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Optional[Tensor], threshold: Optional[Tensor], bandwidth: float,
    chunk_bytes: int, count_firings: bool,
) -> tuple[Tensor, Tensor]:
    """x (N, d_in) -> (relu(h)·[h > θ] (N, d_sae) in W_enc's dtype (θ None: ReLU),
    firings (d_sae,) int64 when count_firings, else (0,))."""
    n = x.shape[0]
    d_sae = W_enc.shape[1]
    xa = _centered_input(x, b_dec)
    bias = b_enc.to(xa.dtype)
    out = torch.empty((n, d_sae), dtype=W_enc.dtype, device=x.device)
    fire = torch.zeros(d_sae if count_firings else 0, dtype=torch.int64, device=x.device)
    fire_arg = fire if count_firings else None
    if n == 0:
        return out, fire
    if out.dtype == xa.dtype:  # one GEMM into the output, activation in place: one [N, d_sae] buffer
        torch.matmul(xa, W_enc, out=out)
        _native.call(SAE_ACTIVATE, x.device, out, bias, threshold, out, fire_arg)
    else:
        for r0, r1, c0, c1, pre in _chunks(xa, W_enc, CHUNK_ALIGN, chunk_bytes):
            th = threshold[c0:c1] if threshold is not None else None
            f = fire[c0:c1] if count_firings else None
            _native.call(SAE_ACTIVATE, x.device, pre, bias[c0:c1], th, out[r0:r1, c0:c1], f)
    return out, fire


@_encode_dense_op.register_fake
def _(x, W_enc, b_enc, b_dec, threshold, bandwidth, chunk_bytes, count_firings):
    d_sae = W_enc.shape[1]
    return (x.new_empty((x.shape[0], d_sae), dtype=W_enc.dtype),
            x.new_empty((d_sae if count_firings else 0,), dtype=torch.int64))


def _encode_dense_setup(ctx, inputs, output):
    x, W_enc, b_enc, b_dec, threshold, bandwidth, chunk_bytes, count_firings = inputs
    out, fire = output
    ctx.mark_non_differentiable(fire)
    ctx.bandwidth, ctx.chunk_bytes = bandwidth, chunk_bytes
    ctx.dtypes = (x.dtype, W_enc.dtype, b_enc.dtype, b_dec.dtype if b_dec is not None else None)
    ctx.save_for_backward(x, W_enc, b_enc, b_dec, threshold, out)


def _encode_dense_backward(ctx, grad, _g_fire):
    """Column chunk by chunk: dh = g·[code ≠ 0] (h > θ), then dense GEMMs; θ's
    estimator needs h near θ, so h is recomputed per chunk when θ needs a gradient."""
    x, W_enc, b_enc, b_dec, threshold, out = ctx.saved_tensors
    need_x, need_w, need_b, need_bdec, need_theta = ctx.needs_input_grad[:5]
    n, d_in = x.shape
    d_sae = W_enc.shape[1]
    xa = _centered_input(x, b_dec)
    acc = xa.dtype
    gx = torch.zeros((n, d_in), dtype=acc, device=x.device) if need_x else None
    gw = torch.empty((d_in, d_sae), dtype=acc, device=x.device) if need_w else None
    g_bias = torch.empty(d_sae, dtype=acc, device=x.device)
    g_theta = torch.empty(d_sae, dtype=acc, device=x.device) if need_theta else None
    _, cols = plan_chunks(max(n, 1), d_in, d_sae, acc.itemsize, CHUNK_ALIGN, ctx.chunk_bytes, True)
    for c0 in range(0, d_sae, cols):
        c1 = min(d_sae, c0 + cols)
        g = grad[:, c0:c1].to(acc)
        gh = torch.where(out[:, c0:c1] != 0, g, torch.zeros_like(g))
        w = W_enc[:, c0:c1].to(acc)
        if need_x:
            gx.addmm_(gh, w.mT)
        if need_w:
            gw[:, c0:c1] = xa.mT @ gh
        g_bias[c0:c1] = gh.sum(0)
        if need_theta:
            h = xa @ w + b_enc[c0:c1].to(acc)
            th = threshold[c0:c1].to(acc)
            g_theta[c0:c1] = (-(th / ctx.bandwidth) * _common.rectangle((h - th) / ctx.bandwidth) * g).sum(0)
    grads = [None] * 8
    grads[0] = gx.to(ctx.dtypes[0]) if need_x else None
    grads[1] = gw.to(ctx.dtypes[1]) if need_w else None
    grads[2] = g_bias.to(ctx.dtypes[2]) if need_b else None
    grads[3] = -(W_enc.to(acc) @ g_bias).to(ctx.dtypes[3]) if need_bdec else None
    grads[4] = g_theta.to(threshold.dtype) if need_theta else None
    return tuple(grads)


_encode_dense_op.register_autograd(_encode_dense_backward, setup_context=_encode_dense_setup)


# ---- repkern::sae_decode_sparse ------------------------------------------------------


@torch.library.custom_op("repkern::sae_decode_sparse", mutates_args=())
def _decode_sparse_op(crow: Tensor, cols: Tensor, vals: Tensor, W_dec: Tensor, b_dec: Optional[Tensor]) -> Tensor:
    """Σ_e vals[e] · W_dec[cols[e]] + b_dec per CSR row -> (N, d_in); vals in W_dec's dtype.
    ValueError naming ``codes`` unless crow rises from 0 to nnz and cols lie in [0, d_sae): the
    kernels check it (also under torch.compile, where sae_decode's own checks are skipped)."""
    try:
        return _spmm_op(crow, cols, vals, W_dec, b_dec)[0]
    except ValueError as exc:
        raise ValueError(f"codes: not valid sparse codes for W_dec of {W_dec.shape[0]} rows (d_sae): {exc}") from None


@_decode_sparse_op.register_fake
def _(crow, cols, vals, W_dec, b_dec):
    return W_dec.new_empty((crow.shape[0] - 1, W_dec.shape[1]))


def _decode_sparse_setup(ctx, inputs, output):
    crow, cols, vals, W_dec, b_dec = inputs
    ctx.save_for_backward(crow, cols, vals, W_dec)


def _decode_sparse_backward(ctx, grad):
    crow, cols, vals, W_dec = ctx.saved_tensors
    _, _, need_vals, need_w, need_b = ctx.needs_input_grad
    grad = grad.contiguous()
    g_vals = g_w = g_b = None
    if need_vals:
        rows = CsrCodes(crow, cols, vals, ()).row_indices()
        g_vals = torch.ops.repkern.sae_sddmm(rows, cols, grad, W_dec).to(vals.dtype)
    if need_w:
        col_ptr, csc_rows, order = _csc(crow, cols, W_dec.shape[0])
        g_w, _ = torch.ops.repkern.sae_spmm(col_ptr, csc_rows, vals[order], grad, None)
    if need_b:
        g_b = grad.to(_common.acc_dtype(grad.dtype)).sum(0).to(grad.dtype)
    return None, None, g_vals, g_w, g_b


_decode_sparse_op.register_autograd(_decode_sparse_backward, setup_context=_decode_sparse_setup)


# ---- public API ----------------------------------------------------------------------


def sae_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    *,
    b_dec: Optional[Tensor] = None,
    activation: str = "relu",
    k=None,
    threshold=None,
    relu_first: bool = False,
    output: str = "dense",
    bandwidth: float = 0.001,
    chunk_bytes: Optional[int] = None,
    count_firings: bool = False,
):
    """Sparse-autoencoder codes of ``x`` (docs/conventions.md), without the dense
    pre-activation matrix for TopK and sparse outputs.

    h = (x − b_dec) W_enc + b_enc, computed in W_enc's dtype (x and the biases are
    rounded to it first) with float32 accumulation (float64 for float64 weights).

    Args:
        x: ``(..., d_in)``.
        W_enc: ``(d_in, d_sae)``.
        b_enc: ``(d_sae,)``.
        b_dec: ``(d_in,)`` pre-encoder bias subtracted from x, or None.
        activation: ``"relu"``; ``"topk"`` (the k largest h per row, then ReLU;
            ``relu_first=True``: ReLU, then the k largest — sparsify's order; the indices
            differ when fewer than k are positive); ``"jumprelu"`` (relu(h)·[h > θ],
            strict, θ = ``threshold`` (d_sae,) or scalar, float32, >= 0);
            ``"batchtopk"`` (``k``: the int(k·N) largest relu(h) over the N rows of
            the flattened batch; or ``threshold``: relu(h)·[h > θ], the inference rule).
        output: ``"dense"`` ``(..., d_sae)`` in W_enc's dtype, or ``"sparse"``:
            :class:`SparseCodes` ``(..., k)`` for TopK (sorted by rank), :class:`CsrCodes`
            otherwise (nonzero codes only).
        bandwidth: ε of JumpReLU's straight-through estimator for θ (default 0.001).
        chunk_bytes: budget for one chunk of pre-activations (default
            ``REPKERN_SAE_CHUNK_BYTES`` or 32 MiB).
        count_firings: also return ``(d_sae,)`` int64: rows in which each feature's code
            is nonzero, counted in the same pass.

    Ties: lower feature index first (TopK; BatchTopK: lower flat index). NaN: a NaN
    pre-activation ranks above every number and gives a NaN code (a NaN in a row of x
    makes that row's codes NaN; TopK then keeps features 0..k−1). Differentiable
    w.r.t. x, W_enc, b_enc, b_dec and a JumpReLU threshold (straight-through estimator;
    with sparse output only stored codes contribute — use dense output for SAELens'
    estimator). TopK/BatchTopK/sparse backward touches only the stored entries.
    """
    k, theta = _validation.check_sae_encode_args(x, W_enc, b_enc, b_dec, activation, k, threshold, relu_first, output,
                                               bandwidth)
    _validation.boolean("count_firings", count_firings)
    budget = chunk_budget(chunk_bytes)
    if _native.use_reference():
        codes = reference.sae_encode(x, W_enc, b_enc, b_dec=b_dec, activation=activation, k=k, threshold=threshold,
                                     relu_first=relu_first, output=output, bandwidth=bandwidth)
        return (codes, _firings(codes, W_enc.shape[1])) if count_firings else codes
    dtype = W_enc.dtype
    d_in, d_sae = W_enc.shape
    batch_shape = tuple(x.shape[:-1])
    x2 = x.reshape(-1, d_in).to(dtype)
    b_enc = b_enc.to(dtype)
    b_dec = b_dec.to(dtype) if b_dec is not None else None
    if activation in ("relu", "jumprelu") or theta is not None:
        theta = theta.expand(d_sae).contiguous() if theta is not None else None
        if output == "dense":
            out, fire = torch.ops.repkern.sae_encode_dense(x2, W_enc, b_enc, b_dec, theta, bandwidth, budget,
                                                           count_firings)
            codes = out.reshape(*batch_shape, d_sae)
            return (codes, fire) if count_firings else codes
        op_activation, k = "jumprelu" if theta is not None else "relu", 0.0
    else:
        op_activation = activation
    crow, cols, vals = torch.ops.repkern.sae_encode_sparse(x2, W_enc, b_enc, b_dec, theta, op_activation, float(k),
                                                           relu_first, bandwidth, budget)
    if activation == "topk":
        codes = SparseCodes(vals.to(dtype).reshape(*batch_shape, k), cols.reshape(*batch_shape, k), d_sae)
    else:
        codes = CsrCodes(crow, cols, vals.to(dtype), (*batch_shape, d_sae))
    fire = _firings(codes, d_sae) if count_firings else None
    if output == "dense":
        codes = codes.to_dense()
    return (codes, fire) if count_firings else codes


def _firings(codes, d_sae: int) -> Tensor:
    """(d_sae,) int64: rows with a nonzero code per feature, from the codes (O(nnz) for sparse codes)."""
    if isinstance(codes, SparseCodes):
        return torch.bincount(codes.indices[codes.values != 0], minlength=d_sae)
    if isinstance(codes, CsrCodes):
        return torch.bincount(codes.col_indices[codes.values != 0], minlength=d_sae)
    return (codes != 0).reshape(-1, d_sae).sum(0)


def sae_decode(codes, W_dec: Tensor, b_dec: Optional[Tensor] = None) -> Tensor:
    """Reconstruction x̂ = codes W_dec + b_dec.

    Args:
        codes: dense ``(..., d_sae)``, :class:`SparseCodes` or :class:`CsrCodes`.
        W_dec: ``(d_sae, d_in)``.
        b_dec: ``(d_in,)`` or None.

    Returns ``(..., d_in)`` in W_dec's dtype (codes are rounded to it), float32
    accumulation (float64 for float64). Sparse codes: a gather-accumulate of the
    selected W_dec rows (embedding-bag style; its backward gives the values one dot
    product each and W_dec a gather over each feature's entries). Differentiable
    w.r.t. the code values, W_dec and b_dec. Indices outside ``[0, d_sae)``, and
    :class:`CsrCodes` whose ``crow_indices`` do not rise from 0 to nnz, raise
    ``ValueError`` naming ``codes`` — also under ``torch.compile``, where the Python
    checks are skipped: the native kernels check every index they read (on CUDA at the
    cost of one device sync per call).
    """
    _validation.check_sae_decode_args(codes, W_dec, b_dec)
    if _native.use_reference():
        return reference.sae_decode(codes, W_dec, b_dec)
    dtype = W_dec.dtype
    b = b_dec.to(dtype) if b_dec is not None else None
    if isinstance(codes, (SparseCodes, CsrCodes)):
        W_dec = W_dec.contiguous()  # rows are gathered whole
    if isinstance(codes, SparseCodes):
        batch_shape = tuple(codes.values.shape[:-1])
        n, k = math.prod(batch_shape), codes.values.shape[-1]
        crow = torch.arange(0, n * k + 1, k, dtype=torch.int64, device=W_dec.device)
        out = torch.ops.repkern.sae_decode_sparse(crow, codes.indices.reshape(-1),
                                                  codes.values.reshape(-1).to(dtype), W_dec, b)
        return out.reshape(*batch_shape, W_dec.shape[1])
    if isinstance(codes, CsrCodes):
        out = torch.ops.repkern.sae_decode_sparse(codes.crow_indices, codes.col_indices, codes.values.to(dtype),
                                                  W_dec, b)
        return out.reshape(*codes.shape[:-1], W_dec.shape[1])
    acc = _common.acc_dtype(dtype)
    out = codes.to(dtype).to(acc) @ W_dec.to(acc)
    if b is not None:
        out = out + b.to(acc)
    return out.to(dtype)
