// The only pybind11 file. Compiled twice:
//  - module repkern._C: CPU kernels, plus the CUDA launchers when built with nvcc
//    (REPKERN_WITH_CUDA);
//  - module repkern._emu (REPKERN_MODULE_EMU): the CUDA launchers compiled by g++
//    against the emulator, and the emulator's self-tests.
// Python passes tensors as (data_ptr, sizes, strides, dtype code); every shape
// is re-checked here so that a misuse becomes an exception, not a crash.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/gram_math.h"
#include "common/tensor_view.h"

#include "gram.h"
#include "hsic.h"
#if defined(REPKERN_MODULE_EMU)
#include "emu/selftest.h"
#endif

namespace py = pybind11;
using repkern::DType;
using repkern::TensorView;

namespace {

using ViewArg = std::tuple<uint64_t, std::vector<int64_t>, std::vector<int64_t>, int>;
using OptView = std::optional<ViewArg>;

TensorView view(const ViewArg& arg, const char* name) {
  TensorView v;
  v.data = reinterpret_cast<void*>(std::get<0>(arg));
  v.sizes = std::get<1>(arg);
  v.strides = std::get<2>(arg);
  const int code = std::get<3>(arg);
  if (code < 0 || code >= repkern::kNumDTypes) throw std::invalid_argument(std::string(name) + ": unsupported dtype code");
  v.dtype = DType(code);
  v.name = name;
  if (v.sizes.size() != v.strides.size()) throw std::invalid_argument(std::string(name) + ": sizes/strides mismatch");
  return v;
}

// Validated arguments of the Gram epilogue (shared by the CPU, CUDA and emulated entry points).
struct GramArgs {
  repkern::GramKind kind;
  repkern::GramPass pass;
  TensorView inner, out;
  const void* aux = nullptr;
  const void* scale = nullptr;
  double* row_sums = nullptr;
  const double* totals = nullptr;
  int64_t batch = 0, n = 0;

  GramArgs(int kind_code, int pass_code, const ViewArg& inner_arg, const OptView& aux_arg, const OptView& out_arg,
           const OptView& scale_arg,
           const OptView& row_sums_arg, const OptView& totals_arg)
      : kind(repkern::GramKind(kind_code)), pass(repkern::GramPass(pass_code)), inner(view(inner_arg, "inner")) {
    using repkern::GramKind;
    using repkern::GramPass;
    if (inner.sizes.size() != 3 || inner.sizes[1] != inner.sizes[2])
      throw std::invalid_argument("inner: expected shape [B, n, n]");
    batch = inner.sizes[0];
    n = inner.sizes[1];
    if (inner.dtype != DType::Float32 && inner.dtype != DType::Float64)
      throw std::invalid_argument("inner: must be float32 or float64");
    inner.expect(inner.dtype, {batch, n, n});
    if (pass != GramPass::RowSums) {
      if (!out_arg) throw std::invalid_argument("out: required for this pass");
      out = view(*out_arg, "out");
      out.expect(out.dtype, {batch, n, n});
    } else {
      out.dtype = inner.dtype;  // no output is written
    }
    if (repkern::gram_needs_aux(kind)) {
      if (!aux_arg) throw std::invalid_argument("aux: required for this kind");
      aux = view(*aux_arg, "aux").expect(inner.dtype, {batch, n}).data;
    }
    if (kind == GramKind::Rbf || kind == GramKind::RbfFromSqDist) {
      if (!scale_arg) throw std::invalid_argument("scale: required for the rbf kernel");
      scale = view(*scale_arg, "scale").expect(inner.dtype, {batch}).data;
    }
    if (pass != GramPass::Write) {
      if (!row_sums_arg) throw std::invalid_argument("row_sums: required for centering");
      row_sums = view(*row_sums_arg, "row_sums").expect(DType::Float64, {batch, n}).as<double>();
    }
    if (pass == GramPass::WriteCentered) {
      if (!totals_arg) throw std::invalid_argument("totals: required for centering");
      totals = view(*totals_arg, "totals").expect(DType::Float64, {batch}).as<const double>();
    }
  }
};

// Binds a Gram epilogue entry point: arguments validated, GIL released, then
// run(args, last) where `last` is the thread count (CPU) or the stream (CUDA).
template <typename Last, typename Run>
void def_gram_epilogue(py::module_& m, const char* name, const char* last_name, Run run) {
  m.def(
      name,
      [run](int kind, int pass, const ViewArg& inner, const OptView& aux, const OptView& out, const OptView& scale,
            const OptView& row_sums, const OptView& totals, Last last) {
        GramArgs a(kind, pass, inner, aux, out, scale, row_sums, totals);
        py::gil_scoped_release release;
        run(a, last);
      },
      py::arg("kind"), py::arg("pass_"), py::arg("inner"), py::arg("aux"), py::arg("out"), py::arg("scale"),
      py::arg("row_sums"), py::arg("totals"), py::arg(last_name));
}

// Validated arguments of the HSIC-terms kernel (shared by the CPU, CUDA and emulated entry points).
struct HsicArgs {
  repkern::GramKind kind;
  DType acc = DType::Float32;
  std::vector<const void*> blocks;
  const void* aux = nullptr;
  const void* scale = nullptr;
  std::vector<int64_t> pairs;  // host copy: the CUDA launcher plans its launches from it
  double* cross = nullptr;
  double* row_sums = nullptr;
  double* diag = nullptr;
  int64_t rows = 0, cols = 0, r0 = 0, c0 = 0, n = 0;
  bool diagonal_block = false;

