// Bindings of the HSIC-terms kernel (cka.h).
#include "cka.h"

#include "bindings/binder.h"

namespace repkern::bindings {
namespace {

HsicTermsParams make_hsic_terms(const int& kind_code, const std::vector<ViewArg>& block_args, const OptView& aux_arg,
                                const OptView& scale_arg, const ViewArg& pairs_arg, const ViewArg& cross_arg,
                                const ViewArg& row_sums_arg, const ViewArg& diag_arg, const int64_t& r0,
                                const int64_t& c0, const bool& diagonal_block) {
  if (kind_code < 0 || kind_code > int(GramKind::RbfFromSqDist) || !hsic_kind_supported(GramKind(kind_code)))
    throw std::invalid_argument("kind: unsupported for hsic_terms");
  if (block_args.empty()) throw std::invalid_argument("blocks: expected at least one matrix block");
  HsicTermsParams p{};
  p.kind = GramKind(kind_code);
  p.r0 = r0;
  p.c0 = c0;
  p.diagonal_block = diagonal_block;
  const int64_t m = int64_t(block_args.size());
  for (size_t a = 0; a < block_args.size(); ++a) {
    const TensorView b = view(block_args[a], "blocks");
    if (b.sizes.size() != 2) throw std::invalid_argument("blocks: expected [rows, cols] matrices");
    if (a == 0) {
      p.acc_dtype = accumulation_of(b);
      p.rows = b.sizes[0];
      p.cols = b.sizes[1];
    }
    p.blocks.push_back(b.expect(p.acc_dtype, {p.rows, p.cols}).data);
  }
  const TensorView row_sums = view(row_sums_arg, "row_sums");
  if (row_sums.sizes.size() != 2 || row_sums.sizes[0] != m)
    throw std::invalid_argument("row_sums: expected shape [m, n]");
  p.n = row_sums.sizes[1];
  p.row_sums = row_sums.expect(DType::Float64, {m, p.n}).as<double>();
  p.diag = view(diag_arg, "diag").expect(DType::Float64, {m, p.n}).as<double>();
  if (r0 < 0 || c0 < 0 || r0 + p.rows > p.n || c0 + p.cols > p.n)
    throw std::invalid_argument("r0/c0: the block lies outside the n×n matrices");
  if (diagonal_block && (r0 != c0 || p.rows != p.cols))
    throw std::invalid_argument("diagonal_block: needs r0 == c0 and a square block");
  if (gram_needs_aux(p.kind)) {
    if (!aux_arg) throw std::invalid_argument("aux: required for this kind");
    p.aux = view(*aux_arg, "aux").expect(p.acc_dtype, {m, p.n}).data;
  }
  if (p.kind == GramKind::Rbf || p.kind == GramKind::RbfFromSqDist) {
    if (!scale_arg) throw std::invalid_argument("scale: required for the rbf kernel");
    p.scale = view(*scale_arg, "scale").expect(p.acc_dtype, {m}).data;
  }
  const TensorView pairs = view(pairs_arg, "pairs");  // host memory: the CUDA launcher plans its launches from it
  if (pairs.sizes.size() != 2 || pairs.sizes[1] != 2) throw std::invalid_argument("pairs: expected shape [P, 2]");
  p.num_pairs = pairs.sizes[0];
  p.pairs = pairs.expect(DType::Int64, {p.num_pairs, 2}).as<const int64_t>();
  for (int64_t i = 0; i < 2 * p.num_pairs; ++i)
    if (p.pairs[i] < 0 || p.pairs[i] >= m) throw std::invalid_argument("pairs: matrix index out of range");
  p.cross = view(cross_arg, "cross").expect(DType::Float64, {p.num_pairs}).as<double>();
  return p;
}

const Binder<HsicTermsParams, int, std::vector<ViewArg>, OptView, OptView, ViewArg, ViewArg, ViewArg, ViewArg, int64_t,
             int64_t, bool>
    kHsicTerms("hsic_terms", make_hsic_terms,
               {"kind", "blocks", "aux", "scale", "pairs", "cross", "row_sums", "diag", "r0", "c0", "diagonal_block"});

}  // namespace

void def_cka(py::module_& m) { REPKERN_BIND(m, kHsicTerms, hsic_terms); }

}  // namespace repkern::bindings
