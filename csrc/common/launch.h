// The one way kernels are launched (CUDA and emulator), with the launch's
// return code turned into an exception naming the kernel and the shapes.
#pragma once

#include <stdexcept>
#include <string>
#include <utility>

#include "common/macros.h"

namespace repkern {

struct LaunchShape {
  dim3 grid;
  dim3 block;
  size_t dynamic_smem = 0;
  cudaStream_t stream = nullptr;
};

// `describe()` -> std::string, called only on failure (e.g. "B=2 n=257").
template <typename Describe, typename... KernelArgs, typename... Args>
void launch_kernel(const char* name, Describe&& describe, void (*kernel)(KernelArgs...), const LaunchShape& shape,
                   Args&&... args) {
  if (shape.grid.x == 0 || shape.grid.y == 0 || shape.grid.z == 0) return;  // empty problem
#if defined(REPKERN_EMU)
  try {
    ::repkern_emu::launch(name, reinterpret_cast<const void*>(kernel), shape.grid, shape.block, shape.dynamic_smem,
                          [&] { kernel(args...); });
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string(e.what()) + " [" + describe() + "]");
  }
#else
  kernel<<<shape.grid, shape.block, shape.dynamic_smem, shape.stream>>>(std::forward<Args>(args)...);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("CUDA kernel ") + name + " failed to launch: " + cudaGetErrorString(err) +
                             " [" + describe() + "]");
  }
#endif
}

// Streaming multiprocessors of the current device, for grid sizing.
inline int sm_count() {
  int device = 0;
  int count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    throw std::runtime_error("cannot query the current CUDA device");
  }
  return count;
}

}  // namespace repkern
