// Compilation-mode switches shared by every native source.
//  - nvcc (__CUDACC__): real CUDA; kernels in csrc/cuda/*.cu.
//  - REPKERN_EMU: g++ compiles the same .cu files against csrc/emu/emu.h.
//  - otherwise: plain C++ (CPU kernels, bindings).
#pragma once

#if defined(REPKERN_EMU)
#include "emu/emu.h"
#elif defined(__CUDACC__)
#include <cuda_runtime.h>
#endif

#if defined(__CUDACC__)
#define RK_HD __host__ __device__ __forceinline__
#else
#define RK_HD inline
#endif

// Dynamic shared memory as a typed pointer. A macro because CUDA wants an
// `extern __shared__` array while the emulator hands out a per-block buffer.
#if defined(REPKERN_EMU)
#define RK_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::repkern_emu::detail::dynamic_smem())
#elif defined(__CUDACC__)
#define RK_DYNAMIC_SMEM(type, name)                        \
  extern __shared__ __align__(16) unsigned char rk_smem_[]; \
  type* name = reinterpret_cast<type*>(rk_smem_)
#endif

// Static shared memory: RK_SHARED(type, name, dims) declares `__shared__ type name dims`
// (dims optional: RK_SHARED(int, flag)); one array per declaration, at block scope.
// The only way to declare static shared memory in csrc/cuda: the emulator rejects the
// plain keyword, because it must poison every array with 0xFF bytes before each block
// (a static per call site and per template instantiation, poisoned by the first thread
// of the block that passes the declaration: every thread passes it before touching the
// array). A `type` containing a comma needs an alias first.
#if defined(REPKERN_EMU)
#define RK_SHARED(type, name, ...)                                                                    \
  static type name __VA_ARGS__;                                                                       \
  static ::repkern_emu::detail::SharedRegion name##_rk_shared_region_{__FILE__, __LINE__, #name};    \
  ::repkern_emu::detail::touch_shared(name##_rk_shared_region_, static_cast<void*>(&name), sizeof(name))
#elif defined(__CUDACC__)
#define RK_SHARED(type, name, ...) __shared__ type name __VA_ARGS__
#endif
