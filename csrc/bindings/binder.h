// The one way native entry points are bound (csrc/bindings/<op>.cpp).
//
// Python passes each tensor as a view (data_ptr, sizes, strides, dtype code). A Binder turns the named
// Python arguments of a kernel into the launcher's params struct through a `make` function, which checks
// every tensor it dereferences (dtype, shape, contiguity, index ranges) so that a misuse is an exception,
// not a crash; then it releases the GIL and runs the launcher with the thread count (CPU entry
// `<kernel>_cpu`) or the CUDA stream (`<kernel>_cuda`; in repkern._emu: the emulator).
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/dispatch.h"
#include "common/tensor_view.h"

// Which launchers this module binds: repkern._C has the CPU kernels and, built with nvcc, the CUDA ones;
// repkern._emu has the CUDA launchers compiled against the emulator.
#if defined(REPKERN_MODULE_EMU)
#define REPKERN_CPU_LAUNCHERS 0
#define REPKERN_CUDA_LAUNCHERS 1
#else
#define REPKERN_CPU_LAUNCHERS 1
#if defined(REPKERN_WITH_CUDA)
#define REPKERN_CUDA_LAUNCHERS 1
#else
#define REPKERN_CUDA_LAUNCHERS 0
#endif
#endif

// REPKERN_BIND(m, binder, kernel): binds the launchers of `kernel` this module has (binder.def(m, &cpu::kernel)
// and/or binder.def(m, &cuda::kernel)); REPKERN_BIND_CPU / REPKERN_BIND_CUDA for kernels with one backend only.
#if REPKERN_CPU_LAUNCHERS
#define REPKERN_BIND_CPU(m, binder, kernel) (binder).def(m, &::repkern::cpu::kernel)
#else
#define REPKERN_BIND_CPU(m, binder, kernel) (void)(binder)
#endif
#if REPKERN_CUDA_LAUNCHERS
#define REPKERN_BIND_CUDA(m, binder, kernel) (binder).def(m, &::repkern::cuda::kernel)
#else
#define REPKERN_BIND_CUDA(m, binder, kernel) (void)(binder)
#endif
#define REPKERN_BIND(m, binder, kernel)   \
  do {                                    \
    REPKERN_BIND_CPU(m, binder, kernel);  \
    REPKERN_BIND_CUDA(m, binder, kernel); \
  } while (false)

namespace repkern::bindings {

namespace py = pybind11;

using ViewArg = std::tuple<uint64_t, std::vector<int64_t>, std::vector<int64_t>, int>;
using OptView = std::optional<ViewArg>;

inline TensorView view(const ViewArg& arg, const char* name) {
  TensorView v;
  v.data = reinterpret_cast<void*>(std::get<0>(arg));
  v.sizes = std::get<1>(arg);
  v.strides = std::get<2>(arg);
  const int code = std::get<3>(arg);
  if (code < 0 || code >= kNumDTypes) throw std::invalid_argument(std::string(name) + ": unsupported dtype code");
  v.dtype = DType(code);
  v.name = name;
  if (v.sizes.size() != v.strides.size()) throw std::invalid_argument(std::string(name) + ": sizes/strides mismatch");
  for (int64_t s : v.sizes)
    if (s < 0) throw std::invalid_argument(std::string(name) + ": negative size");
  return v;
}

// The data pointer of an optional tensor of the given dtype and shape, or null.
template <typename T>
T* opt_data(const OptView& arg, const char* name, DType dtype, const std::vector<int64_t>& sizes) {
  return arg ? view(*arg, name).expect(dtype, sizes).template as<T>() : nullptr;
}

// A [rows, cols] matrix of `dtype` with unit column stride; returns its row stride.
inline int64_t row_stride(const TensorView& v, DType dtype) {
  if (v.dtype != dtype) throw std::invalid_argument(v.name + ": unexpected dtype code " + std::to_string(int(v.dtype)));
  if (v.sizes.size() != 2) throw std::invalid_argument(v.name + ": expected 2 dimensions");
  if (v.sizes[1] > 1 && v.strides[1] != 1) throw std::invalid_argument(v.name + ": rows must be contiguous");
  const int64_t ld = v.sizes[0] > 1 ? v.strides[0] : v.sizes[1];
  if (ld < v.sizes[1]) throw std::invalid_argument(v.name + ": overlapping rows");
  return ld;
}

// An accumulation dtype (float32 or float64) as a view's dtype.
inline DType accumulation_of(const TensorView& v) {
  switch_acc(v.dtype, v.name.c_str(), [](auto) {});
  return v.dtype;
}

// Binds kernel `kernel`: make(py_args...) -> Params checks the arguments (named `names`, in order).
template <typename Params, typename... PyArgs>
class Binder {
 public:
  using Make = Params (*)(const PyArgs&...);

  Binder(const char* kernel, Make make, std::array<const char*, sizeof...(PyArgs)> names)
      : kernel_(kernel), make_(make), names_(names) {}

  // `<kernel>_cpu(..., num_threads)`
  void def(py::module_& m, void (*launch)(const Params&, int)) const {
    bind<int>(
        m, "_cpu", "num_threads", [launch](const Params& p, int num_threads) { launch(p, num_threads); },
        std::index_sequence_for<PyArgs...>{});
  }
  // `<kernel>_cuda(..., stream)`, stream: the cudaStream_t as an integer
  void def(py::module_& m, void (*launch)(const Params&, void*)) const {
    bind<uint64_t>(
        m, "_cuda", "stream",
        [launch](const Params& p, uint64_t stream) { launch(p, reinterpret_cast<void*>(stream)); },
        std::index_sequence_for<PyArgs...>{});
  }

 private:
  template <typename Last, typename Run, size_t... I>
  void bind(py::module_& m, const char* suffix, const char* last_name, Run run, std::index_sequence<I...>) const {
    const Make make = make_;
    m.def((kernel_ + suffix).c_str(),
          [make, run](const PyArgs&... args, Last last) {
            const Params p = make(args...);
            py::gil_scoped_release release;
            run(p, last);
          },
          py::arg(names_[I])..., py::arg(last_name));
  }

  std::string kernel_;
  Make make_;
  std::array<const char*, sizeof...(PyArgs)> names_;
};

// The op families' entry points (csrc/bindings/<op>.cpp). Enums are bound py::module_local(): _C and _emu
// bind the same C++ types.
void def_gram(py::module_& m);
void def_sae(py::module_& m);
void def_cka(py::module_& m);
void def_cka_test(py::module_& m);
void def_sparsity(py::module_& m);
void def_knn(py::module_& m);
void def_emu_selftest(py::module_& m);  // repkern._emu only

}  // namespace repkern::bindings
