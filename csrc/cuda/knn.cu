// CUDA kNN top-k merge (also run by the emulator): one tile of scores into the running
// top-k of its rows and of its columns (knn.h). One warp per row of the result holds that
// row's top-k in registers (cuda/warp_topk.cuh); the lanes hold one candidate each.
//   rows' kernel     warp r reads tile row r with Vec-wide coalesced loads (and col_bias).
//   columns' kernel  warp c reads tile column c, one element per lane, four 32-row steps
//                    in flight. The 8 warps of a block take 8 neighbouring columns, so a
//                    32-byte sector of the tile serves the whole block through L1 instead
//                    of being fetched once per warp.
// Minimum traffic per tile (rows × cols scores, a = sizeof(A)): the tile is written once by
// the GEMM (cuBLAS) and each kernel reads it once: rows' kernel rows·cols·a + cols·a (bias) +
// 2·rows·k·(a + 8) (state in and out), columns' kernel rows·cols·a + rows·a +
// 2·cols·k·(a + 8). The two kernels run back to back on the same stream: with a tile that
// fits in L2 (the default 16 MiB budget of repkern.knn) the second read is served by L2
// and DRAM sees each tile written once and read once. 2 FLOPs per score and side (bias add,
// compare with the k-th), plus O(k) per insertion (about k·ln(n/k) per row over a whole kNN).
#include "knn.h"

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/dispatch.h"
#include "common/knn_math.h"
#include "common/launch.h"
#include "cuda/packed.cuh"
#include "cuda/reduce.cuh"
#include "cuda/warp_topk.cuh"

