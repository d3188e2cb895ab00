// Bindings of the emulator's own self-tests (emu/selftest.h); repkern._emu only.
#include "bindings/binder.h"
#include "emu/selftest.h"

namespace repkern::bindings {

void def_emu_selftest(py::module_& m) {
  namespace st = emu_selftest;
  // REPKERN_EMU_SCHEDULE as the next launch will read it; ValueError naming the variable if it is garbage.
  m.def("check_schedule", &st::check_schedule);
  m.def("selftest_block_sum", [](const ViewArg& x, const ViewArg& out, bool with_barrier) {
    const TensorView xv = view(x, "x");
    const int64_t n = xv.numel();
    if (n < 1 || n > 1024 || (n & (n - 1)) != 0) throw std::invalid_argument("x: numel must be a power of two <= 1024");
    xv.expect(DType::Float32, {n});
    const TensorView ov = view(out, "out");
    ov.expect(DType::Float32, {1});
    py::gil_scoped_release release;
    st::block_sum(xv.as<const float>(), ov.as<float>(), int(n), with_barrier);
  });
  m.def("selftest_warp_ops", [](int blocks, const ViewArg& out_i, const ViewArg& out_f, const ViewArg& out_d,
                                const ViewArg& sums_f, const ViewArg& sums_d) {
    if (blocks < 1 || blocks > 1024) throw std::invalid_argument("blocks: expected 1..1024");
    const int64_t threads = int64_t(blocks) * 32;
    const TensorView oi = view(out_i, "out_i"), f = view(out_f, "out_f"), d = view(out_d, "out_d"),
                     sf = view(sums_f, "sum_f"), sd = view(sums_d, "sum_d");
    oi.expect(DType::Int32, {threads, 10});
    f.expect(DType::Float32, {threads});
    d.expect(DType::Float64, {threads});
    sf.expect(DType::Float32, {1});
    sd.expect(DType::Float64, {1});
    py::gil_scoped_release release;
    st::warp_ops(blocks, oi.as<int32_t>(), f.as<float>(), d.as<double>(), sf.as<float>(), sd.as<double>());
  });
  m.def("selftest_schedule_order", [](int blocks, int threads, const ViewArg& order) {
    if (blocks < 1 || threads < 1 || threads > 1024) throw std::invalid_argument("blocks/threads: out of range");
    const TensorView o = view(order, "order");
    o.expect(DType::Int32, {int64_t(blocks) * threads});
    py::gil_scoped_release release;
    st::schedule_order(blocks, threads, o.as<int32_t>());
  });
  m.def("selftest_planted_bug", [](int bug, const ViewArg& scratch) {
    const TensorView s = view(scratch, "scratch");
    s.expect(DType::Float32, {64});
    if (bug < 0 || bug > int(st::Bug::GridTooLarge)) throw std::invalid_argument("bug: unknown code");
    py::gil_scoped_release release;
    st::planted_bug(st::Bug(bug), s.as<float>());
  });
  m.def("selftest_static_smem", [](int blocks, const ViewArg& out) {
    if (blocks < 1 || blocks > 1024) throw std::invalid_argument("blocks: expected 1..1024");
    const TensorView o = view(out, "out");
    o.expect(DType::Int32, {2, int64_t(blocks) * 64});
    py::gil_scoped_release release;
    st::static_smem_poison(blocks, o.as<int32_t>());
  });
  m.def("selftest_coverage_loop", [](int blocks, int iterations, const ViewArg& out) {
    if (blocks < 1 || blocks > 1024 || iterations < 0) throw std::invalid_argument("blocks/iterations: out of range");
    const TensorView o = view(out, "out");
    o.expect(DType::Int32, {int64_t(blocks) * 64});
    py::gil_scoped_release release;
    st::coverage_loop(blocks, iterations, o.as<int32_t>());
  });
  m.def("selftest_run_ahead", [](int warps, const ViewArg& order) {
    if (warps < 1 || warps > 32) throw std::invalid_argument("warps: expected 1..32");
    const TensorView o = view(order, "order");
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
        for (const st::SharedRegionRecord& r : st::shared_regions()) out.append(py::make_tuple(r.file, r.line, r.name));
        return out;
      },
      "The RK_SHARED arrays poisoned so far: a list of (file, line, name).");
}

}  // namespace repkern::bindings
