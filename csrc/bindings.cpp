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
#include "common/sae_math.h"
#include "common/tensor_view.h"

#include "gram.h"
#include "sae.h"
#include "hsic.h"
#include "replicate.h"
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

// ---- SAE kernels ----------------------------------------------------------------------

// Binds one entry point: the Python arguments build a validated Args, the GIL is
// released, then run(args, last) with `last` the thread count (CPU) or the stream (CUDA).
template <typename Args, typename... PyArgs>
struct Binder {
  template <typename Last, typename Run>
  static void def(py::module_& m, const char* name, Run run) {
    m.def(name, [run](const PyArgs&... py_args, Last last) {
      Args a(py_args...);
      py::gil_scoped_release release;
      run(a, last);
    });
  }
};

DType acc_of(const TensorView& v) {
  if (v.dtype != DType::Float32 && v.dtype != DType::Float64)
    throw std::invalid_argument(v.name + ": must be float32 or float64");
  return v.dtype;
}

// A [rows, cols] matrix with unit column stride; returns its row stride.
int64_t row_stride(const TensorView& v, DType dtype) {
  if (v.dtype != dtype) throw std::invalid_argument(v.name + ": unexpected dtype code " + std::to_string(int(v.dtype)));
  if (v.sizes.size() != 2) throw std::invalid_argument(v.name + ": expected 2 dimensions");
  if (v.sizes[1] > 1 && v.strides[1] != 1) throw std::invalid_argument(v.name + ": rows must be contiguous");
  const int64_t ld = v.sizes[0] > 1 ? v.strides[0] : v.sizes[1];
  if (ld < v.sizes[1]) throw std::invalid_argument(v.name + ": overlapping rows");
  return ld;
}

template <typename T>
T* opt_data(const OptView& arg, const char* name, DType dtype, const std::vector<int64_t>& sizes) {
  return arg ? view(*arg, name).expect(dtype, sizes).template as<T>() : nullptr;
}

struct SaeActivateArgs {
  TensorView pre, out;
  int64_t ld_pre, ld_out, rows, cols;
  const void* bias;
  const float* theta;
  int64_t* fire_counts;
  SaeActivateArgs(const ViewArg& pre_arg, const ViewArg& bias_arg, const OptView& theta_arg, const ViewArg& out_arg,
                  const OptView& fire_arg)
      : pre(view(pre_arg, "pre")), out(view(out_arg, "out")) {
    ld_pre = row_stride(pre, acc_of(pre));
    rows = pre.sizes[0];
    cols = pre.sizes[1];
    ld_out = row_stride(out, out.dtype);
    if (out.sizes != pre.sizes) throw std::invalid_argument("out: must have the shape of pre");
    bias = view(bias_arg, "bias").expect(pre.dtype, {cols}).data;
    theta = opt_data<const float>(theta_arg, "theta", DType::Float32, {cols});
    fire_counts = opt_data<int64_t>(fire_arg, "fire_counts", DType::Int64, {cols});
  }
};

struct SaeSparsifyArgs {
  TensorView pre;
  int64_t rows, cols, col0;
  const void* bias;
  const float* theta;
  int64_t* counts = nullptr;
  const int64_t* offsets = nullptr;
  int64_t* out_cols = nullptr;
  void* out_vals = nullptr;
  SaeSparsifyArgs(const ViewArg& pre_arg, const ViewArg& bias_arg, const OptView& theta_arg, const OptView& counts_arg,
                  const OptView& offsets_arg, const OptView& cols_arg, const OptView& vals_arg, int64_t col0_)
      : pre(view(pre_arg, "pre")), col0(col0_) {
    if (pre.sizes.size() != 2) throw std::invalid_argument("pre: expected [rows, cols]");
    rows = pre.sizes[0];
    cols = pre.sizes[1];
    pre.expect(acc_of(pre), {rows, cols});
    bias = view(bias_arg, "bias").expect(pre.dtype, {cols}).data;
    theta = opt_data<const float>(theta_arg, "theta", DType::Float32, {cols});
    if (counts_arg) {
      counts = opt_data<int64_t>(counts_arg, "counts", DType::Int64, {rows});
    } else {
      if (!offsets_arg || !cols_arg || !vals_arg)
        throw std::invalid_argument("sae_sparsify: either counts or offsets, out_cols and out_vals");
      offsets = opt_data<const int64_t>(offsets_arg, "offsets", DType::Int64, {rows});
      const TensorView c = view(*cols_arg, "out_cols");
      if (c.sizes.size() != 1) throw std::invalid_argument("out_cols: expected [nnz]");
      out_cols = c.expect(DType::Int64, c.sizes).as<int64_t>();
      out_vals = view(*vals_arg, "out_vals").expect(pre.dtype, c.sizes).data;
    }
  }
};

