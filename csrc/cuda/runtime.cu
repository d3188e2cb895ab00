// CUDA versions for `repkern info`: the runtime this module is linked with (static cudart) and the
// driver's. Compiled into repkern._C only (the emulator has neither).
#include "cuda_runtime_info.h"

#include <cuda_runtime.h>

namespace repkern::cuda {

int runtime_version() { return CUDART_VERSION; }

int driver_version() {
  int version = 0;
  return cudaDriverGetVersion(&version) == cudaSuccess ? version : 0;
}

}  // namespace repkern::cuda
