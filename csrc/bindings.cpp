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
#include "sparsity.h"
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

// Activations [rows, d] with unit column stride, rows ld apart (any ld >= 0: the kernels only read, so
// overlapping rows such as an expanded tensor's are fine): sparsity kernels.
struct RowsArg {
  TensorView v;
  int64_t rows = 0, d = 0, ld = 0;
};

RowsArg rows_arg(const ViewArg& arg, const char* name) {
  RowsArg a;
  a.v = view(arg, name);
  if (a.v.sizes.size() != 2) throw std::invalid_argument(std::string(name) + ": expected shape [rows, d]");
  if (a.v.dtype != DType::Float32 && a.v.dtype != DType::Float64 && a.v.dtype != DType::Float16 &&
      a.v.dtype != DType::BFloat16)
    throw std::invalid_argument(std::string(name) + ": must be a floating dtype");
  a.rows = a.v.sizes[0];
  a.d = a.v.sizes[1];
  if (a.d > 1 && a.v.strides[1] != 1) throw std::invalid_argument(std::string(name) + ": last dim must be contiguous");
  a.ld = a.rows > 1 ? a.v.strides[0] : a.d;
  if (a.ld < 0) throw std::invalid_argument(std::string(name) + ": negative row stride");
  return a;
}

DType acc_of(DType dtype) { return dtype == DType::Float64 ? DType::Float64 : DType::Float32; }

// The top-p fractions ([P] float64, at most kMaxTopP).
int top_p_count(const ViewArg& arg) {
  TensorView t = view(arg, "top_p");
  if (t.sizes.size() != 1 || t.sizes[0] > repkern::kMaxTopP)
    throw std::invalid_argument("top_p: expected shape [P], P <= " + std::to_string(repkern::kMaxTopP));
  t.expect(DType::Float64, {t.sizes[0]});
  return int(t.sizes[0]);
}

