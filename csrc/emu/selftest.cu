#include "emu/selftest.h"

#include <string>

#include "common/launch.h"

namespace repkern::emu_selftest {
namespace {

auto no_shape = [] { return std::string("selftest"); };

__global__ void block_sum_kernel(const float* x, float* out, int n, bool with_barrier) {
  RK_SHARED(float, s, [1024]);
  const int t = threadIdx.x;
  s[t] = x[t];
  if (with_barrier) __syncthreads();
  for (int stride = n / 2; stride > 0; stride /= 2) {
    if (t < stride) s[t] += s[t + stride];
    if (with_barrier) __syncthreads();
  }
  if (t == 0) *out = s[0];
}

__global__ void warp_ops_kernel(int32_t* out_i, float* out_f, double* out_d, float* sum_f, double* sum_d) {
  RK_DYNAMIC_SMEM(int32_t, dyn);
  const int lane = threadIdx.x;
  const int g = blockIdx.x * 32 + lane;
  int32_t* o = out_i + g * 10;
  o[0] = __shfl_sync(0xffffffffu, lane * 10, lane ^ 3);
  o[1] = __shfl_sync(0xffffffffu, lane * 10, 0, 8);
  o[2] = __shfl_up_sync(0xffffffffu, lane * 10, 1);
  o[3] = __shfl_down_sync(0xffffffffu, lane * 10, 2, 16);
  o[4] = __shfl_xor_sync(0xffffffffu, lane * 10, 4);
  o[5] = int32_t(__ballot_sync(0xffffffffu, lane & 1));
  o[6] = __any_sync(0xffffffffu, lane == 5);
  o[7] = __all_sync(0xffffffffu, lane < 32);
  o[8] = __all_sync(0xffffffffu, lane < 31);
  dyn[lane] = lane + 100 * int(blockIdx.x);
  __syncwarp();
  o[9] = dyn[(lane + 1) % 32];
  out_f[g] = __shfl_down_sync(0xffffffffu, lane * 0.5f, 1);
  out_d[g] = __shfl_xor_sync(0xffffffffu, double(lane), 1);
  atomicAdd(sum_f, float(lane + 1));
  atomicAdd(sum_d, double(lane + 1));
}

__global__ void schedule_order_kernel(int32_t* order, int32_t* counter) {
  const int slot = atomicAdd(counter, 1);
  order[slot] = int32_t(blockIdx.x * blockDim.x + threadIdx.x);
}

template <int Words>
__global__ void static_smem_kernel(int32_t* out) {
  RK_SHARED(int32_t, words, [Words]);
  const int t = threadIdx.x;
  out[blockIdx.x * blockDim.x + t] = t < Words ? words[t] : -1;  // before any write of this block
  __syncthreads();
  if (t < Words) words[t] = int32_t(blockIdx.x) * 1000 + t;
}

__global__ void coverage_loop_kernel(int iterations, int32_t* out) {
  RK_SHARED(int32_t, s, [64]);
  const int t = threadIdx.x;
  int32_t acc = 0;
  for (int i = 0; i < iterations; ++i) {
    s[t] = i + t;
    __syncthreads();
    acc += __shfl_xor_sync(0xffffffffu, s[t], 1);
    acc += int32_t(__popc(__ballot_sync(0xffffffffu, t & 1)) - 16);  // 16 odd lanes: adds 0
    __syncthreads();
  }
  __syncthreads();
  if (t < 32) __syncwarp();
  out[blockIdx.x * blockDim.x + t] = acc;
}

__global__ void run_ahead_kernel(int32_t* order, int32_t* counter) {
  const int t = threadIdx.x;
  order[2 * t] = atomicAdd(counter, 1);
  __syncwarp();
  order[2 * t + 1] = atomicAdd(counter, 1);
}

__global__ void bug_shfl_partial(float* scratch) {
  const int lane = threadIdx.x % 32;
  float v = scratch[lane];
  if (lane < 16) v = __shfl_down_sync(0xffffffffu, v, 8);
  scratch[lane] = v;
}

__global__ void bug_shfl_full_mask(float* scratch) {
  const int lane = threadIdx.x % 32;
  scratch[lane] = __shfl_xor_sync(0xffffffffu, scratch[lane], 1);
}

__global__ void bug_shfl_reads_outside(float* scratch) {
  const int lane = threadIdx.x % 32;
  if (lane < 16) scratch[lane] = __shfl_down_sync(0x0000ffffu, scratch[lane], 8, 32);
}

__global__ void bug_mask_without_self(float* scratch) {
  const int lane = threadIdx.x % 32;
  scratch[lane] = float(__ballot_sync(0x0000fffeu, lane > 3));
}

__global__ void bug_barrier_after_exit(float* scratch) {
  if (threadIdx.x == 0) return;
  scratch[threadIdx.x] = 1.0f;
  __syncthreads();
}

__global__ void bug_barrier_divergent(float* scratch) {
  if (threadIdx.x < 32) {
    scratch[threadIdx.x] = 1.0f;
    __syncthreads();
  } else {
    scratch[threadIdx.x - 32] += 1.0f;
    __syncthreads();
  }
}

}  // namespace

void block_sum(const float* x, float* out, int n, bool with_barrier) {
  LaunchShape shape;
  shape.block = dim3(unsigned(n));
  launch_kernel("block_sum", no_shape, block_sum_kernel, shape, x, out, n, with_barrier);
}

void warp_ops(int blocks, int32_t* out_i, float* out_f, double* out_d, float* sum_f, double* sum_d) {
  LaunchShape shape;
  shape.grid = dim3(unsigned(blocks));
  shape.block = dim3(32);
  shape.dynamic_smem = 32 * sizeof(int32_t);
  launch_kernel("warp_ops", no_shape, warp_ops_kernel, shape, out_i, out_f, out_d, sum_f, sum_d);
}

void static_smem_poison(int blocks, int32_t* out) {
  LaunchShape shape;
  shape.grid = dim3(unsigned(blocks));
  shape.block = dim3(64);
  launch_kernel("static_smem", no_shape, static_smem_kernel<32>, shape, out);
  launch_kernel("static_smem", no_shape, static_smem_kernel<64>, shape, out + blocks * 64);
}

void coverage_loop(int blocks, int iterations, int32_t* out) {
  LaunchShape shape;
  shape.grid = dim3(unsigned(blocks));
  shape.block = dim3(64);
  launch_kernel("coverage_loop", no_shape, coverage_loop_kernel, shape, iterations, out);
}

void run_ahead(int warps, int32_t* order) {
  int32_t counter = 0;
  LaunchShape shape;
  shape.block = dim3(unsigned(32 * warps));
  launch_kernel("run_ahead", no_shape, run_ahead_kernel, shape, order, &counter);
}

std::vector<CoverageRecord> coverage() {
  std::vector<CoverageRecord> out;
  for (const repkern_emu::CoverageEntry& e : repkern_emu::coverage())
    out.push_back({e.kernel, e.file, e.line, e.what, e.function, e.max_passes});
  return out;
}

void reset_coverage() { repkern_emu::reset_coverage(); }

std::vector<SharedRegionRecord> shared_regions() {
  std::vector<SharedRegionRecord> out;
  for (const repkern_emu::SharedRegionInfo& r : repkern_emu::shared_regions()) out.push_back({r.file, r.line, r.name});
  return out;
}

void schedule_order(int blocks, int threads, int32_t* order) {
  int32_t counter = 0;
  LaunchShape shape;
  shape.grid = dim3(unsigned(blocks));
  shape.block = dim3(unsigned(threads));
  launch_kernel("schedule_order", no_shape, schedule_order_kernel, shape, order, &counter);
}

void planted_bug(Bug bug, float* scratch) {
  LaunchShape warp;
  warp.block = dim3(32);
  LaunchShape half_warp;
  half_warp.block = dim3(16);
  LaunchShape two_warps;
  two_warps.block = dim3(64);
  switch (bug) {
    case Bug::ShflMaskPartial: return launch_kernel("bug", no_shape, bug_shfl_partial, warp, scratch);
    case Bug::ShflMaskAbsent: return launch_kernel("bug", no_shape, bug_shfl_full_mask, half_warp, scratch);
    case Bug::ShflReadsOutside: return launch_kernel("bug", no_shape, bug_shfl_reads_outside, warp, scratch);
    case Bug::MaskWithoutSelf: return launch_kernel("bug", no_shape, bug_mask_without_self, warp, scratch);
    case Bug::BarrierAfterExit: return launch_kernel("bug", no_shape, bug_barrier_after_exit, two_warps, scratch);
    case Bug::BarrierDivergent: return launch_kernel("bug", no_shape, bug_barrier_divergent, two_warps, scratch);
    case Bug::SmemOverLimit: {
      LaunchShape big = warp;
      big.dynamic_smem = 64 * 1024;
      return launch_kernel("bug", no_shape, bug_shfl_full_mask, big, scratch);
    }
    case Bug::GridTooLarge: {
      LaunchShape tall = warp;
      tall.grid = dim3(1, 65536);
      return launch_kernel("bug", no_shape, bug_shfl_full_mask, tall, scratch);
    }
  }
}

void check_schedule() {
  try {
    ::repkern_emu::detail::schedule_from_env();
  } catch (const ::repkern_emu::EmuError& e) {
    throw std::invalid_argument(e.what());
  }
}

}  // namespace repkern::emu_selftest
