// Gram epilogue launchers: CPU (cpu/gram.cpp) and CUDA (cuda/gram.cu, also
// compiled into the emulator). Same contract; math in common/gram_math.h.
//
// Turns inner products g_ij = x_i·x_j into Gram matrices (GramKind) in one pass
// (GramPass): only upper tiles (ti <= tj) of `inner` are read, both triangles of
// `out` are written, and `out` may be `inner` (in place).
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/gram_math.h"
#include "cpu/isa.h"

namespace repkern {

struct GramEpilogueParams {
  GramKind kind;
  GramPass pass;
  DType acc_dtype;  // of inner, aux and scale: float32 or float64 (float64 only with float64 out)
  DType out_dtype;
  const void* inner;     // [batch, n, n] acc_dtype, x_i·x_j; upper tiles read
  const void* aux;       // [batch, n] acc_dtype, per-row factor (gram_math.h) or null
  void* out;             // [batch, n, n] out_dtype (Write, WriteCentered); may be inner
  const void* scale;     // [batch] acc_dtype, −1/(2σ²) (Rbf, RbfFromSqDist) or null
  double* row_sums;      // [batch, n] Σ_j K_ij: RowSums fills it (pass zeros), WriteCentered reads
  const double* totals;  // [batch] Σ_ij K_ij (WriteCentered) or null
  int64_t batch, n;
};

// The RBF median bandwidth's order statistics, CPU only (on CUDA, torch.kthvalue is a radix select
// already): for each batch matrix and rank k, the k-th smallest of the n(n−1)/2 entries d_ij, i < j, and
// its flat position i·n + j, the lowest among the entries equal to it (every NaN equal, −0 equal to +0).
// The result does not depend on the thread count.
struct MedianSelectParams {
  DType dtype;                            // of d and values: float32 or float64
  const void* d;                          // [batch, n, n] dtype; only the strict upper triangle is read
  int64_t ranks[kMedianSelectMaxRanks];   // 1-based, in [1, n(n−1)/2]
  int num_ranks;                          // 1 or 2
  void* values;                           // [batch, num_ranks] dtype: the selected entries
  int64_t* positions;                     // [batch, num_ranks] int64: their flat positions i·n + j
  int64_t batch, n;
};

// x xᵀ of float32 matrices of small width d, both triangles, CPU only: the linear Gram's inner products
// where one register-tiled pass, each upper strip mirrored while it is in cache, beats torch's GEMM strips
// followed by the epilogue's mirror pass (and a full bmm: half the FLOPs). Exactly symmetric.
struct InnerProductsParams {
  const float* x;  // [batch, n, d] float32
  float* out;      // [batch, n, n] float32: x xᵀ
  int64_t batch, n, d;
};

// ‖xᵀx‖²_F of float32 matrices in float64, CPU only: the self terms of the feature-space linear CKA.
// xᵀx is symmetric, so one register-tiled pass over its upper block triangle (half the FLOPs of the GEMM)
// squares each tile once it is complete; neither the d × d product nor a copy of x is stored (scratch: a
// block of kXtxBlock rows of one strip and its tiles, per thread). Each tile accumulates in float32 over
// blocks of kXtxBlock rows of x and in float64 across blocks. The result does not depend on the thread count.
struct XtxSqNormParams {
  const float* x;  // [batch, n, d] float32
  double* out;     // [batch] float64: Σ_ij ((xᵀx)_ij)²
  int64_t batch, n, d;
};

namespace cpu {
REPKERN_CPU_KERNEL(gram_epilogue, GramEpilogueParams)
REPKERN_CPU_KERNEL(median_select, MedianSelectParams)
REPKERN_CPU_KERNEL(inner_products, InnerProductsParams)
REPKERN_CPU_KERNEL(xtx_sq_norm, XtxSqNormParams)
}
namespace cuda {
void gram_epilogue(const GramEpilogueParams& p, void* stream);  // stream: cudaStream_t
}

}  // namespace repkern
