# Whether and for which GPUs the CUDA kernels are built. Sets REPKERN_WITH_CUDA, REPKERN_CUDA_ARCHS (the
# CMAKE_CUDA_ARCHITECTURES used) and REPKERN_CUDA_SKIPPED (why a build that could have had CUDA has none).
#
# Architectures, from the first source that is set:
#   REPKERN_CUDA_ARCHS (environment or -D)            CMake's syntax: "80-real;90a-real;120"
#   CMAKE_CUDA_ARCHITECTURES (-D) / CUDAARCHS (env)    CMake's own variables
#   TORCH_CUDA_ARCH_LIST (env)                          PyTorch's syntax: "7.5 8.0 8.6+PTX" or "7.5;9.0a"
#   the GPUs visible now (nvidia-smi), i.e. CMake's "native" without needing a working driver/runtime pair
#   otherwise every architecture this nvcc knows from sm_75 (Turing) up, plus PTX of the newest
# Architectures nvcc does not know are dropped with a warning.
set(REPKERN_OLDEST_CUDA 12.0)  # C++20 in nvcc; README states it
set(REPKERN_WITH_CUDA OFF)
set(REPKERN_CUDA_SKIPPED "")

include(${CMAKE_CURRENT_LIST_DIR}/cuda_archs.cmake)

if(REPKERN_CUDA STREQUAL "OFF")
  return()
endif()
if(NOT REPKERN_CUDA MATCHES "^(AUTO|ON)$")
  message(FATAL_ERROR "REPKERN_CUDA must be AUTO, ON or OFF, got '${REPKERN_CUDA}'")
endif()
# The user's choice, read before enable_language(CUDA) fills CMAKE_CUDA_ARCHITECTURES with nvcc's default.
set(requested "")
if(REPKERN_CUDA_ARCHS)
  set(requested "${REPKERN_CUDA_ARCHS}")
  set(source "REPKERN_CUDA_ARCHS")
elseif(DEFINED CMAKE_CUDA_ARCHITECTURES)
  set(requested "${CMAKE_CUDA_ARCHITECTURES}")
  set(source "CMAKE_CUDA_ARCHITECTURES")
elseif(DEFINED ENV{CUDAARCHS})
  set(requested "$ENV{CUDAARCHS}")
  set(source "CUDAARCHS")
elseif(DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  repkern_from_torch_arch_list("$ENV{TORCH_CUDA_ARCH_LIST}" requested)
  set(source "TORCH_CUDA_ARCH_LIST")
endif()

include(CheckLanguage)
check_language(CUDA)
repkern_visible_gpus(visible)
if(NOT CMAKE_CUDA_COMPILER)
  if(REPKERN_CUDA STREQUAL "ON")
    message(FATAL_ERROR "REPKERN_CUDA=ON but no CUDA compiler was found (put nvcc on PATH or set CUDACXX)")
  endif()
  if(visible)
    set(REPKERN_CUDA_SKIPPED "an NVIDIA GPU was visible at build time but no nvcc was found")
    message(WARNING "repkern: ${REPKERN_CUDA_SKIPPED}: building WITHOUT CUDA kernels. To use the GPU, install "
                    "the CUDA toolkit (>= ${REPKERN_OLDEST_CUDA}) and reinstall with nvcc on PATH (or CUDACXX=/path/to/nvcc) "
                    "and REPKERN_CUDA=ON.")
  endif()
  return()
endif()

execute_process(COMMAND ${CMAKE_CUDA_COMPILER} --version OUTPUT_VARIABLE nvcc_version ERROR_QUIET)
string(REGEX MATCH "release ([0-9]+\\.[0-9]+)" _ "${nvcc_version}")
set(nvcc_release "${CMAKE_MATCH_1}")
if(nvcc_release AND nvcc_release VERSION_LESS REPKERN_OLDEST_CUDA)
  set(REPKERN_CUDA_SKIPPED "nvcc ${nvcc_release} is older than CUDA ${REPKERN_OLDEST_CUDA}")
  if(REPKERN_CUDA STREQUAL "ON")
    message(FATAL_ERROR "repkern: ${REPKERN_CUDA_SKIPPED}, the oldest toolkit it supports")
  endif()
  message(WARNING "repkern: ${REPKERN_CUDA_SKIPPED}: building WITHOUT CUDA kernels")
  return()
endif()

# What this nvcc compiles: "75;80;86;...".
execute_process(COMMAND ${CMAKE_CUDA_COMPILER} --list-gpu-arch OUTPUT_VARIABLE text ERROR_QUIET)
string(REGEX MATCHALL "compute_[0-9]+" known "${text}")
list(TRANSFORM known REPLACE "compute_" "")
list(SORT known COMPARE NATURAL)

repkern_choose_cuda_archs("${requested}" "${source}" "${visible}" "${known}" archs source)
if(NOT archs)
  message(FATAL_ERROR "repkern: no CUDA architecture left to build for (from ${source}); set REPKERN_CUDA_ARCHS "
                      "or build without CUDA (REPKERN_CUDA=OFF)")
endif()

set(REPKERN_CUDA_ARCHS "${archs}")
set(CMAKE_CUDA_ARCHITECTURES "${archs}")
enable_language(CUDA)
set(CMAKE_CUDA_STANDARD 20)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
set(CMAKE_CUDA_RUNTIME_LIBRARY Static)  # imports without a GPU or driver
set(REPKERN_WITH_CUDA ON)
message(STATUS "repkern: CUDA kernels for ${archs} (from ${source}), nvcc ${nvcc_release}")