#if defined(REPKERN_MODULE_EMU) || defined(REPKERN_WITH_CUDA)
void def_sparsity_cuda(py::module_& m) {
  m.def(
      "sparsity_plan_cuda",
      [](int dtype_code, int64_t rows, int64_t d, uint64_t /*stream: calling convention; the plan reads the current device*/) {
        if (dtype_code < 0 || dtype_code >= repkern::kNumDTypes) throw std::invalid_argument("dtype: unsupported code");
        const repkern::cuda::SparsityPlan plan = repkern::cuda::sparsity_plan(DType(dtype_code), rows, d);
        return std::make_tuple(plan.strips, plan.splits);
      },
      py::arg("dtype"), py::arg("rows"), py::arg("d"), py::arg("stream"));
  m.def(
      "sparsity_max_smem_sort_cuda",
      [](int dtype_code, uint64_t /*stream*/) {
        if (dtype_code < 0 || dtype_code >= repkern::kNumDTypes) throw std::invalid_argument("dtype: unsupported code");
        return repkern::cuda::sparsity_max_smem_sort(DType(dtype_code));
      },
      py::arg("dtype"), py::arg("stream"));
  m.def(
      "sparsity_features_cuda",
      [](const ViewArg& x_arg, double eps, const ViewArg& partials_arg, const ViewArg& totals_arg,
         const ViewArg& state_arg, const ViewArg& rows_out_arg, uint64_t stream) {
        const RowsArg x = rows_arg(x_arg, "x");
        const DType acc = acc_of(x.v.dtype);
        const repkern::cuda::SparsityPlan plan = repkern::cuda::sparsity_plan(x.v.dtype, x.rows, x.d);
        TensorView partials = view(partials_arg, "partials");
        partials.expect(acc, {plan.splits, repkern::kFeatureFields, x.d});
        TensorView totals = view(totals_arg, "row_totals");
        totals.expect(DType::Float64, {repkern::kRowTotals, x.rows});
        TensorView state = view(state_arg, "feature_state");
        state.expect(DType::Float64, {repkern::kFeatureFields, x.d});
        TensorView rows_out = view(rows_out_arg, "row_out");
        if (rows_out.sizes.size() != 2 || rows_out.sizes[0] < repkern::kRowSortFree)
          throw std::invalid_argument("row_out: expected shape [channels >= 5, rows]");
        rows_out.expect(acc, {rows_out.sizes[0], x.rows});
        py::gil_scoped_release release;
        repkern::cuda::sparsity_features(x.v.dtype, x.v.data, x.rows, x.d, x.ld, eps, partials.data,
                                         totals.as<double>(), state.as<double>(), rows_out.data, rows_out.sizes[0],
                                         reinterpret_cast<void*>(stream));
      },
      py::arg("x"), py::arg("eps"), py::arg("partials"), py::arg("row_totals"), py::arg("feature_state"),
      py::arg("row_out"), py::arg("stream"));
  m.def(
      "sparsity_ordered_cuda",
      [](const ViewArg& x_arg, const OptView& sorted_arg, int64_t row_begin, int64_t row_end, const ViewArg& top_p_arg,
         const ViewArg& totals_arg, const ViewArg& sums_arg, const ViewArg& rows_out_arg, uint64_t stream) {
        const RowsArg x = rows_arg(x_arg, "x");
        const DType acc = acc_of(x.v.dtype);
        if (row_begin < 0 || row_end < row_begin || row_end > x.rows)
          throw std::invalid_argument("row_begin/row_end: not a range of rows of x");
        const void* sorted = nullptr;
        if (sorted_arg) sorted = view(*sorted_arg, "sorted").expect(acc, {row_end - row_begin, x.d}).data;
        const int num_top_p = top_p_count(top_p_arg);
        TensorView totals = view(totals_arg, "row_totals");
        totals.expect(DType::Float64, {repkern::kRowTotals, x.rows});
        TensorView sums = view(sums_arg, "ordered_sums");
        sums.expect(DType::Float64, {repkern::ordered_sums(num_top_p), x.rows});
        TensorView rows_out = view(rows_out_arg, "row_out");
        rows_out.expect(acc, {repkern::row_channels(num_top_p, true), x.rows});
        py::gil_scoped_release release;
        repkern::cuda::sparsity_ordered(x.v.dtype, x.v.data, sorted, x.rows, x.d, x.ld, row_begin, row_end,
                                        static_cast<const double*>(view(top_p_arg, "top_p").data), num_top_p,
                                        totals.as<const double>(), sums.as<double>(), rows_out.data,
                                        reinterpret_cast<void*>(stream));
      },
      py::arg("x"), py::arg("sorted"), py::arg("row_begin"), py::arg("row_end"), py::arg("top_p"),
      py::arg("row_totals"), py::arg("ordered_sums"), py::arg("row_out"), py::arg("stream"));
}

void def_cuda_launchers(py::module_& m) {
  def_sparsity_cuda(m);
  def_gram_epilogue<uint64_t>(m, "gram_epilogue_cuda", "stream", [](const GramArgs& a, uint64_t stream) {
    repkern::cuda::gram_epilogue(a.kind, a.pass, a.inner.dtype, a.out.dtype, a.inner.data, a.aux, a.out.data,
                                 a.scale, a.row_sums, a.totals, a.batch, a.n, reinterpret_cast<void*>(stream));
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
  m.def(
      "sparsity_stats_cpu",
      [](const ViewArg& x_arg, double eps, const ViewArg& top_p_arg, bool ordered, const ViewArg& state_arg,
         const ViewArg& rows_out_arg, int num_threads) {
        const RowsArg x = rows_arg(x_arg, "x");
        const int num_top_p = top_p_count(top_p_arg);
        TensorView state = view(state_arg, "feature_state");
        state.expect(DType::Float64, {repkern::kFeatureFields, x.d});
        TensorView rows_out = view(rows_out_arg, "row_out");
        rows_out.expect(acc_of(x.v.dtype), {repkern::row_channels(num_top_p, ordered), x.rows});
        py::gil_scoped_release release;
        repkern::cpu::sparsity_stats(x.v.dtype, x.v.data, x.rows, x.d, x.ld, eps,
                                     static_cast<const double*>(view(top_p_arg, "top_p").data), num_top_p, ordered,
                                     state.as<double>(), rows_out.data, num_threads);
      },
      py::arg("x"), py::arg("eps"), py::arg("top_p"), py::arg("ordered"), py::arg("feature_state"),
      py::arg("row_out"), py::arg("num_threads"));
#if defined(REPKERN_WITH_CUDA)
  def_cuda_launchers(m);
#endif
}
#endif