struct SaeTopkArgs {
  TensorView pre, top_vals;
  int64_t rows, cols, col0;
  int k;
  bool first, relu_first;
  const void* bias;
  int64_t* top_cols;
  SaeTopkArgs(const ViewArg& pre_arg, const ViewArg& bias_arg, const ViewArg& vals_arg, const ViewArg& cols_arg,
              int64_t col0_, bool first_, bool relu_first_)
      : pre(view(pre_arg, "pre")), top_vals(view(vals_arg, "top_vals")), col0(col0_), first(first_),
        relu_first(relu_first_) {
    if (pre.sizes.size() != 2 || top_vals.sizes.size() != 2) throw std::invalid_argument("pre, top_vals: expected 2 dims");
    rows = pre.sizes[0];
    cols = pre.sizes[1];
    pre.expect(acc_of(pre), {rows, cols});
    const int64_t k64 = top_vals.sizes[1];
    if (k64 < 1 || k64 > repkern::kSaeMaxTopK) throw std::invalid_argument("top_vals: k must be in [1, 256]");
    if (first && cols < k64) throw std::invalid_argument("pre: the first chunk needs at least k columns");
    if (col0 < 0 || col0 + cols > int64_t(repkern::kSaeEmptyIndex)) throw std::invalid_argument("col0: out of range");
    k = int(k64);
    top_vals.expect(pre.dtype, {rows, k64});
    top_cols = view(cols_arg, "top_cols").expect(DType::Int64, {rows, k64}).as<int64_t>();
    bias = view(bias_arg, "bias").expect(pre.dtype, {cols}).data;
  }
};

struct SaeSpmmArgs {
  TensorView vals;
  int64_t rows, D = 0;
  const int64_t *crow, *cols;
  const void *dense = nullptr, *bias = nullptr;
  void *out = nullptr, *row_sums = nullptr;
  SaeSpmmArgs(const ViewArg& crow_arg, const ViewArg& cols_arg, const ViewArg& vals_arg, const OptView& dense_arg,
              const OptView& bias_arg, const OptView& out_arg, const OptView& sums_arg)
      : vals(view(vals_arg, "vals")) {
    const TensorView cr = view(crow_arg, "crow");
    if (cr.sizes.size() != 1 || cr.sizes[0] < 1) throw std::invalid_argument("crow: expected [rows + 1]");
    rows = cr.sizes[0] - 1;
    crow = cr.expect(DType::Int64, cr.sizes).as<const int64_t>();
    if (vals.sizes.size() != 1) throw std::invalid_argument("vals: expected [nnz]");
    vals.expect(vals.dtype, vals.sizes);
    cols = view(cols_arg, "cols").expect(DType::Int64, vals.sizes).as<const int64_t>();
    const DType acc = vals.dtype == DType::Float64 ? DType::Float64 : DType::Float32;
    if (dense_arg) {
      const TensorView d = view(*dense_arg, "dense");
      if (d.sizes.size() != 2) throw std::invalid_argument("dense: expected [K, D]");
      D = d.sizes[1];
      dense = d.expect(vals.dtype, d.sizes).data;
      bias = opt_data<const void>(bias_arg, "bias", vals.dtype, {D});
      if (!out_arg) throw std::invalid_argument("out: required with dense");
      out = view(*out_arg, "out").expect(vals.dtype, {rows, D}).data;
    }
    row_sums = opt_data<void>(sums_arg, "row_sums", acc, {rows});
  }
};

struct SaeSddmmArgs {
  TensorView a;
  int64_t nnz, D;
  const int64_t *rows_of, *cols_of;
  const void* b;
  void* out;
  SaeSddmmArgs(const ViewArg& rows_arg, const ViewArg& cols_arg, const ViewArg& a_arg, const ViewArg& b_arg,
               const ViewArg& out_arg)
      : a(view(a_arg, "a")) {
    const TensorView r = view(rows_arg, "rows_of");
    if (r.sizes.size() != 1) throw std::invalid_argument("rows_of: expected [nnz]");
    nnz = r.sizes[0];
    rows_of = r.expect(DType::Int64, {nnz}).as<const int64_t>();
    cols_of = view(cols_arg, "cols_of").expect(DType::Int64, {nnz}).as<const int64_t>();
    if (a.sizes.size() != 2) throw std::invalid_argument("a: expected [R, D]");
    D = a.sizes[1];
    a.expect(a.dtype, a.sizes);
    const TensorView bv = view(b_arg, "b");
    if (bv.sizes.size() != 2 || bv.sizes[1] != D) throw std::invalid_argument("b: expected [K, D]");
    b = bv.expect(a.dtype, bv.sizes).data;
    const DType acc = a.dtype == DType::Float64 ? DType::Float64 : DType::Float32;
    out = view(out_arg, "out").expect(acc, {nnz}).data;
  }
};

