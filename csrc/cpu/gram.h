// CPU Gram epilogue (same contract as cuda/gram.h).
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/gram_math.h"

namespace repkern::cpu {

void gram_epilogue(GramKind kind, GramPass pass, DType acc_dtype, DType out_dtype,
                   const void* inner,     // [B, n, n] acc_dtype, x_i·x_j; upper triangle read
                   const void* aux,       // [B, n] acc_dtype, per-row factor (gram_math.h) or null
                   void* out,             // [B, n, n] out_dtype (Write, WriteCentered); may be inner
                   const void* scale,     // [B] acc_dtype, −1/(2σ²) (Rbf) or null
                   double* row_sums,      // [B, n] Σ_j K_ij: RowSums fills it (pass zeros), WriteCentered reads it
                   const double* totals,  // [B] Σ_ij K_ij (WriteCentered) or null
                   int64_t batch, int64_t n, int num_threads);

}  // namespace repkern::cpu