  HsicArgs(int kind_code, const std::vector<ViewArg>& block_args, const OptView& aux_arg, const OptView& scale_arg,
           const ViewArg& pairs_arg, const ViewArg& cross_arg, const ViewArg& row_sums_arg, const ViewArg& diag_arg,
           int64_t r0_, int64_t c0_, bool diagonal)
      : kind(repkern::GramKind(kind_code)), r0(r0_), c0(c0_), diagonal_block(diagonal) {
    using repkern::GramKind;
    if (kind_code < 0 || kind_code > int(GramKind::RbfFromSqDist) || !repkern::hsic_kind_supported(kind))
      throw std::invalid_argument("kind: unsupported for hsic_terms");
    if (block_args.empty()) throw std::invalid_argument("blocks: expected at least one matrix block");
    const int64_t m = int64_t(block_args.size());
    for (size_t a = 0; a < block_args.size(); ++a) {
      TensorView b = view(block_args[a], "blocks");
      if (b.sizes.size() != 2) throw std::invalid_argument("blocks: expected [rows, cols] matrices");
      if (a == 0) {
        acc = b.dtype;
        rows = b.sizes[0];
        cols = b.sizes[1];
        if (acc != DType::Float32 && acc != DType::Float64)
          throw std::invalid_argument("blocks: must be float32 or float64");
      }
      b.expect(acc, {rows, cols});
      blocks.push_back(b.data);
    }
    TensorView rs = view(row_sums_arg, "row_sums");
    if (rs.sizes.size() != 2 || rs.sizes[0] != m) throw std::invalid_argument("row_sums: expected shape [m, n]");
    n = rs.sizes[1];
    row_sums = rs.expect(DType::Float64, {m, n}).as<double>();
    diag = view(diag_arg, "diag").expect(DType::Float64, {m, n}).as<double>();
    if (r0 < 0 || c0 < 0 || r0 + rows > n || c0 + cols > n)
      throw std::invalid_argument("r0/c0: the block lies outside the n×n matrices");
    if (diagonal_block && (r0 != c0 || rows != cols))
      throw std::invalid_argument("diagonal_block: needs r0 == c0 and a square block");
    if (repkern::gram_needs_aux(kind)) {
      if (!aux_arg) throw std::invalid_argument("aux: required for this kind");
      aux = view(*aux_arg, "aux").expect(acc, {m, n}).data;
    }
    if (kind == GramKind::Rbf || kind == GramKind::RbfFromSqDist) {
      if (!scale_arg) throw std::invalid_argument("scale: required for the rbf kernel");
      scale = view(*scale_arg, "scale").expect(acc, {m}).data;
    }
    TensorView pv = view(pairs_arg, "pairs");
    if (pv.sizes.size() != 2 || pv.sizes[1] != 2) throw std::invalid_argument("pairs: expected shape [P, 2]");
    const int64_t num_pairs = pv.sizes[0];
    pv.expect(DType::Int64, {num_pairs, 2});
    pairs.assign(pv.as<const int64_t>(), pv.as<const int64_t>() + 2 * num_pairs);
    for (int64_t v : pairs)
      if (v < 0 || v >= m) throw std::invalid_argument("pairs: matrix index out of range");
    cross = view(cross_arg, "cross").expect(DType::Float64, {num_pairs}).as<double>();
  }
  int64_t num_pairs() const { return int64_t(pairs.size() / 2); }
};

// Binds an HSIC-terms entry point (see def_gram_epilogue).
template <typename Last, typename Run>
void def_hsic_terms(py::module_& m, const char* name, const char* last_name, Run run) {
  m.def(
      name,
      [run](int kind, const std::vector<ViewArg>& blocks, const OptView& aux, const OptView& scale,
            const ViewArg& pairs, const ViewArg& cross, const ViewArg& row_sums, const ViewArg& diag, int64_t r0,
            int64_t c0, bool diagonal_block, Last last) {
        HsicArgs a(kind, blocks, aux, scale, pairs, cross, row_sums, diag, r0, c0, diagonal_block);
        py::gil_scoped_release release;
        run(a, last);
      },
      py::arg("kind"), py::arg("blocks"), py::arg("aux"), py::arg("scale"), py::arg("pairs"), py::arg("cross"),
      py::arg("row_sums"), py::arg("diag"), py::arg("r0"), py::arg("c0"), py::arg("diagonal_block"),
      py::arg(last_name));
}

#if defined(REPKERN_MODULE_EMU) || defined(REPKERN_WITH_CUDA)
void def_cuda_launchers(py::module_& m) {
  def_gram_epilogue<uint64_t>(m, "gram_epilogue_cuda", "stream", [](const GramArgs& a, uint64_t stream) {
    repkern::cuda::gram_epilogue(a.kind, a.pass, a.inner.dtype, a.out.dtype, a.inner.data, a.aux, a.out.data,
                                 a.scale, a.row_sums, a.totals, a.batch, a.n, reinterpret_cast<void*>(stream));
  });
  def_hsic_terms<uint64_t>(m, "hsic_terms_cuda", "stream", [](const HsicArgs& a, uint64_t stream) {
    repkern::cuda::hsic_terms(a.kind, a.acc, a.blocks, a.aux, a.scale, a.pairs.data(), a.num_pairs(), a.cross,
                              a.row_sums, a.diag, a.rows, a.cols, a.r0, a.c0, a.n, a.diagonal_block,
                              reinterpret_cast<void*>(stream));
  });
}
#endif

#if defined(REPKERN_MODULE_EMU)
void def_emu_selftests(py::module_& m) {
  namespace st = repkern::emu_selftest;
  m.def("selftest_block_sum", [](const ViewArg& x, const ViewArg& out, bool with_barrier) {
    TensorView xv = view(x, "x");
    const int64_t n = xv.numel();
    if (n < 1 || n > 1024 || (n & (n - 1)) != 0) throw std::invalid_argument("x: numel must be a power of two <= 1024");
    xv.expect(DType::Float32, {n});
    TensorView ov = view(out, "out");
    ov.expect(DType::Float32, {1});
    py::gil_scoped_release release;
    st::block_sum(xv.as<const float>(), ov.as<float>(), int(n), with_barrier);
  });
  m.def("selftest_warp_ops", [](int blocks, const ViewArg& out_i, const ViewArg& out_f, const ViewArg& out_d,
                                const ViewArg& sums_f, const ViewArg& sums_d) {
    const int64_t threads = int64_t(blocks) * 32;
    TensorView oi = view(out_i, "out_i"), f = view(out_f, "out_f"), d = view(out_d, "out_d"), sf = view(sums_f, "sum_f"),
               sd = view(sums_d, "sum_d");
    oi.expect(DType::Int32, {threads, 10});
    f.expect(DType::Float32, {threads});
    d.expect(DType::Float64, {threads});
    sf.expect(DType::Float32, {1});
    sd.expect(DType::Float64, {1});
    py::gil_scoped_release release;
    st::warp_ops(blocks, oi.as<int32_t>(), f.as<float>(), d.as<double>(), sf.as<float>(), sd.as<double>());
  });
  m.def("selftest_schedule_order", [](int blocks, int threads, const ViewArg& order) {
    TensorView o = view(order, "order");
    o.expect(DType::Int32, {int64_t(blocks) * threads});
    py::gil_scoped_release release;
    st::schedule_order(blocks, threads, o.as<int32_t>());
  });
  m.def("selftest_planted_bug", [](int bug, const ViewArg& scratch) {
    TensorView s = view(scratch, "scratch");
    s.expect(DType::Float32, {64});
    if (bug < 0 || bug > int(st::Bug::GridTooLarge)) throw std::invalid_argument("bug: unknown code");
    py::gil_scoped_release release;
    st::planted_bug(st::Bug(bug), s.as<float>());
  });
}
#endif

}  // namespace