namespace repkern::cuda {
namespace {

constexpr int kWarps = 8;  // warps per block
constexpr int kThreads = 32 * kWarps;
constexpr int kBlocksPerSM = 8;  // grid size; __launch_bounds__(kThreads, 2) caps registers at 128
constexpr int kColSteps = 4;     // columns' kernel: 32-row steps loaded before they are offered

bool is_aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Blocks for `warp_items` warp-sized work items: enough to fill the device, then grid-stride.
LaunchShape warp_shape(int64_t warp_items, void* stream) {
  const int64_t wanted = (warp_items + kWarps - 1) / kWarps;
  const int64_t cap = int64_t(kBlocksPerSM) * sm_count();
  LaunchShape shape;
  shape.grid = dim3(unsigned(wanted < cap ? (wanted > 0 ? wanted : 1) : cap));
  shape.block = dim3(kThreads);
  shape.stream = static_cast<cudaStream_t>(stream);
  return shape;
}

__device__ __forceinline__ int64_t global_warp() { return (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; }
__device__ __forceinline__ int64_t warp_count() { return (int64_t(gridDim.x) * blockDim.x) >> 5; }

// Row state [k] (values, indices; −1 empty) <-> the warp's registers (slots q >= k: empty).
template <typename A, int R>
__device__ __forceinline__ void load_state(sae_key_t<A> (&key)[R], int32_t (&col)[R], const A* vals,
                                           const int64_t* idx, int lane, int k) {
#pragma unroll
  for (int s = 0; s < R; ++s) {
    const int q = lane * R + s;
    const int64_t i = q < k ? idx[q] : int64_t(-1);
    key[s] = q < k ? knn_slot_key(vals[q], i) : sae_key_t<A>(0);
    col[s] = i < 0 ? kSaeEmptyIndex : int32_t(i);
  }
}

template <typename A, int R>
__device__ __forceinline__ void store_state(const sae_key_t<A> (&key)[R], const int32_t (&col)[R], A* vals,
                                            int64_t* idx, int lane, int k) {
#pragma unroll
  for (int s = 0; s < R; ++s) {
    const int q = lane * R + s;
    if (q < k) {
      vals[q] = sae_key_value<A>(key[s]);
      idx[q] = key[s] == 0 ? int64_t(-1) : int64_t(col[s]);
    }
  }
}

template <typename A, int R, int Vec>
__global__ void __launch_bounds__(kThreads, 2)
    knn_merge_rows_kernel(const A* __restrict__ tile,  // [rows, cols]
                          const A* __restrict__ bias,  // [cols]
                          A* __restrict__ vals,        // [rows, k]
                          int64_t* __restrict__ idx,   // [rows, k]
                          int64_t rows, int64_t cols, int64_t row0, int64_t col0, int k) {
  using K = sae_key_t<A>;
  const int lane = int(threadIdx.x & 31);
  const int kth_lane = (k - 1) / R, kth_slot = (k - 1) % R;
  for (int64_t r = global_warp(); r < rows; r += warp_count()) {
    K key[R];
    int32_t col[R];
    load_state(key, col, vals + r * k, idx + r * k, lane, k);
    K kth_key;
    int32_t kth_col;
    broadcast_kth(key, col, kth_lane, kth_slot, kth_key, kth_col);
    const int64_t self = row0 + r;
    warp_offer_row<Vec>(
        tile + r * cols, bias, cols, col0, [](A v) { return knn_order_key(v); },
        [self](int64_t cand) { return cand == self; }, key, col, kth_key, kth_col, lane, k, kth_lane, kth_slot);
    store_state(key, col, vals + r * k, idx + r * k, lane, k);
  }
}

template <typename A, int R>
__global__ void __launch_bounds__(kThreads, 2)
    knn_merge_cols_kernel(const A* __restrict__ tile,  // [rows, cols]
                          const A* __restrict__ bias,  // [rows]
                          A* __restrict__ vals,        // [cols, k]
                          int64_t* __restrict__ idx,   // [cols, k]
                          int64_t rows, int64_t cols, int64_t row0, int64_t col0, int k) {
  using K = sae_key_t<A>;
  const int lane = int(threadIdx.x & 31);
  const int kth_lane = (k - 1) / R, kth_slot = (k - 1) % R;
  for (int64_t c = global_warp(); c < cols; c += warp_count()) {
    K key[R];
    int32_t col[R];
    load_state(key, col, vals + c * k, idx + c * k, lane, k);
    K kth_key;
    int32_t kth_col;
    broadcast_kth(key, col, kth_lane, kth_slot, kth_key, kth_col);
    const int64_t self = col0 + c;
    for (int64_t base = 0; base < rows; base += 32 * kColSteps) {
      A s[kColSteps];
#pragma unroll
      for (int u = 0; u < kColSteps; ++u) {
        const int64_t r = base + u * 32 + lane;
        s[u] = r < rows ? A(tile[r * cols + c] + bias[r]) : A(0);
      }
#pragma unroll
      for (int u = 0; u < kColSteps; ++u) {
        const int64_t r = base + u * 32 + lane;
        const K my_key = knn_order_key(s[u]);
        const int64_t cand = row0 + r;
        const bool pending = r < rows && cand != self && sae_ranks_before(my_key, int32_t(cand), kth_key, kth_col);
        warp_offer(key, col, kth_key, kth_col, my_key, int32_t(cand), pending, lane, k, kth_lane, kth_slot);
      }
    }
    store_state(key, col, vals + c * k, idx + c * k, lane, k);
  }
}

std::string dims(const KnnTopkMergeParams& p) {
  return "rows=" + std::to_string(p.rows) + " cols=" + std::to_string(p.cols) + " k=" + std::to_string(p.k);
}

}  // namespace

void knn_topk_merge(const KnnTopkMergeParams& p, void* stream) {
  if (p.rows == 0 || p.cols == 0) return;
  if (p.k < 1 || p.k > kKnnMaxK)
    throw std::invalid_argument("knn_topk_merge: k must be in [1, " + std::to_string(kKnnMaxK) + "]");
  const int slots = (p.k + 31) / 32;
  const int R = slots <= 1 ? 1 : slots <= 2 ? 2 : slots <= 4 ? 4 : 8;
  switch_acc(p.acc_dtype, "knn_topk_merge", [&](auto tag) {
    using A = typename decltype(tag)::type;
    constexpr int V = kVec16<A>;
    const bool vec16 = p.cols % V == 0 && is_aligned(p.tile, 16) && is_aligned(p.col_bias, 16);
    switch_value<int, 1, 2, 4, 8>(R, "knn_topk_merge slots", [&](auto r_c) {
      constexpr int Slots = decltype(r_c)::value;
      auto rows_kernel = vec16 ? knn_merge_rows_kernel<A, Slots, V> : knn_merge_rows_kernel<A, Slots, 1>;
      launch_kernel(
          "knn_topk_merge rows", [&] { return dims(p); }, rows_kernel, warp_shape(p.rows, stream),
          static_cast<const A*>(p.tile), static_cast<const A*>(p.col_bias), static_cast<A*>(p.row_vals), p.row_idx,
          p.rows, p.cols, p.row0, p.col0, p.k);
      if (p.col_vals)
        launch_kernel(
            "knn_topk_merge columns", [&] { return dims(p); }, knn_merge_cols_kernel<A, Slots>,
            warp_shape(p.cols, stream), static_cast<const A*>(p.tile), static_cast<const A*>(p.row_bias),
            static_cast<A*>(p.col_vals), p.col_idx, p.rows, p.cols, p.row0, p.col0, p.k);
    });
  });
}

}  // namespace repkern::cuda
