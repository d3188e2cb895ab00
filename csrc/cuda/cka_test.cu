// CUDA replicate row sums (common/cka_test_math.h): one warp per (row i, replicate r),
// lanes striding over the columns with 16-byte loads of A's row (Bootstrap: and B's; and of
// the replicate's permutation or weights), two vectors in flight per lane; Permute reads the columns
// j > i only (from the vector holding i + 1) and gathers B's row π_r(i) at π_r(j) (the row,
// n·sizeof(T), stays in L1/L2 while the warp reads it). Warp-shuffle
// sums in float64; lane 0 writes the (r, i) entry: no atomics, so the result is the same
// bits on every run. Consecutive warps take consecutive replicates of one row, so a block
// reads A's row from DRAM once for kWarps replicates. Grid: kBlocksPerSM blocks per SM,
// grid-stride over the n·R items.
//
// Permute checks every index it reads (common/index_check.h): an item whose row index π_r(i) is
// outside [0, n) is written as 0, a column index outside it adds nothing; both set kBadPermutation.
//
// Minimum traffic: Permute A's upper triangle and B once (1.5·n²·sizeof(T); B's gathered rows
// come from cache after their first read), Bootstrap A and B once (2·n²·sizeof(T)); the R·n indices
// or weights (4 bytes each) and R·n·C float64 outputs. Reads through the cache per launch:
// R·n²/2·(sizeof(T) + 4 + sizeof(T)) (Permute) or R·n²·(2·sizeof(T) + 4) (Bootstrap). FLOPs
// (float64): R·n² (Permute: 2 per upper entry), 10·R·n² (Bootstrap: w·a, w·b and the five sums of
// replicate_add).
#include <string>
#include <type_traits>

#include "cka_test.h"
#include "common/launch.h"
#include "common/math.h"
#include "cuda/packed.cuh"
#include "cuda/reduce.cuh"

namespace repkern::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBlocksPerSM = 4;
constexpr int kUnroll = 2;  // vectors in flight per lane

template <ReplicateMode M, typename T, bool Vec>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM)
    replicate_rows_kernel(const T* __restrict__ a,             // [n, n]
                          const T* __restrict__ b,             // [n, n]
                          const void* __restrict__ companion,  // [R, n] int32 π (Permute) or float w (Bootstrap)
                          double* __restrict__ out,            // [R, n, C]
                          int32_t* __restrict__ error,         // [1]
                          int64_t replicates, int64_t n) {
  constexpr int C = replicate_channels(M);
  constexpr int V = Vec ? kVec16<T> : 1;
  using Companion = std::conditional_t<M == ReplicateMode::Permute, int32_t, float>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t items = n * replicates;
  const int64_t stride = int64_t(gridDim.x) * kWarps;
  for (int64_t item = int64_t(blockIdx.x) * kWarps + warp; item < items; item += stride) {  // warp-uniform
    const int64_t i = item / replicates, r = item % replicates;
    const T* a_row = a + i * n;
    const Companion* col = static_cast<const Companion*>(companion) + r * n;  // π_r or w_r
    int64_t b_index = i;
    if constexpr (M == ReplicateMode::Permute) {
      b_index = int64_t(col[i]);  // warp-uniform
      if (b_index < 0 || b_index >= n) {
        if (lane == 0) {
          atomicOr(error, int32_t(kBadPermutation));
          out[(r * n + i) * C] = 0.0;
        }
        continue;
      }
    }
    const T* b_row = b + b_index * n;
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0;
    const int64_t first = M == ReplicateMode::Permute ? (i + 1) / V * V : 0;  // whole vectors only
    for (int64_t j0 = first + int64_t(lane) * V; j0 < n; j0 += int64_t(32) * V * kUnroll) {
      Packed<T, V> av[kUnroll] = {};
      Packed<Companion, V> cv[kUnroll] = {};
      [[maybe_unused]] Packed<T, V> bv[kUnroll] = {};  // Bootstrap: B's row i, read like A's
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {  // all loads first: kUnroll vectors in flight
        const int64_t j = j0 + int64_t(u) * 32 * V;
        if (j < n) {  // n % V == 0 when Vec: a vector is whole or absent
          av[u] = load_packed<V>(a_row + j);
          cv[u] = load_packed<V>(col + j);
          if constexpr (M == ReplicateMode::Bootstrap) bv[u] = load_packed<V>(b_row + j);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = j0 + int64_t(u) * 32 * V;
        if (j < n) {
#pragma unroll
          for (int v = 0; v < V; ++v) {
            if constexpr (M == ReplicateMode::Permute) {
              const int32_t c = cv[u].v[v];
              const bool ok = c >= 0 && int64_t(c) < n;
              if (!ok) atomicOr(error, int32_t(kBadPermutation));
              const bool upper = j + v > i;
              replicate_add<M>(s0, s1, s2, s3, s4, upper ? double(av[u].v[v]) : 0.0,
                               ok && upper ? double(b_row[c]) : 0.0, 1.0);
            } else {
              replicate_add<M>(s0, s1, s2, s3, s4, double(av[u].v[v]), double(bv[u].v[v]), double(cv[u].v[v]));
            }
          }
        }
      }
    }
    s0 = warp_sum(s0);
    if constexpr (M == ReplicateMode::Permute) s0 = double(a_row[i]) * double(b_row[b_index]) + 2 * s0;  // P_ii
    const double s[5] = {s0, C > 1 ? warp_sum(s1) : 0.0, C > 1 ? warp_sum(s2) : 0.0, C > 1 ? warp_sum(s3) : 0.0,
                         C > 1 ? warp_sum(s4) : 0.0};
    if (lane == 0) {
#pragma unroll
      for (int c = 0; c < C; ++c) out[(r * n + i) * C + c] = s[c];
    }
  }
}

template <ReplicateMode M, typename T>
void launch(const T* a, const T* b, const int32_t* index, const float* weight, double* out, int32_t* error,
            int64_t replicates, int64_t n, void* stream) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool vec = n % kVec16<T> == 0 && aligned(a) && aligned(b) && aligned(index) && aligned(weight);
  const int64_t items = n * replicates;
  LaunchShape shape;
  shape.grid = dim3(unsigned(rk_min<int64_t>((items + kWarps - 1) / kWarps, int64_t(sm_count()) * kBlocksPerSM)));
  shape.block = dim3(kThreads);
  shape.stream = static_cast<cudaStream_t>(stream);
  auto describe = [&] {
    return "mode=" + std::to_string(int(M)) + " n=" + std::to_string(n) + " replicates=" + std::to_string(replicates);
  };
  const void* companion = M == ReplicateMode::Permute ? static_cast<const void*>(index) : weight;
  auto run = [&](auto kernel) {
    launch_kernel("replicate_rows", describe, kernel, shape, a, b, companion, out, error, replicates, n);
  };
  switch_value<bool, false, true>(vec, "replicate_rows vector loads",
                                  [&](auto vec_c) { run(replicate_rows_kernel<M, T, decltype(vec_c)::value>); });
}

}  // namespace

void replicate_rows(const ReplicateRowsParams& p, void* stream) {
  if (p.replicates == 0 || p.n == 0) return;
  dispatch_replicate(p.mode, p.dtype, [&]<ReplicateMode M, typename T>() {
    launch<M, T>(static_cast<const T*>(p.a), static_cast<const T*>(p.b), p.index, p.weight, p.out, p.error,
                 p.replicates, p.n, stream);
  });
}

}  // namespace repkern::cuda
