// cka_test's resampling kernels: CPU (cpu/replicate.cpp) and CUDA (cuda/replicate.cu, also
// compiled into the emulator). Same contract; math in common/replicate_math.h.
//
// One call evaluates R replicates (permutations or bootstrap weights) of the row sums of two
// n×n matrices that stay in memory once: no permuted or resampled copy is ever made.
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/replicate_math.h"
#include "cpu/isa.h"

namespace repkern {

#define REPKERN_REPLICATE_ROWS_ARGS                                                                          \
  ReplicateMode mode, DType dtype, const void* a, /* [n, n] dtype, symmetric                              */ \
      const void* b,                              /* [n, n] dtype, symmetric                              */ \
      const int32_t* index,                       /* [R, n] permutations of 0..n−1 (Permute) or null      */ \
      const float* weight,                        /* [R, n] multinomial counts (Bootstrap) or null        */ \
      double* out,                                /* [R, n, replicate_channels(mode)] row sums, written   */ \
      int64_t replicates, int64_t n

namespace cpu {
REPKERN_CPU_ISA_NAMESPACES(void replicate_rows(REPKERN_REPLICATE_ROWS_ARGS, int num_threads);)
REPKERN_CPU_DISPATCH(replicate_rows)
}  // namespace cpu
namespace cuda {
void replicate_rows(REPKERN_REPLICATE_ROWS_ARGS, void* stream);  // stream: cudaStream_t
}

}  // namespace repkern
