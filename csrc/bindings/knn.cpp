// Bindings of the kNN top-k merge (knn.h).
#include "knn.h"

#include "bindings/binder.h"
#include "common/knn_math.h"

namespace repkern::bindings {
namespace {

KnnTopkMergeParams make_knn_topk_merge(const ViewArg& tile_arg, const ViewArg& col_bias_arg,
                                       const OptView& row_bias_arg, const ViewArg& row_vals_arg,
                                       const ViewArg& row_idx_arg, const OptView& col_vals_arg,
                                       const OptView& col_idx_arg, const int64_t& row0, const int64_t& col0) {
  KnnTopkMergeParams p{};
  const TensorView tile = view(tile_arg, "tile"), row_vals = view(row_vals_arg, "row_vals");
  if (tile.sizes.size() != 2) throw std::invalid_argument("tile: expected [rows, cols]");
  if (row_vals.sizes.size() != 2) throw std::invalid_argument("row_vals: expected [rows, k]");
  p.rows = tile.sizes[0];
  p.cols = tile.sizes[1];
  p.acc_dtype = accumulation_of(tile);
  p.tile = tile.expect(p.acc_dtype, {p.rows, p.cols}).data;
  const int64_t k = row_vals.sizes[1];
  if (k < 1 || k > kKnnMaxK)
    throw std::invalid_argument("row_vals: k must be in [1, " + std::to_string(kKnnMaxK) + "]");
  p.k = int(k);
  p.row_vals = row_vals.expect(p.acc_dtype, {p.rows, k}).data;
  p.row_idx = view(row_idx_arg, "row_idx").expect(DType::Int64, {p.rows, k}).as<int64_t>();
  p.col_bias = view(col_bias_arg, "col_bias").expect(p.acc_dtype, {p.cols}).data;
  if (row0 < 0 || row0 > kKnnMaxRows - p.rows) throw std::invalid_argument("row0: out of range");
  if (col0 < 0 || col0 > kKnnMaxRows - p.cols) throw std::invalid_argument("col0: out of range");
  if (bool(col_vals_arg) != bool(col_idx_arg) || bool(col_vals_arg) != bool(row_bias_arg))
    throw std::invalid_argument("col_vals, col_idx, row_bias: give all three (columns' merge) or none");
  if (col_vals_arg) {
    // A pair inside both ranges would reach its rows twice (once per side).
    if (row0 < col0 + p.cols && col0 < row0 + p.rows)
      throw std::invalid_argument("col0: the columns' merge needs row ranges that do not overlap");
    p.row_bias = view(*row_bias_arg, "row_bias").expect(p.acc_dtype, {p.rows}).data;
    p.col_vals = view(*col_vals_arg, "col_vals").expect(p.acc_dtype, {p.cols, k}).data;
    p.col_idx = view(*col_idx_arg, "col_idx").expect(DType::Int64, {p.cols, k}).as<int64_t>();
  }
  p.row0 = row0;
  p.col0 = col0;
  return p;
}

const Binder<KnnTopkMergeParams, ViewArg, ViewArg, OptView, ViewArg, ViewArg, OptView, OptView, int64_t, int64_t>
    kKnnTopkMerge("knn_topk_merge", make_knn_topk_merge,
                  {"tile", "col_bias", "row_bias", "row_vals", "row_idx", "col_vals", "col_idx", "row0", "col0"});

}  // namespace

void def_knn(py::module_& m) {
  m.attr("KNN_MAX_K") = kKnnMaxK;  // largest k of the native merge
  REPKERN_BIND(m, kKnnTopkMerge, knn_topk_merge);
}

}  // namespace repkern::bindings
