// Bindings of the Gram epilogue (gram.h).
#include "gram.h"

#include "bindings/binder.h"

namespace repkern::bindings {
namespace {

GramEpilogueParams make_gram_epilogue(const int& kind_code, const int& pass_code, const ViewArg& inner_arg,
                                      const OptView& aux_arg, const OptView& out_arg, const OptView& scale_arg,
                                      const OptView& row_sums_arg, const OptView& totals_arg) {
  if (kind_code < 0 || kind_code > int(GramKind::RbfFromSqDist)) throw std::invalid_argument("kind: unknown code");
  if (pass_code < 0 || pass_code > int(GramPass::WriteCentered)) throw std::invalid_argument("pass_: unknown code");
  GramEpilogueParams p{};
  p.kind = GramKind(kind_code);
  p.pass = GramPass(pass_code);
  const TensorView inner = view(inner_arg, "inner");
  if (inner.sizes.size() != 3 || inner.sizes[1] != inner.sizes[2])
    throw std::invalid_argument("inner: expected shape [B, n, n]");
  p.batch = inner.sizes[0];
  p.n = inner.sizes[1];
  p.acc_dtype = accumulation_of(inner);
  p.inner = inner.expect(p.acc_dtype, {p.batch, p.n, p.n}).data;
  p.out_dtype = p.acc_dtype;  // RowSums writes no output
  if (p.pass != GramPass::RowSums) {
    if (!out_arg) throw std::invalid_argument("out: required for this pass");
    const TensorView out = view(*out_arg, "out");
    p.out_dtype = out.dtype;
    p.out = out.expect(out.dtype, {p.batch, p.n, p.n}).data;
  }
  if (gram_needs_aux(p.kind)) {
    if (!aux_arg) throw std::invalid_argument("aux: required for this kind");
    p.aux = view(*aux_arg, "aux").expect(p.acc_dtype, {p.batch, p.n}).data;
  }
  if (p.kind == GramKind::Rbf || p.kind == GramKind::RbfFromSqDist) {
    if (!scale_arg) throw std::invalid_argument("scale: required for the rbf kernel");
    p.scale = view(*scale_arg, "scale").expect(p.acc_dtype, {p.batch}).data;
  }
  if (p.pass != GramPass::Write) {
    if (!row_sums_arg) throw std::invalid_argument("row_sums: required for centering");
    p.row_sums = view(*row_sums_arg, "row_sums").expect(DType::Float64, {p.batch, p.n}).as<double>();
  }
  if (p.pass == GramPass::WriteCentered) {
    if (!totals_arg) throw std::invalid_argument("totals: required for centering");
    p.totals = view(*totals_arg, "totals").expect(DType::Float64, {p.batch}).as<const double>();
  }
  return p;
}

const Binder<GramEpilogueParams, int, int, ViewArg, OptView, OptView, OptView, OptView, OptView> kGramEpilogue(
    "gram_epilogue", make_gram_epilogue, {"kind", "pass_", "inner", "aux", "out", "scale", "row_sums", "totals"});

MedianSelectParams make_median_select(const ViewArg& d_arg, const std::vector<int64_t>& ranks,
                                      const ViewArg& values_arg, const ViewArg& positions_arg) {
  MedianSelectParams p{};
  const TensorView d = view(d_arg, "d");
  if (d.sizes.size() != 3 || d.sizes[1] != d.sizes[2]) throw std::invalid_argument("d: expected shape [B, n, n]");
  p.batch = d.sizes[0];
  p.n = d.sizes[1];
  p.dtype = accumulation_of(d);
  p.d = d.expect(p.dtype, {p.batch, p.n, p.n}).data;
  if (ranks.empty() || ranks.size() > size_t(kMedianSelectMaxRanks))
    throw std::invalid_argument("ranks: expected 1 or 2 ranks");
  const int64_t count = p.n * (p.n - 1) / 2;
  for (size_t r = 0; r < ranks.size(); ++r) {
    if (ranks[r] < 1 || ranks[r] > count)
      throw std::invalid_argument("ranks: " + std::to_string(ranks[r]) + " is outside [1, " + std::to_string(count) +
                                  "], the entries of the strict upper triangle");
    p.ranks[r] = ranks[r];
  }
  p.num_ranks = int(ranks.size());
  p.values = view(values_arg, "values").expect(p.dtype, {p.batch, int64_t(p.num_ranks)}).data;
  p.positions = view(positions_arg, "positions").expect(DType::Int64, {p.batch, int64_t(p.num_ranks)}).as<int64_t>();
  return p;
}

const Binder<MedianSelectParams, ViewArg, std::vector<int64_t>, ViewArg, ViewArg> kMedianSelect(
    "median_select", make_median_select, {"d", "ranks", "values", "positions"});

// x [B, n, d] float32 of the register-tiled product kernels: its data, and its sizes into batch, n, d.
const float* float32_matrices(const ViewArg& x_arg, int64_t& batch, int64_t& n, int64_t& d) {
  const TensorView x = view(x_arg, "x");
  if (x.sizes.size() != 3) throw std::invalid_argument("x: expected shape [B, n, d]");
  batch = x.sizes[0];
  n = x.sizes[1];
  d = x.sizes[2];
  return x.expect(DType::Float32, {batch, n, d}).as<const float>();
}

InnerProductsParams make_inner_products(const ViewArg& x_arg, const ViewArg& out_arg) {
  InnerProductsParams p{};
  p.x = float32_matrices(x_arg, p.batch, p.n, p.d);
  p.out = view(out_arg, "out").expect(DType::Float32, {p.batch, p.n, p.n}).as<float>();
  return p;
}

const Binder<InnerProductsParams, ViewArg, ViewArg> kInnerProducts("inner_products", make_inner_products,
                                                                   {"x", "out"});

XtxSqNormParams make_xtx_sq_norm(const ViewArg& x_arg, const ViewArg& out_arg) {
  XtxSqNormParams p{};
  p.x = float32_matrices(x_arg, p.batch, p.n, p.d);
  p.out = view(out_arg, "out").expect(DType::Float64, {p.batch}).as<double>();
  return p;
}

const Binder<XtxSqNormParams, ViewArg, ViewArg> kXtxSqNorm("xtx_sq_norm", make_xtx_sq_norm, {"x", "out"});

}  // namespace

void def_gram(py::module_& m) {
  py::enum_<GramKind>(m, "GramKind", py::module_local())
      .value("LINEAR", GramKind::Linear)
      .value("COSINE", GramKind::Cosine)
      .value("RBF", GramKind::Rbf)
      .value("SQDIST", GramKind::SqDist)
      .value("RBF_FROM_SQDIST", GramKind::RbfFromSqDist);
  py::enum_<GramPass>(m, "GramPass", py::module_local())
      .value("WRITE", GramPass::Write)
      .value("ROW_SUMS", GramPass::RowSums)
      .value("WRITE_CENTERED", GramPass::WriteCentered);
  REPKERN_BIND(m, kGramEpilogue, gram_epilogue);
  REPKERN_BIND_CPU(m, kMedianSelect, median_select);
  REPKERN_BIND_CPU(m, kInnerProducts, inner_products);
  REPKERN_BIND_CPU(m, kXtxSqNorm, xtx_sq_norm);
}

}  // namespace repkern::bindings