using SaeActivateBinder = Binder<SaeActivateArgs, ViewArg, ViewArg, OptView, ViewArg, OptView>;
using SaeSparsifyBinder =
    Binder<SaeSparsifyArgs, ViewArg, ViewArg, OptView, OptView, OptView, OptView, OptView, int64_t>;
using SaeTopkBinder = Binder<SaeTopkArgs, ViewArg, ViewArg, ViewArg, ViewArg, int64_t, bool, bool>;
using SaeSpmmBinder = Binder<SaeSpmmArgs, ViewArg, ViewArg, ViewArg, OptView, OptView, OptView, OptView>;
using SaeSddmmBinder = Binder<SaeSddmmArgs, ViewArg, ViewArg, ViewArg, ViewArg, ViewArg>;

// The last native argument: the thread count (CPU) or the stream handle (CUDA).
[[maybe_unused]] int native_last(int num_threads) { return num_threads; }
[[maybe_unused]] void* native_last(uint64_t stream) { return reinterpret_cast<void*>(stream); }

// The SAE entry points of one backend: `ns` is repkern::cpu or repkern::cuda.
#define REPKERN_DEF_SAE(m, suffix, Last, ns)                                                                        \
  SaeActivateBinder::def<Last>(m, "sae_activate" suffix, [](const SaeActivateArgs& a, Last last) {                  \
    ns::sae_activate(a.pre.dtype, a.out.dtype, a.pre.data, a.ld_pre, a.bias, a.theta, a.out.data, a.ld_out,         \
                     a.fire_counts, a.rows, a.cols, native_last(last));                                                          \
  });                                                                                                               \
  SaeSparsifyBinder::def<Last>(m, "sae_sparsify" suffix, [](const SaeSparsifyArgs& a, Last last) {                  \
    ns::sae_sparsify(a.pre.dtype, a.pre.data, a.bias, a.theta, a.counts, a.offsets, a.out_cols, a.out_vals, a.rows, \
                     a.cols, a.col0, native_last(last));                                                                         \
  });                                                                                                               \
  SaeTopkBinder::def<Last>(m, "sae_topk_merge" suffix, [](const SaeTopkArgs& a, Last last) {                        \
    ns::sae_topk_merge(a.pre.dtype, a.pre.data, a.bias, a.top_vals.data, a.top_cols, a.rows, a.cols, a.col0, a.k,   \
                       a.first, a.relu_first, native_last(last));                                                                \
  });                                                                                                               \
  SaeSpmmBinder::def<Last>(m, "sae_spmm" suffix, [](const SaeSpmmArgs& a, Last last) {                              \
    ns::sae_spmm(a.vals.dtype, a.crow, a.cols, a.vals.data, a.dense, a.bias, a.out, a.row_sums, a.rows, a.D, native_last(last)); \
  });                                                                                                               \
  SaeSddmmBinder::def<Last>(m, "sae_sddmm" suffix, [](const SaeSddmmArgs& a, Last last) {                           \
    ns::sae_sddmm(a.a.dtype, a.rows_of, a.cols_of, a.a.data, a.b, a.out, a.nnz, a.D, native_last(last));                         \
  })
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

// ---- cka_test replicate row sums ----------------------------------------------------------

struct ReplicateArgs {
  repkern::ReplicateMode mode;
  DType dtype = DType::Float32;
  const void* a = nullptr;
  const void* b = nullptr;
  const int32_t* index = nullptr;
  const float* weight = nullptr;
  double* out = nullptr;
  int64_t replicates = 0, n = 0;

