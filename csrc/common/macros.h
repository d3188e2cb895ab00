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