#if defined(REPKERN_MODULE_EMU)
PYBIND11_MODULE(_emu, m) {
  m.doc() = "repkern CUDA kernels compiled against the CPU emulator of the CUDA execution model";
  def_cuda_launchers(m);
  def_emu_selftests(m);
}
#else
PYBIND11_MODULE(_C, m) {
  m.doc() = "repkern native kernels";
  m.def("build_info", [] {
    py::dict info;
#if defined(REPKERN_WITH_CUDA)
    info["cuda"] = true;
    info["cuda_archs"] = REPKERN_CUDA_ARCHS_STR;
    info["cuda_compiler"] = REPKERN_CUDA_COMPILER_VERSION;
#else
    info["cuda"] = false;
    info["cuda_archs"] = "";
    info["cuda_compiler"] = "";
#endif
    info["cxx_compiler"] = REPKERN_CXX_COMPILER;
    info["cpu_arch"] = REPKERN_CPU_ARCH;
    return info;
  });
  def_gram_epilogue<int>(m, "gram_epilogue_cpu", "num_threads", [](const GramArgs& a, int num_threads) {
    repkern::cpu::gram_epilogue(a.kind, a.pass, a.inner.dtype, a.out.dtype, a.inner.data, a.aux, a.out.data, a.scale,
                                a.row_sums, a.totals, a.batch, a.n, num_threads);
  });
  def_hsic_terms<int>(m, "hsic_terms_cpu", "num_threads", [](const HsicArgs& a, int num_threads) {
    repkern::cpu::hsic_terms(a.kind, a.acc, a.blocks, a.aux, a.scale, a.pairs.data(), a.num_pairs(), a.cross,
                             a.row_sums, a.diag, a.rows, a.cols, a.r0, a.c0, a.n, a.diagonal_block, num_threads);
  });
#if defined(REPKERN_WITH_CUDA)
  def_cuda_launchers(m);
#endif
}
#endif