  ReplicateArgs(int mode_code, const ViewArg& a_arg, const ViewArg& b_arg, const ViewArg& columns_arg,
                const ViewArg& out_arg)
      : mode(repkern::ReplicateMode(mode_code)) {
    using repkern::ReplicateMode;
    if (mode_code != int(ReplicateMode::Permute) && mode_code != int(ReplicateMode::Bootstrap))
      throw std::invalid_argument("mode: unsupported for replicate_rows");
    TensorView av = view(a_arg, "a");
    if (av.sizes.size() != 2 || av.sizes[0] != av.sizes[1]) throw std::invalid_argument("a: expected shape [n, n]");
    dtype = av.dtype;
    n = av.sizes[0];
    if (dtype != DType::Float32 && dtype != DType::Float64) throw std::invalid_argument("a: must be float32 or float64");
    a = av.expect(dtype, {n, n}).data;
    b = view(b_arg, "b").expect(dtype, {n, n}).data;
    TensorView cv = view(columns_arg, "columns");
    if (cv.sizes.size() != 2 || cv.sizes[1] != n) throw std::invalid_argument("columns: expected shape [R, n]");
    replicates = cv.sizes[0];
    if (mode == ReplicateMode::Permute) {
      index = cv.expect(DType::Int32, {replicates, n}).as<const int32_t>();
    } else {
      weight = cv.expect(DType::Float32, {replicates, n}).as<const float>();
    }
    out = view(out_arg, "out").expect(DType::Float64, {replicates, n, repkern::replicate_channels(mode)}).as<double>();
  }
};

// Binds a replicate_rows entry point (see def_gram_epilogue). Permutation indices are
// not range-checked here (a device array): the Python op builds them with randperm.
template <typename Last, typename Run>
void def_replicate_rows(py::module_& m, const char* name, const char* last_name, Run run) {
  m.def(
      name,
      [run](int mode, const ViewArg& a, const ViewArg& b, const ViewArg& columns, const ViewArg& out, Last last) {
        ReplicateArgs args(mode, a, b, columns, out);
        py::gil_scoped_release release;
        run(args, last);
      },
      py::arg("mode"), py::arg("a"), py::arg("b"), py::arg("columns"), py::arg("out"), py::arg(last_name));
}

// ---- sparsity kernels ------------------------------------------------------------------

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

