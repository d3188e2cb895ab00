// Warp and block reductions (no CUB: the emulator must run them).
#pragma once

#include "common/macros.h"

namespace repkern::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

}  // namespace repkern::cuda
