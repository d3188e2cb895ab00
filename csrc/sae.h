// SAE encode/decode launchers: CPU (cpu/sae.cpp) and CUDA (cuda/sae.cu, also
// compiled into the emulator). Same contract; math in common/sae_math.h.
//
// The encoder GEMM is done by torch in column chunks; per chunk `pre` holds
// x' W_enc[:, col0 : col0 + cols] (acc dtype A: float32, or float64 for float64
// inputs). Each kernel adds the chunk's bias and applies the activation
// (threshold θ per column, float32; null = ReLU) on the fly:
//   sae_activate   dense codes (may write in place over `pre`), firing counts
//   sae_sparsify   CSR pieces: count nonzeros per row, then write (column, value)
//   sae_topk_merge merge each row's running top-k (values, columns) with the chunk
// Sparse codes and gradients use two gathers:
//   sae_spmm   out[r] = Σ_{e in row r} vals[e] · dense[cols[e]] (+ bias)  (decode, x / W_enc grads)
//   sae_sddmm  out[e] = a[rows[e]] · b[cols[e]]                          (decode grad of the values)
// Index arrays (crow, cols, rows_of, cols_of, the sparsify offsets) are checked by every launcher
// (common/index_check.h): the CPU ones throw, the CUDA kernels skip a bad index and OR its IndexError
// bit into `error` ([1] int32, zero-filled), which the caller reads after the launch.
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/index_check.h"
#include "cpu/isa.h"

namespace repkern {

// A: the accumulation dtype, float32 (or float64 for float64 data).
struct SaeActivateParams {
  DType acc_dtype, out_dtype;
  const void* pre;  // [rows, cols] acc, rows ld_pre apart
  int64_t ld_pre;
  const void* bias;    // [cols] acc
  const float* theta;  // [cols] or null (ReLU)
  void* out;           // [rows, cols] out_dtype, rows ld_out apart; may be pre
  int64_t ld_out;
  int64_t* fire_counts;  // [cols] += rows with a nonzero code, or null
  int64_t rows, cols;
};

struct SaeSparsifyParams {
  DType acc_dtype;
  const void* pre;         // [rows, cols] acc, contiguous
  const void* bias;        // [cols] acc
  const float* theta;      // [cols] or null (ReLU)
  int64_t* counts;         // [rows] nonzeros per row (count pass), or null (write pass)
  const int64_t* offsets;  // [rows] first output position per row (write pass; each write is checked)
  int64_t* out_cols;       // [nnz] column (col0 + j) of each nonzero (write pass)
  void* out_vals;          // [nnz] acc, its value (write pass)
  int32_t* error;          // [1] IndexError bits (write pass): kBadOffsets
  int64_t rows, cols, col0, nnz;
};

struct SaeTopkMergeParams {
  DType acc_dtype;
  const void* pre;    // [rows, cols] acc, contiguous
  const void* bias;   // [cols] acc
  void* top_vals;     // [rows, k] acc, running top-k sorted by rank (in/out)
  int64_t* top_cols;  // [rows, k] their columns (in/out)
  int64_t rows, cols, col0;
  int k;
  bool first;       // the state holds nothing yet (cols >= k)
  bool relu_first;  // rank relu(h) (sparsify order) instead of h
};

struct SaeSpmmParams {
  DType dtype;
  const int64_t* crow;  // [rows + 1] CSR row pointers: 0 = crow[0] <= ... <= crow[rows] = nnz (checked)
  const int64_t* cols;  // [nnz] column = row of `dense`, in [0, K) (checked when dense is read)
  const void* vals;     // [nnz] dtype
  const void* dense;    // [K, D] dtype, or null (row sums only)
  const void* bias;     // [D] dtype or null
  void* out;            // [rows, D] dtype (with dense)
  void* row_sums;       // [rows] acc: Σ vals of each row, or null
  int32_t* error;       // [1] IndexError bits: kBadCrow, kBadCols
  int64_t rows, D, nnz, K;
};

struct SaeSddmmParams {
  DType dtype;
  const int64_t* rows_of;  // [nnz] row of `a`, in [0, R) (checked)
  const int64_t* cols_of;  // [nnz] row of `b`, in [0, K) (checked)
  const void* a;           // [R, D] dtype
  const void* b;           // [K, D] dtype
  void* out;               // [nnz] acc
  int32_t* error;          // [1] IndexError bits: kBadRowsOf, kBadColsOf
  int64_t nnz, D, R, K;
};

namespace cpu {
REPKERN_CPU_KERNEL(sae_activate, SaeActivateParams)
REPKERN_CPU_KERNEL(sae_sparsify, SaeSparsifyParams)
REPKERN_CPU_KERNEL(sae_topk_merge, SaeTopkMergeParams)
REPKERN_CPU_KERNEL(sae_spmm, SaeSpmmParams)
REPKERN_CPU_KERNEL(sae_sddmm, SaeSddmmParams)
}  // namespace cpu
namespace cuda {
void sae_activate(const SaeActivateParams& p, void* stream);  // stream: cudaStream_t
void sae_sparsify(const SaeSparsifyParams& p, void* stream);
void sae_topk_merge(const SaeTopkMergeParams& p, void* stream);
void sae_spmm(const SaeSpmmParams& p, void* stream);
void sae_sddmm(const SaeSddmmParams& p, void* stream);
}  // namespace cuda

}  // namespace repkern
