// Bindings of the activation-sparsity kernels (sparsity.h) and their layouts (common/sparsity_math.h).
#include "sparsity.h"

#include "bindings/binder.h"

namespace repkern::bindings {
namespace {

// Activations [rows, d] of a floating dtype with unit column stride, rows ld apart (any ld >= 0: the kernels
// only read, so overlapping rows such as an expanded tensor's are fine).
struct Rows {
  TensorView v;
  int64_t rows = 0, d = 0, ld = 0;

  template <typename Params>
  void fill(Params& p) const {  // the x fields every sparsity kernel's params have
    p.dtype = v.dtype;
    p.x = v.data;
    p.rows = rows;
    p.d = d;
    p.ld = ld;
  }
};

Rows rows_of(const ViewArg& arg, const char* name) {
  Rows a;
  a.v = view(arg, name);
  if (a.v.sizes.size() != 2) throw std::invalid_argument(std::string(name) + ": expected shape [rows, d]");
  switch_dtype(a.v.dtype, name, [](auto) {});  // a floating dtype
  a.rows = a.v.sizes[0];
  a.d = a.v.sizes[1];
  if (a.d > 1 && a.v.strides[1] != 1) throw std::invalid_argument(std::string(name) + ": last dim must be contiguous");
  a.ld = a.rows > 1 ? a.v.strides[0] : a.d;
  if (a.ld < 0) throw std::invalid_argument(std::string(name) + ": negative row stride");
  return a;
}

// The top-p fractions ([P] float64, at most kMaxTopP); returns P.
int top_p_count(const ViewArg& arg) {
  const TensorView t = view(arg, "top_p");
  if (t.sizes.size() != 1 || t.sizes[0] > kMaxTopP)
    throw std::invalid_argument("top_p: expected shape [P], P <= " + std::to_string(kMaxTopP));
  t.expect(DType::Float64, {t.sizes[0]});
  return int(t.sizes[0]);
}

SparsityStatsParams make_sparsity_stats(const ViewArg& x_arg, const double& eps, const ViewArg& top_p_arg,
                                        const bool& ordered, const ViewArg& state_arg, const ViewArg& rows_out_arg,
                                        const ViewArg& counts_arg) {
  const Rows x = rows_of(x_arg, "x");
  SparsityStatsParams p{};
  x.fill(p);
  p.eps = eps;
  p.num_top_p = top_p_count(top_p_arg);
  p.top_p = view(top_p_arg, "top_p").as<const double>();
  p.ordered = ordered;
  p.feature_state = view(state_arg, "feature_state").expect(DType::Float64, {kFeatureFields, x.d}).as<double>();
  p.row_out = view(rows_out_arg, "row_out")
                  .expect(accumulation_dtype(x.v.dtype), {row_channels(p.num_top_p, ordered), x.rows})
                  .data;
  p.row_counts = view(counts_arg, "row_counts").expect(DType::Int64, {kRowCounts, x.rows}).as<int64_t>();
  return p;
}

SparsityMergeStatesParams make_sparsity_merge_states(const ViewArg& state_arg, const ViewArg& other_arg) {
  const TensorView state = view(state_arg, "state");
  if (state.sizes.size() != 2) throw std::invalid_argument("state: expected [kFeatureFields, d]");
  SparsityMergeStatesParams p{};
  p.d = state.sizes[1];
  p.state = state.expect(DType::Float64, {kFeatureFields, p.d}).as<double>();
  p.other = view(other_arg, "other").expect(DType::Float64, {kFeatureFields, p.d}).as<const double>();
  return p;
}

SparsityRowSummariesParams make_sparsity_row_summaries(const ViewArg& counts_arg, const ViewArg& rows_out_arg,
                                                       const ViewArg& divisor_arg, const ViewArg& sums_arg,
                                                       const ViewArg& defined_arg, const ViewArg& hist_arg) {
  const TensorView row_out = view(rows_out_arg, "row_out");
  if (row_out.sizes.size() != 2) throw std::invalid_argument("row_out: expected a [channels, rows] tensor");
  SparsityRowSummariesParams p{};
  p.dtype = accumulation_of(row_out);
  p.channels = row_out.sizes[0];
  p.rows = row_out.sizes[1];
  p.row_out = row_out.expect(p.dtype, {p.channels, p.rows}).data;
  p.row_counts = view(counts_arg, "row_counts").expect(DType::Int64, {kRowCounts, p.rows}).as<const int64_t>();
  const int64_t summaries = kRowCounts + p.channels;
  const TensorView hist = view(hist_arg, "hist");
  if (hist.sizes.size() != 2 || hist.sizes[1] < 1) throw std::invalid_argument("hist: expected [summaries, bins]");
  p.bins = hist.sizes[1];
  p.hist = hist.expect(DType::Int64, {summaries, p.bins}).as<int64_t>();
  p.hist_divisor = view(divisor_arg, "hist_divisor").expect(DType::Float64, {summaries}).as<const double>();
  p.sums = view(sums_arg, "sums").expect(DType::Float64, {summaries}).as<double>();
  p.defined = view(defined_arg, "defined").expect(DType::Int64, {summaries}).as<int64_t>();
  return p;
}

const Binder<SparsityStatsParams, ViewArg, double, ViewArg, bool, ViewArg, ViewArg, ViewArg> kSparsityStats(
    "sparsity_stats", make_sparsity_stats, {"x", "eps", "top_p", "ordered", "feature_state", "row_out", "row_counts"});
const Binder<SparsityMergeStatesParams, ViewArg, ViewArg> kSparsityMergeStates("sparsity_merge_states",
                                                                               make_sparsity_merge_states,
                                                                               {"state", "other"});
const Binder<SparsityRowSummariesParams, ViewArg, ViewArg, ViewArg, ViewArg, ViewArg, ViewArg> kSparsityRowSummaries(
    "sparsity_row_summaries", make_sparsity_row_summaries,
    {"row_counts", "row_out", "hist_divisor", "sums", "defined", "hist"});

#if REPKERN_CUDA_LAUNCHERS
SparsityFeaturesParams make_sparsity_features(const ViewArg& x_arg, const double& eps, const ViewArg& partials_arg,
                                              const ViewArg& totals_arg, const ViewArg& state_arg,
                                              const ViewArg& rows_out_arg, const ViewArg& counts_arg) {
  const Rows x = rows_of(x_arg, "x");
  SparsityFeaturesParams p{};
  x.fill(p);
  p.eps = eps;
  const DType acc = accumulation_dtype(x.v.dtype);
  const cuda::SparsityPlan plan = cuda::sparsity_plan(x.v.dtype, x.rows, x.d);
  p.partials = view(partials_arg, "partials").expect(acc, {plan.splits, kFeatureFields, x.d}).data;
  p.row_totals = view(totals_arg, "row_totals").expect(DType::Float64, {kRowTotals, x.rows}).as<double>();
  p.feature_state = view(state_arg, "feature_state").expect(DType::Float64, {kFeatureFields, x.d}).as<double>();
  const TensorView row_out = view(rows_out_arg, "row_out");
  if (row_out.sizes.size() != 2 || row_out.sizes[0] < kRowSortFree)
    throw std::invalid_argument("row_out: expected shape [channels >= " + std::to_string(int(kRowSortFree)) +
                                ", rows]");
  p.channels = row_out.sizes[0];
  p.row_out = row_out.expect(acc, {p.channels, x.rows}).data;
  p.row_counts = view(counts_arg, "row_counts").expect(DType::Int64, {kRowCounts, x.rows}).as<int64_t>();
  return p;
}

SparsityOrderedParams make_sparsity_ordered(const ViewArg& x_arg, const OptView& sorted_arg, const int64_t& row_begin,
                                            const int64_t& row_end, const ViewArg& top_p_arg, const ViewArg& totals_arg,
                                            const ViewArg& sums_arg, const ViewArg& rows_out_arg) {
  const Rows x = rows_of(x_arg, "x");
  if (row_begin < 0 || row_end < row_begin || row_end > x.rows)
    throw std::invalid_argument("row_begin/row_end: not a range of rows of x");
  SparsityOrderedParams p{};
  const DType acc = accumulation_dtype(x.v.dtype);
  x.fill(p);
  p.row_begin = row_begin;
  p.row_end = row_end;
  p.sorted = opt_data<const void>(sorted_arg, "sorted", acc, {row_end - row_begin, x.d});
  p.num_top_p = top_p_count(top_p_arg);
  p.top_p = view(top_p_arg, "top_p").as<const double>();
  p.row_totals = view(totals_arg, "row_totals").expect(DType::Float64, {kRowTotals, x.rows}).as<const double>();
  p.sums = view(sums_arg, "ordered_sums").expect(DType::Float64, {ordered_sums(p.num_top_p), x.rows}).as<double>();
  p.row_out = view(rows_out_arg, "row_out").expect(acc, {row_channels(p.num_top_p, true), x.rows}).data;
  return p;
}

const Binder<SparsityFeaturesParams, ViewArg, double, ViewArg, ViewArg, ViewArg, ViewArg, ViewArg> kSparsityFeatures(
    "sparsity_features", make_sparsity_features,
    {"x", "eps", "partials", "row_totals", "feature_state", "row_out", "row_counts"});
const Binder<SparsityOrderedParams, ViewArg, OptView, int64_t, int64_t, ViewArg, ViewArg, ViewArg, ViewArg>
    kSparsityOrdered("sparsity_ordered", make_sparsity_ordered,
                     {"x", "sorted", "row_begin", "row_end", "top_p", "row_totals", "ordered_sums", "row_out"});

DType dtype_arg(int code) {
  if (code < 0 || code >= kNumDTypes) throw std::invalid_argument("dtype: unsupported code");
  return DType(code);
}
#endif  // REPKERN_CUDA_LAUNCHERS

}  // namespace

void def_sparsity(py::module_& m) {
  std::vector<std::string> fields(std::begin(kFeatureFieldNames), std::end(kFeatureFieldNames));
  std::vector<std::string> counts(std::begin(kRowCountNames), std::end(kRowCountNames));
  std::vector<std::string> channels(std::begin(kRowChannelNames), std::end(kRowChannelNames));
  m.attr("SPARSITY_FEATURE_FIELDS") = py::tuple(py::cast(fields));
  m.attr("SPARSITY_ROW_COUNTS") = py::tuple(py::cast(counts));      // int64 row counts
  m.attr("SPARSITY_ROW_CHANNELS") = py::tuple(py::cast(channels));  // then top_p_l1[P], top_p_l2[P]
  m.attr("SPARSITY_SORT_FREE_CHANNELS") = int(kRowSortFree);
  m.attr("SPARSITY_ROW_TOTALS") = int(kRowTotals);
  m.attr("SPARSITY_ORDERED_SUMS") = int(kSumTopP);  // then 2 per top-p fraction
  m.attr("SPARSITY_MAX_TOP_P") = kMaxTopP;
  m.attr("SPARSITY_TOP_K_TOLERANCE") = kTopKTolerance;
  REPKERN_BIND_CPU(m, kSparsityStats, sparsity_stats);
  REPKERN_BIND_CPU(m, kSparsityMergeStates, sparsity_merge_states);
  REPKERN_BIND_CPU(m, kSparsityRowSummaries, sparsity_row_summaries);
#if REPKERN_CUDA_LAUNCHERS
  m.def(
      "sparsity_plan_cuda",
      [](int dtype, int64_t rows, int64_t d, uint64_t /*stream: calling convention; the plan reads the device*/) {
        const cuda::SparsityPlan plan = cuda::sparsity_plan(dtype_arg(dtype), rows, d);
        return std::make_tuple(plan.strips, plan.splits);
      },
      py::arg("dtype"), py::arg("rows"), py::arg("d"), py::arg("stream"));
  m.def(
      "sparsity_max_smem_sort_cuda",
      [](int dtype, uint64_t /*stream*/) { return cuda::sparsity_max_smem_sort(dtype_arg(dtype)); }, py::arg("dtype"),
      py::arg("stream"));
  REPKERN_BIND_CUDA(m, kSparsityFeatures, sparsity_features);
  REPKERN_BIND_CUDA(m, kSparsityOrdered, sparsity_ordered);
#endif
}

}  // namespace repkern::bindings
