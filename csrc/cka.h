// HSIC-terms launchers: CPU (cpu/cka.cpp) and CUDA (cuda/cka.cu, also compiled
// into the emulator). Same contract; math in common/cka_math.h.
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

#include "common/cka_math.h"
#include "common/dtype.h"
#include "cpu/isa.h"

namespace repkern {

struct HsicTermsParams {
  GramKind kind;
  DType acc_dtype;                  // of the blocks, aux and scale: float32 or float64
  std::vector<const void*> blocks;  // m × [rows, cols] acc_dtype (row-major) x_i·x_j of the block,
                                    // squared distances for RbfFromSqDist
  const void* aux;                  // [m, n] acc_dtype per-row factor (gram_math.h) or null
  const void* scale;                // [m] acc_dtype −1/(2σ²) (Rbf, RbfFromSqDist) or null
  const int64_t* pairs;             // [num_pairs, 2] matrix indices (a, b), HOST memory
  int64_t num_pairs;
  double* cross;                  // [num_pairs] += Σ_ij K_a,ij K_b,ij (block and mirror)
  double* row_sums;               // [m, n] += Σ_j K_a,ij (block and mirror)
  double* diag;                   // [m, n] K_a,ii, written by diagonal blocks
  int64_t rows, cols, r0, c0, n;  // the block: rows [r0, r0 + rows) × columns [c0, c0 + cols) of n×n
  bool diagonal_block;            // r0 == c0: the block holds the diagonal; only its upper part is read
};

namespace cpu {
REPKERN_CPU_KERNEL(hsic_terms, HsicTermsParams)
}
namespace cuda {
void hsic_terms(const HsicTermsParams& p, void* stream);  // stream: cudaStream_t
}

}  // namespace repkern
