// HSIC-terms launchers: CPU (cpu/hsic.cpp) and CUDA (cuda/hsic.cu, also compiled
// into the emulator). Same contract; math in common/hsic_math.h.
//
// One call reads one block of m Gram matrices once (inner products -> kernel
// values on the fly) and accumulates, in float64, the terms every HSIC/CKA
// estimator needs: Σ K_a∘K_b for the requested pairs, row sums, diagonals.
// The untiled path passes each whole n×n inner-product matrix as one diagonal
// block (only its upper tiles are read); the O(n)-memory path passes Gram tiles
// (i <= j) one after another, accumulating into the same outputs.
#pragma once

#include <cstdint>
#include <vector>

#include "common/dtype.h"
#include "common/hsic_math.h"
#include "cpu/isa.h"

namespace repkern {

#define REPKERN_HSIC_TERMS_ARGS                                                                                  \
  GramKind kind, DType acc_dtype,                                                                                \
      const std::vector<const void*>& blocks, /* m × [rows, cols] acc_dtype (row-major) x_i·x_j of the block,    \
                                                 squared distances for RbfFromSqDist                        */  \
      const void* aux,                        /* [m, n] acc_dtype per-row factor (gram_math.h) or null      */  \
      const void* scale,                      /* [m] acc_dtype −1/(2σ²) (Rbf, RbfFromSqDist) or null         */  \
      const int64_t* pairs,                   /* [P, 2] matrix indices (a, b), HOST memory                  */  \
      int64_t num_pairs, double* cross,       /* [P] += Σ_ij K_a,ij K_b,ij (block and mirror)               */  \
      double* row_sums,                       /* [m, n] += Σ_j K_a,ij (block and mirror)                    */  \
      double* diag,                           /* [m, n] K_a,ii, written by diagonal blocks                  */  \
      int64_t rows, int64_t cols, int64_t r0, int64_t c0, int64_t n, bool diagonal_block

namespace cpu {
REPKERN_CPU_ISA_NAMESPACES(void hsic_terms(REPKERN_HSIC_TERMS_ARGS, int num_threads);)
REPKERN_CPU_DISPATCH(hsic_terms)
}  // namespace cpu
namespace cuda {
void hsic_terms(REPKERN_HSIC_TERMS_ARGS, void* stream);  // stream: cudaStream_t
}

}  // namespace repkern
