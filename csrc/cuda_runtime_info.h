// CUDA runtime and driver versions (cuda/runtime.cu), as CUDA encodes them: 1000 * major + 10 * minor.
#pragma once

namespace repkern::cuda {
int runtime_version();  // the runtime this module was built with
int driver_version();   // the installed driver's CUDA version; 0 without a driver
}  // namespace repkern::cuda
