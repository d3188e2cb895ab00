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

namespace cpu {
REPKERN_CPU_KERNEL(gram_epilogue, GramEpilogueParams)
}
namespace cuda {
void gram_epilogue(const GramEpilogueParams& p, void* stream);  // stream: cudaStream_t
}

}  // namespace repkern
