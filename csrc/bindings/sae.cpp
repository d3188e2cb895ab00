// Bindings of the SAE kernels (sae.h).
#include "sae.h"

#include "bindings/binder.h"
#include "common/sae_math.h"

namespace repkern::bindings {
namespace {

SaeActivateParams make_sae_activate(const ViewArg& pre_arg, const ViewArg& bias_arg, const OptView& theta_arg,
                                    const ViewArg& out_arg, const OptView& fire_arg) {
  SaeActivateParams p{};
  const TensorView pre = view(pre_arg, "pre"), out = view(out_arg, "out");
  p.acc_dtype = accumulation_of(pre);
  p.ld_pre = row_stride(pre, p.acc_dtype);
  p.rows = pre.sizes[0];
  p.cols = pre.sizes[1];
  p.out_dtype = out.dtype;
  p.ld_out = row_stride(out, out.dtype);
  if (out.sizes != pre.sizes) throw std::invalid_argument("out: must have the shape of pre");
  p.pre = pre.data;
  p.out = out.data;
  p.bias = view(bias_arg, "bias").expect(p.acc_dtype, {p.cols}).data;
  p.theta = opt_data<const float>(theta_arg, "theta", DType::Float32, {p.cols});
  p.fire_counts = opt_data<int64_t>(fire_arg, "fire_counts", DType::Int64, {p.cols});
  return p;
}

SaeSparsifyParams make_sae_sparsify(const ViewArg& pre_arg, const ViewArg& bias_arg, const OptView& theta_arg,
                                    const OptView& counts_arg, const OptView& offsets_arg, const OptView& cols_arg,
                                    const OptView& vals_arg, const OptView& error_arg, const int64_t& col0) {
  SaeSparsifyParams p{};
  const TensorView pre = view(pre_arg, "pre");
  if (pre.sizes.size() != 2) throw std::invalid_argument("pre: expected [rows, cols]");
  p.rows = pre.sizes[0];
  p.cols = pre.sizes[1];
  p.col0 = col0;
  p.acc_dtype = accumulation_of(pre);
  p.pre = pre.expect(p.acc_dtype, {p.rows, p.cols}).data;
  p.bias = view(bias_arg, "bias").expect(p.acc_dtype, {p.cols}).data;
  p.theta = opt_data<const float>(theta_arg, "theta", DType::Float32, {p.cols});
  if (counts_arg) {
    p.counts = opt_data<int64_t>(counts_arg, "counts", DType::Int64, {p.rows});
    return p;
  }
  if (!offsets_arg || !cols_arg || !vals_arg || !error_arg)
    throw std::invalid_argument("sae_sparsify: either counts or offsets, out_cols, out_vals and error");
  p.offsets = opt_data<const int64_t>(offsets_arg, "offsets", DType::Int64, {p.rows});
  const TensorView c = view(*cols_arg, "out_cols");
  if (c.sizes.size() != 1) throw std::invalid_argument("out_cols: expected [nnz]");
  p.nnz = c.sizes[0];
  p.out_cols = c.expect(DType::Int64, c.sizes).as<int64_t>();
  p.out_vals = view(*vals_arg, "out_vals").expect(p.acc_dtype, c.sizes).data;
  p.error = opt_data<int32_t>(error_arg, "error", DType::Int32, {1});
  return p;
}

SaeTopkMergeParams make_sae_topk_merge(const ViewArg& pre_arg, const ViewArg& bias_arg, const ViewArg& vals_arg,
                                       const ViewArg& cols_arg, const int64_t& col0, const bool& first,
                                       const bool& relu_first) {
  SaeTopkMergeParams p{};
  const TensorView pre = view(pre_arg, "pre"), top_vals = view(vals_arg, "top_vals");
  if (pre.sizes.size() != 2 || top_vals.sizes.size() != 2)
    throw std::invalid_argument("pre, top_vals: expected 2 dims");
  p.rows = pre.sizes[0];
  p.cols = pre.sizes[1];
  p.acc_dtype = accumulation_of(pre);
  p.pre = pre.expect(p.acc_dtype, {p.rows, p.cols}).data;
  const int64_t k = top_vals.sizes[1];
  if (k < 1 || k > kSaeMaxTopK)
    throw std::invalid_argument("top_vals: k must be in [1, " + std::to_string(kSaeMaxTopK) + "]");
  if (first && p.cols < k) throw std::invalid_argument("pre: the first chunk needs at least k columns");
  if (col0 < 0 || col0 + p.cols > int64_t(kSaeEmptyIndex)) throw std::invalid_argument("col0: out of range");
  p.k = int(k);
  p.col0 = col0;
  p.first = first;
  p.relu_first = relu_first;
  p.top_vals = top_vals.expect(p.acc_dtype, {p.rows, k}).data;
  p.top_cols = view(cols_arg, "top_cols").expect(DType::Int64, {p.rows, k}).as<int64_t>();
  p.bias = view(bias_arg, "bias").expect(p.acc_dtype, {p.cols}).data;
  return p;
}

SaeSpmmParams make_sae_spmm(const ViewArg& crow_arg, const ViewArg& cols_arg, const ViewArg& vals_arg,
                            const OptView& dense_arg, const OptView& bias_arg, const OptView& out_arg,
                            const OptView& sums_arg, const ViewArg& error_arg) {
  SaeSpmmParams p{};
  const TensorView crow = view(crow_arg, "crow"), vals = view(vals_arg, "vals");
  if (crow.sizes.size() != 1 || crow.sizes[0] < 1) throw std::invalid_argument("crow: expected [rows + 1]");
  p.rows = crow.sizes[0] - 1;
  p.crow = crow.expect(DType::Int64, crow.sizes).as<const int64_t>();
  if (vals.sizes.size() != 1) throw std::invalid_argument("vals: expected [nnz]");
  p.dtype = vals.dtype;
  p.vals = vals.expect(vals.dtype, vals.sizes).data;
  p.nnz = vals.sizes[0];
  p.cols = view(cols_arg, "cols").expect(DType::Int64, vals.sizes).as<const int64_t>();
  p.error = view(error_arg, "error").expect(DType::Int32, {1}).as<int32_t>();
  if (dense_arg) {
    const TensorView dense = view(*dense_arg, "dense");
    if (dense.sizes.size() != 2) throw std::invalid_argument("dense: expected [K, D]");
    p.K = dense.sizes[0];
    p.D = dense.sizes[1];
    p.dense = dense.expect(p.dtype, dense.sizes).data;
    p.bias = opt_data<const void>(bias_arg, "bias", p.dtype, {p.D});
    if (!out_arg) throw std::invalid_argument("out: required with dense");
    p.out = view(*out_arg, "out").expect(p.dtype, {p.rows, p.D}).data;
  }
  p.row_sums = opt_data<void>(sums_arg, "row_sums", accumulation_dtype(p.dtype), {p.rows});
  return p;
}

SaeSddmmParams make_sae_sddmm(const ViewArg& rows_arg, const ViewArg& cols_arg, const ViewArg& a_arg,
                              const ViewArg& b_arg, const ViewArg& out_arg, const ViewArg& error_arg) {
  SaeSddmmParams p{};
  const TensorView rows_of = view(rows_arg, "rows_of"), a = view(a_arg, "a"), b = view(b_arg, "b");
  if (rows_of.sizes.size() != 1) throw std::invalid_argument("rows_of: expected [nnz]");
  p.nnz = rows_of.sizes[0];
  p.rows_of = rows_of.expect(DType::Int64, {p.nnz}).as<const int64_t>();
  p.cols_of = view(cols_arg, "cols_of").expect(DType::Int64, {p.nnz}).as<const int64_t>();
  if (a.sizes.size() != 2) throw std::invalid_argument("a: expected [R, D]");
  p.dtype = a.dtype;
  p.R = a.sizes[0];
  p.D = a.sizes[1];
  p.a = a.expect(p.dtype, a.sizes).data;
  if (b.sizes.size() != 2 || b.sizes[1] != p.D) throw std::invalid_argument("b: expected [K, D]");
  p.K = b.sizes[0];
  p.b = b.expect(p.dtype, b.sizes).data;
  p.out = view(out_arg, "out").expect(accumulation_dtype(p.dtype), {p.nnz}).data;
  p.error = view(error_arg, "error").expect(DType::Int32, {1}).as<int32_t>();
  return p;
}

const Binder<SaeActivateParams, ViewArg, ViewArg, OptView, ViewArg, OptView> kSaeActivate(
    "sae_activate", make_sae_activate, {"pre", "bias", "theta", "out", "fire_counts"});
const Binder<SaeSparsifyParams, ViewArg, ViewArg, OptView, OptView, OptView, OptView, OptView, OptView, int64_t>
    kSaeSparsify("sae_sparsify", make_sae_sparsify,
                 {"pre", "bias", "theta", "counts", "offsets", "out_cols", "out_vals", "error", "col0"});
const Binder<SaeTopkMergeParams, ViewArg, ViewArg, ViewArg, ViewArg, int64_t, bool, bool> kSaeTopkMerge(
    "sae_topk_merge", make_sae_topk_merge, {"pre", "bias", "top_vals", "top_cols", "col0", "first", "relu_first"});
const Binder<SaeSpmmParams, ViewArg, ViewArg, ViewArg, OptView, OptView, OptView, OptView, ViewArg> kSaeSpmm(
    "sae_spmm", make_sae_spmm, {"crow", "cols", "vals", "dense", "bias", "out", "row_sums", "error"});
const Binder<SaeSddmmParams, ViewArg, ViewArg, ViewArg, ViewArg, ViewArg, ViewArg> kSaeSddmm(
    "sae_sddmm", make_sae_sddmm, {"rows_of", "cols_of", "a", "b", "out", "error"});

}  // namespace

void def_sae(py::module_& m) {
  m.attr("SAE_MAX_TOPK") = kSaeMaxTopK;  // largest k of the native top-k merge
  REPKERN_BIND(m, kSaeActivate, sae_activate);
  REPKERN_BIND(m, kSaeSparsify, sae_sparsify);
  REPKERN_BIND(m, kSaeTopkMerge, sae_topk_merge);
  REPKERN_BIND(m, kSaeSpmm, sae_spmm);
  REPKERN_BIND(m, kSaeSddmm, sae_sddmm);
}

}  // namespace repkern::bindings
