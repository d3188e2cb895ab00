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

#define REPKERN_GRAM_EPILOGUE_ARGS                                                                       \
  GramKind kind, GramPass pass, DType acc_dtype, DType out_dtype,                                       \
      const void* inner,     /* [B, n, n] acc_dtype, x_i·x_j; upper tiles read                     */ \
      const void* aux,       /* [B, n] acc_dtype, per-row factor (gram_math.h) or null             */ \
      void* out,             /* [B, n, n] out_dtype (Write, WriteCentered); may be inner          */  \
      const void* scale,     /* [B] acc_dtype, −1/(2σ²) (Rbf, RbfFromSqDist) or null              */  \
      double* row_sums,      /* [B, n] Σ_j K_ij: RowSums fills it (pass zeros), WriteCentered reads */ \
      const double* totals,  /* [B] Σ_ij K_ij (WriteCentered) or null                             */  \
      int64_t batch, int64_t n

namespace cpu {
REPKERN_CPU_ISA_NAMESPACES(void gram_epilogue(REPKERN_GRAM_EPILOGUE_ARGS, int num_threads);)
REPKERN_CPU_DISPATCH(gram_epilogue)
}  // namespace cpu
namespace cuda {
void gram_epilogue(REPKERN_GRAM_EPILOGUE_ARGS, void* stream);  // stream: cudaStream_t
}

}  // namespace repkern
