// cka_test's resampling kernels: CPU (cpu/cka_test.cpp) and CUDA (cuda/cka_test.cu, also
// compiled into the emulator). Same contract; math in common/cka_test_math.h.
//
// One call evaluates R replicates (permutations or bootstrap weights) of the row sums of two
// n×n matrices that stay in memory once: no permuted or resampled copy is ever made.
#pragma once

#include <cstdint>

#include "common/cka_test_math.h"
#include "common/dtype.h"
#include "common/index_check.h"
#include "cpu/isa.h"

namespace repkern {

struct ReplicateRowsParams {
  ReplicateMode mode;
  DType dtype;           // of a and b
  const void* a;         // [n, n] dtype, symmetric
  const void* b;         // [n, n] dtype, symmetric
  const int32_t* index;  // [replicates, n] permutations of 0..n−1 (Permute) or null; each index is
                         // checked to lie in [0, n) (common/index_check.h: kBadPermutation)
  const float* weight;   // [replicates, n] multinomial counts (Bootstrap) or null
  double* out;           // [replicates, n, replicate_channels(mode)] row sums (Permute: each row's
                         // upper-triangle share, cka_test_math.h), written
  int32_t* error;        // [1] IndexError bits (CUDA kernel; the CPU launcher throws)
  int64_t replicates, n;
};

namespace cpu {
REPKERN_CPU_KERNEL(replicate_rows, ReplicateRowsParams)
}
namespace cuda {
void replicate_rows(const ReplicateRowsParams& p, void* stream);  // stream: cudaStream_t
}

}  // namespace repkern
