// Vec elements of T moved as one aligned vector access (16 bytes when Vec = 16 / sizeof(T);
// narrower companions, e.g. int32 indices beside a double row, give 8-byte accesses): shared
// by the kernels that read rows with vector loads. The caller checks pointer alignment.
#pragma once

#include "common/macros.h"

namespace repkern::cuda {

template <typename T>
constexpr int kVec16 = int(16 / sizeof(T));  // elements of T per 16-byte access

template <typename T, int Vec>
struct alignas(sizeof(T) * Vec) Packed {
  T v[Vec];
};

template <int Vec, typename T>
__device__ __forceinline__ Packed<T, Vec> load_packed(const T* p) {
  return *reinterpret_cast<const Packed<T, Vec>*>(p);
}

template <int Vec, typename T>
__device__ __forceinline__ void store_packed(T* p, const Packed<T, Vec>& v) {
  *reinterpret_cast<Packed<T, Vec>*>(p) = v;
}

}  // namespace repkern::cuda