DType accumulation_dtype(DType dtype) { return dtype == DType::Float64 ? DType::Float64 : DType::Float32; }

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
        const DType acc = accumulation_dtype(x.v.dtype);
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
        const DType acc = accumulation_dtype(x.v.dtype);
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
  REPKERN_DEF_SAE(m, "_cuda", uint64_t, repkern::cuda);
  def_hsic_terms<uint64_t>(m, "hsic_terms_cuda", "stream", [](const HsicArgs& a, uint64_t stream) {
    repkern::cuda::hsic_terms(a.kind, a.acc, a.blocks, a.aux, a.scale, a.pairs.data(), a.num_pairs(), a.cross,
                              a.row_sums, a.diag, a.rows, a.cols, a.r0, a.c0, a.n, a.diagonal_block,
                              reinterpret_cast<void*>(stream));
  });
  def_replicate_rows<uint64_t>(m, "replicate_rows_cuda", "stream", [](const ReplicateArgs& a, uint64_t stream) {
    repkern::cuda::replicate_rows(a.mode, a.dtype, a.a, a.b, a.index, a.weight, a.out, a.replicates, a.n,
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
  m.def("selftest_static_smem", [](int blocks, const ViewArg& out) {
    TensorView o = view(out, "out");
    o.expect(DType::Int32, {2, int64_t(blocks) * 64});
    py::gil_scoped_release release;
    st::static_smem_poison(blocks, o.as<int32_t>());
  });
  m.def("selftest_coverage_loop", [](int blocks, int iterations, const ViewArg& out) {
    TensorView o = view(out, "out");
    o.expect(DType::Int32, {int64_t(blocks) * 64});
    py::gil_scoped_release release;
    st::coverage_loop(blocks, iterations, o.as<int32_t>());
  });
  m.def("selftest_run_ahead", [](int warps, const ViewArg& order) {
    TensorView o = view(order, "order");
    if (warps < 1 || warps > 32) throw std::invalid_argument("warps: expected 1..32");
    o.expect(DType::Int32, {int64_t(warps) * 32, 2});
    py::gil_scoped_release release;
    st::run_ahead(warps, o.as<int32_t>());
  });
  m.def(
      "coverage",
      [] {
        py::list out;
        for (const st::CoverageRecord& e : st::coverage())
          out.append(py::make_tuple(e.kernel, e.file, e.line, e.what, e.function, e.max_passes));
        return out;
      },
      "Barrier and warp-collective passes since the last reset_coverage(): a list of (kernel, file, line, what, "
      "function, max_passes), one per kernel and call-site instantiation; max_passes = the most times one thread of "
      "one block passed it.");
  m.def("reset_coverage", [] { st::reset_coverage(); });
  m.def(
      "shared_regions",
      [] {
        py::list out;
        for (const st::SharedRegionRecord& r : st::shared_regions())
          out.append(py::make_tuple(r.file, r.line, r.name));
        return out;
      },
      "The RK_SHARED arrays poisoned so far: a list of (file, line, name).");
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
  REPKERN_DEF_SAE(m, "_cpu", int, repkern::cpu);
  def_hsic_terms<int>(m, "hsic_terms_cpu", "num_threads", [](const HsicArgs& a, int num_threads) {
    repkern::cpu::hsic_terms(a.kind, a.acc, a.blocks, a.aux, a.scale, a.pairs.data(), a.num_pairs(), a.cross,
                             a.row_sums, a.diag, a.rows, a.cols, a.r0, a.c0, a.n, a.diagonal_block, num_threads);
  });
  def_replicate_rows<int>(m, "replicate_rows_cpu", "num_threads", [](const ReplicateArgs& a, int num_threads) {
    repkern::cpu::replicate_rows(a.mode, a.dtype, a.a, a.b, a.index, a.weight, a.out, a.replicates, a.n, num_threads);
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
        rows_out.expect(accumulation_dtype(x.v.dtype), {repkern::row_channels(num_top_p, ordered), x.rows});
        py::gil_scoped_release release;
        repkern::cpu::sparsity_stats(x.v.dtype, x.v.data, x.rows, x.d, x.ld, eps,
                                     static_cast<const double*>(view(top_p_arg, "top_p").data), num_top_p, ordered,
                                     state.as<double>(), rows_out.data, num_threads);
      },
      py::arg("x"), py::arg("eps"), py::arg("top_p"), py::arg("ordered"), py::arg("feature_state"),
      py::arg("row_out"), py::arg("num_threads"));
  m.def(
      "sparsity_merge_states_cpu",
      [](const ViewArg& state_arg, const ViewArg& other_arg, int /*num_threads*/) {
        TensorView state = view(state_arg, "state");
        if (state.sizes.size() != 2) throw std::invalid_argument("state: expected [kFeatureFields, d]");
        const int64_t d = state.sizes[1];
        state.expect(DType::Float64, {repkern::kFeatureFields, d});
        TensorView other = view(other_arg, "other");
        other.expect(DType::Float64, {repkern::kFeatureFields, d});
        py::gil_scoped_release release;
        repkern::cpu::sparsity_merge_states(state.as<double>(), other.as<const double>(), d);
      },
      py::arg("state"), py::arg("other"), py::arg("num_threads"));
  m.def(
      "sparsity_row_summaries_cpu",
      [](const ViewArg& rows_out_arg, const ViewArg& divisor_arg, const ViewArg& sums_arg, const ViewArg& defined_arg,
         const ViewArg& hist_arg, int num_threads) {
        TensorView rows_out = view(rows_out_arg, "row_out");
        if (rows_out.sizes.size() != 2 || (rows_out.dtype != DType::Float32 && rows_out.dtype != DType::Float64))
          throw std::invalid_argument("row_out: expected a float32 or float64 [channels, rows] tensor");
        const int64_t channels = rows_out.sizes[0], rows = rows_out.sizes[1];
        rows_out.expect(rows_out.dtype, {channels, rows});
        TensorView hist = view(hist_arg, "hist");
        if (hist.sizes.size() != 2 || hist.sizes[1] < 1) throw std::invalid_argument("hist: expected [channels, bins]");
        const int64_t bins = hist.sizes[1];
        hist.expect(DType::Int64, {channels, bins});
        TensorView divisor = view(divisor_arg, "hist_divisor");
        divisor.expect(DType::Float64, {channels});
        TensorView sums = view(sums_arg, "sums");
        sums.expect(DType::Float64, {channels});
        TensorView defined = view(defined_arg, "defined");
        defined.expect(DType::Int64, {channels});
        py::gil_scoped_release release;
        repkern::cpu::sparsity_row_summaries(rows_out.dtype, rows_out.data, channels, rows, divisor.as<double>(), bins,
                                             sums.as<double>(), defined.as<int64_t>(), hist.as<int64_t>(),
                                             num_threads);
      },
      py::arg("row_out"), py::arg("hist_divisor"), py::arg("sums"), py::arg("defined"), py::arg("hist"),
      py::arg("num_threads"));
#if defined(REPKERN_WITH_CUDA)
  def_cuda_launchers(m);
#endif
}
#endif
