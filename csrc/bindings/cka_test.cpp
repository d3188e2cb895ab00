// Bindings of cka_test's replicate kernel (cka_test.h).
#include "cka_test.h"

#include "bindings/binder.h"

namespace repkern::bindings {
namespace {

ReplicateRowsParams make_replicate_rows(const int& mode_code, const ViewArg& a_arg, const ViewArg& b_arg,
                                        const ViewArg& columns_arg, const ViewArg& out_arg,
                                        const ViewArg& error_arg) {
  if (mode_code != int(ReplicateMode::Permute) && mode_code != int(ReplicateMode::Bootstrap))
    throw std::invalid_argument("mode: unsupported for replicate_rows");
  ReplicateRowsParams p{};
  p.mode = ReplicateMode(mode_code);
  const TensorView a = view(a_arg, "a");
  if (a.sizes.size() != 2 || a.sizes[0] != a.sizes[1]) throw std::invalid_argument("a: expected shape [n, n]");
  p.n = a.sizes[0];
  p.dtype = accumulation_of(a);
  p.a = a.expect(p.dtype, {p.n, p.n}).data;
  p.b = view(b_arg, "b").expect(p.dtype, {p.n, p.n}).data;
  const TensorView columns = view(columns_arg, "columns");
  if (columns.sizes.size() != 2 || columns.sizes[1] != p.n)
    throw std::invalid_argument("columns: expected shape [R, n]");
  p.replicates = columns.sizes[0];
  // Permutation indices are device memory for the CUDA entry: the kernels check them (cka_test.h).
  if (p.mode == ReplicateMode::Permute) {
    p.index = columns.expect(DType::Int32, {p.replicates, p.n}).as<const int32_t>();
  } else {
    p.weight = columns.expect(DType::Float32, {p.replicates, p.n}).as<const float>();
  }
  p.out = view(out_arg, "out").expect(DType::Float64, {p.replicates, p.n, replicate_channels(p.mode)}).as<double>();
  p.error = view(error_arg, "error").expect(DType::Int32, {1}).as<int32_t>();
  return p;
}

const Binder<ReplicateRowsParams, int, ViewArg, ViewArg, ViewArg, ViewArg, ViewArg> kReplicateRows(
    "replicate_rows", make_replicate_rows, {"mode", "a", "b", "columns", "out", "error"});

}  // namespace

void def_cka_test(py::module_& m) {
  py::enum_<ReplicateMode>(m, "ReplicateMode", py::module_local())
      .value("PERMUTE", ReplicateMode::Permute)
      .value("BOOTSTRAP", ReplicateMode::Bootstrap);
  py::dict channels;  // row-sum channels per replicate of each mode
  for (ReplicateMode mode : {ReplicateMode::Permute, ReplicateMode::Bootstrap})
    channels[py::int_(int(mode))] = replicate_channels(mode);
  m.attr("REPLICATE_CHANNELS") = channels;
  REPKERN_BIND(m, kReplicateRows, replicate_rows);
}

}  // namespace repkern::bindings
