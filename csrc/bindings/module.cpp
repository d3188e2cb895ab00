// The Python modules: repkern._C (CPU kernels, and the CUDA launchers when built with nvcc) and, compiled
// again with REPKERN_MODULE_EMU, repkern._emu (the CUDA launchers on the CPU emulator, and its
// self-tests). Each op family binds its kernels, enums and constants in csrc/bindings/<op>.cpp.
#include "bindings/binder.h"
#include "common/index_check.h"
#include "cpu/isa.h"
#if defined(REPKERN_WITH_CUDA)
#include "cuda_runtime_info.h"
#endif

namespace repkern::bindings {
namespace {

void def_common(py::module_& m) {
  py::dict codes;  // DType codes of the tensor views (common/dtype.h)
  codes["float32"] = int(DType::Float32);
  codes["float64"] = int(DType::Float64);
  codes["float16"] = int(DType::Float16);
  codes["bfloat16"] = int(DType::BFloat16);
  codes["int32"] = int(DType::Int32);
  codes["int64"] = int(DType::Int64);
  m.attr("DTYPE_CODES") = codes;
  py::dict index_errors;  // IndexError bit -> message: the error word of the gathers (common/index_check.h)
  for (const IndexErrorMessage& e : kIndexErrorMessages) index_errors[py::int_(int(e.bit))] = e.message;
  m.attr("INDEX_ERRORS") = index_errors;
  def_gram(m);
  def_sae(m);
  def_cka(m);
  def_cka_test(m);
  def_sparsity(m);
  def_knn(m);
}

#if !defined(REPKERN_MODULE_EMU)
void def_build(py::module_& m) {
  m.def("build_info", [] {
    py::dict info;
#if defined(REPKERN_WITH_CUDA)
    info["cuda"] = true;
    info["cuda_archs"] = REPKERN_CUDA_ARCHS_STR;
    info["cuda_compiler"] = REPKERN_CUDA_COMPILER_VERSION;
    info["cuda_runtime_version"] = cuda::runtime_version();
    info["cuda_driver_version"] = cuda::driver_version();
#else
    info["cuda"] = false;
    info["cuda_archs"] = "";
    info["cuda_compiler"] = "";
    info["cuda_runtime_version"] = 0;
    info["cuda_driver_version"] = 0;
#endif
    info["cuda_skipped"] = REPKERN_CUDA_SKIPPED;  // why a build that could have had CUDA kernels has none
    info["git_sha"] = REPKERN_GIT_SHA;
    info["cxx_compiler"] = REPKERN_CXX_COMPILER;
    info["cpu_build_arch"] = cpu::cpu_build_arch();
    std::vector<std::string> compiled, supported;
    for (cpu::Isa isa : cpu::compiled_isas()) compiled.push_back(cpu::isa_name(isa));
    for (cpu::Isa isa : cpu::supported_isas()) supported.push_back(cpu::isa_name(isa));
    info["cpu_isas_compiled"] = compiled;
    info["cpu_isas_supported"] = supported;  // by this CPU
    return info;
  });
  // The level the CPU kernels run at now (REPKERN_CPU_ISA or the best supported); ValueError naming the
  // variable when it asks for a level that is unknown, not compiled or not supported.
  m.def("cpu_isa", [] { return std::string(cpu::isa_name(cpu::selected_isa())); });
}
#endif

}  // namespace
}  // namespace repkern::bindings

#if defined(REPKERN_MODULE_EMU)
PYBIND11_MODULE(_emu, m) {
  m.doc() = "repkern CUDA kernels compiled against the CPU emulator of the CUDA execution model";
  repkern::bindings::def_common(m);
  repkern::bindings::def_emu_selftest(m);
}
#else
PYBIND11_MODULE(_C, m) {
  m.doc() = "repkern native kernels";
  repkern::bindings::def_build(m);
  repkern::bindings::def_common(m);
}
#endif
