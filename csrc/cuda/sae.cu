// CUDA SAE kernels (also run by the emulator). Per GEMM chunk, one pass over
// the pre-activations; decode and backward are gathers of whole rows.
//
// Memory access: every kernel reads rows with 16-byte vector loads (float4,
// double2, 8 × 16-bit) when the row length and the pointers allow it, selected
// at launch (Vec = 16 / sizeof(element)), else one element per lane (Vec = 1).
// Grids are sized from the SM count; rows (or entries) are grid-strided.
#include "sae.h"

#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>

#include "common/launch.h"
#include "common/sae_math.h"
#include "cuda/packed.cuh"
#include "cuda/reduce.cuh"
#include "cuda/warp_topk.cuh"

namespace repkern::cuda {
namespace {

constexpr int kWarps = 8;  // warps per block
constexpr int kThreads = 32 * kWarps;
constexpr int kBlocksPerSM = 8;  // grid size; __launch_bounds__(kThreads, 2) caps registers at 128 (ptxas spills without the minimum-blocks hint)

bool is_aligned(const void* p, size_t bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Blocks for `warp_items` warp-sized work items: enough to fill the device, then grid-stride.
unsigned warp_grid(int64_t warp_items) {
  const int64_t wanted = (warp_items + kWarps - 1) / kWarps;
  const int64_t cap = int64_t(kBlocksPerSM) * sm_count();
  return unsigned(wanted < cap ? (wanted > 0 ? wanted : 1) : cap);
}

__device__ __forceinline__ int64_t global_warp() { return (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; }
__device__ __forceinline__ int64_t warp_count() { return (int64_t(gridDim.x) * blockDim.x) >> 5; }

// ---- sae_activate: dense codes ----------------------------------------------------
// Thread (x, y) of block (bx, by) owns Vec columns of column tile bx and walks the
// rows y + 8·by, ... with four rows' loads in flight, so its firing counts stay in
// registers (one atomic per column and thread at the end).
// Minimum traffic: rows·cols·(sizeof(A) + sizeof(Out)) + cols·(sizeof(A) + 4) bytes;
// 2 FLOPs per element. May run in place (out == pre): each element is read, then
// written, by the same thread.
template <typename A, typename Out, int Vec>
__global__ void __launch_bounds__(kThreads, 2)
    sae_activate_kernel(const A* pre,                         // [rows, cols], row stride ld_pre
                        int64_t ld_pre,
                        const A* __restrict__ bias,           // [cols]
                        const float* __restrict__ theta,      // [cols] or null
                        Out* out,                             // [rows, cols], row stride ld_out; may be pre
                        int64_t ld_out,
                        unsigned long long* __restrict__ fire_counts,  // [cols] or null
                        int64_t rows, int64_t cols) {
  constexpr int kUnroll = 4;
  const int64_t c = (int64_t(blockIdx.x) * 32 + threadIdx.x) * Vec;
  if (c >= cols) return;  // no collectives in this kernel
  const Packed<A, Vec> b = load_packed<Vec>(bias + c);
  Packed<float, Vec> t{};
  if (theta) t = load_packed<Vec>(theta + c);
  unsigned fires[Vec] = {};
  const int64_t stride = int64_t(gridDim.y) * blockDim.y;
  for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < rows; r += kUnroll * stride) {
    Packed<A, Vec> in[kUnroll] = {};
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (r + u * stride < rows) in[u] = load_packed<Vec>(pre + (r + u * stride) * ld_pre + c);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (r + u * stride >= rows) continue;
      Packed<Out, Vec> o;
#pragma unroll
      for (int j = 0; j < Vec; ++j) {
        const A v = sae_activation(A(in[u].v[j] + b.v[j]), t.v[j]);
        o.v[j] = from_acc<Out>(v);
        fires[j] += v != A(0) ? 1u : 0u;
      }
      store_packed(out + (r + u * stride) * ld_out + c, o);
    }
  }
  if (fire_counts) {
#pragma unroll
    for (int j = 0; j < Vec; ++j)
      if (fires[j]) atomicAdd(&fire_counts[c + j], static_cast<unsigned long long>(fires[j]));
  }
}

// ---- sae_sparsify: CSR pieces -------------------------------------------------------
// One warp per row, lanes sweep the row with Vec-wide loads. Count pass: nonzeros
// per row (warp sum). Write pass: a warp prefix sum over the lanes' nonzeros gives
// each one its position, so the row's pieces come out in column order; a position
// outside [0, nnz) is not written and sets kBadOffsets in `error`.
// Minimum traffic per pass: rows·cols·sizeof(A) read; the write pass writes
// nnz·(8 + sizeof(A)). ~3 FLOPs per element.
template <typename A, int Vec, bool Write>
__global__ void __launch_bounds__(kThreads, 2)
    sae_sparsify_kernel(const A* __restrict__ pre,           // [rows, cols]
                        const A* __restrict__ bias,          // [cols]
                        const float* __restrict__ theta,     // [cols] or null
                        int64_t* __restrict__ counts,        // [rows] (count pass)
                        const int64_t* __restrict__ offsets, // [rows] (write pass)
                        int64_t* __restrict__ out_cols,      // [nnz] (write pass)
                        A* __restrict__ out_vals,            // [nnz] (write pass)
                        int32_t* __restrict__ error,         // [1] (write pass)
                        int64_t rows, int64_t cols, int64_t col0, int64_t nnz) {
  const int lane = int(threadIdx.x & 31);
  for (int64_t r = global_warp(); r < rows; r += warp_count()) {
    const A* p = pre + r * cols;
    int64_t pos = Write ? offsets[r] : 0;
    int count = 0;
    for (int64_t base = 0; base < cols; base += 32 * Vec) {
      const int64_t c = base + lane * Vec;
      A v[Vec] = {};
      int mine = 0;
      if (c < cols) {
        const Packed<A, Vec> h = load_packed<Vec>(p + c);
        const Packed<A, Vec> b = load_packed<Vec>(bias + c);
        Packed<float, Vec> t{};
        if (theta) t = load_packed<Vec>(theta + c);
#pragma unroll
        for (int j = 0; j < Vec; ++j) {
          v[j] = sae_activation(A(h.v[j] + b.v[j]), t.v[j]);
          mine += v[j] != A(0) ? 1 : 0;
        }
      }
      if constexpr (Write) {
        int inclusive = mine;
#pragma unroll
        for (int offset = 1; offset < 32; offset <<= 1) {
          const int from_below = __shfl_up_sync(kFullMask, inclusive, offset);
          if (lane >= offset) inclusive += from_below;
        }
        int64_t at = pos + inclusive - mine;
#pragma unroll
        for (int j = 0; j < Vec; ++j) {
          if (v[j] != A(0)) {
            if (at >= 0 && at < nnz) {
              out_cols[at] = col0 + c + j;
              out_vals[at] = v[j];
            } else {
              atomicOr(error, int32_t(kBadOffsets));
            }
            ++at;
          }
        }
        pos += __shfl_sync(kFullMask, inclusive, 31);
      } else {
        count += mine;
      }
    }
    if constexpr (!Write) {
      count = warp_sum(count);
      if (lane == 0) counts[r] = count;
    }
  }
}

// ---- sae_topk_merge -------------------------------------------------------------------
// One warp per row holds the row's running top-k in registers, sorted by rank and
// lane-major: lane l keeps ranks l·R .. l·R + R − 1 (R = ceil(k/32) rounded to a
// power of two; register arrays indexed by compile-time constants only). Lanes
// read the chunk with Vec-wide loads; a ballot finds the few candidates that
// outrank the current k-th entry, and each is inserted by the whole warp (its
// rank by a warp sum, the shift by one shuffle-up). Ties: lower column first.
// Minimum traffic: rows·cols·sizeof(A) + 2·rows·k·(sizeof(A) + 8) bytes; ~3 FLOPs
// per element plus O(k) per insertion (about k·ln(d_sae/k) insertions per row).
template <typename A, int R, int Vec>
__global__ void __launch_bounds__(kThreads, 2)
    sae_topk_merge_kernel(const A* __restrict__ pre,   // [rows, cols]
                          const A* __restrict__ bias,  // [cols]
                          A* __restrict__ top_vals,    // [rows, k]
                          int64_t* __restrict__ top_cols,  // [rows, k]
                          int64_t rows, int64_t cols, int64_t col0, int k, bool first, bool relu_first) {
  using K = sae_key_t<A>;
  const int lane = int(threadIdx.x & 31);
  const int kth_lane = (k - 1) / R, kth_slot = (k - 1) % R;
  for (int64_t r = global_warp(); r < rows; r += warp_count()) {
    K key[R];
    int32_t col[R];
#pragma unroll
    for (int s = 0; s < R; ++s) {
      const int q = lane * R + s;
      const bool kept = !first && q < k;
      key[s] = kept ? sae_order_key(top_vals[r * k + q]) : K(0);
      col[s] = kept ? int32_t(top_cols[r * k + q]) : kSaeEmptyIndex;
    }
    K kth_key;
    int32_t kth_col;
    broadcast_kth(key, col, kth_lane, kth_slot, kth_key, kth_col);
    warp_offer_row<Vec>(
        pre + r * cols, bias, cols, col0,
        [relu_first](A v) { return sae_order_key(relu_first ? sae_activation(v, 0.0f) : v); },
        [](int64_t) { return false; }, key, col, kth_key, kth_col, lane, k, kth_lane, kth_slot);
#pragma unroll
    for (int s = 0; s < R; ++s) {
      const int q = lane * R + s;
      if (q < k) {
        top_vals[r * k + q] = sae_key_value<A>(key[s]);
        top_cols[r * k + q] = col[s];
      }
    }
  }
}

// ---- sae_spmm: gather-accumulate of whole rows (embedding bag) -----------------------
// One warp per output row; lanes cover D with Vec-wide loads; the row's entries are
// read 32 at a time (one per lane) and broadcast by shuffles; four gathered rows are
// in flight per step. Minimum traffic: nnz·(8 + sizeof(T)) + nnz·D·sizeof(T) (gathered
// rows) + rows·D·sizeof(T) (written); 2·nnz·D FLOPs.
// Checks (common/index_check.h): a row whose pointers are not 0 <= crow[r] <= crow[r+1] <= nnz
// (crow[0] = 0, crow[rows] = nnz) is written as empty and sets kBadCrow; an entry whose column is
// outside [0, K) adds nothing and sets kBadCols. No out-of-range address is ever read.
template <typename T, int Vec>
__global__ void __launch_bounds__(kThreads, 2)
    sae_spmm_kernel(const int64_t* __restrict__ crow,  // [rows + 1]
                    const int64_t* __restrict__ cols,  // [nnz]
                    const T* __restrict__ vals,        // [nnz]
                    const T* __restrict__ dense,       // [K, D] or null
                    const T* __restrict__ bias,        // [D] or null
                    T* __restrict__ out,               // [rows, D]
                    acc_t<T>* __restrict__ row_sums,   // [rows] or null
                    int32_t* __restrict__ error,       // [1]
                    int64_t rows, int64_t D, int64_t nnz, int64_t K) {
  using A = acc_t<T>;
  constexpr int kInFlight = 4;
  const int lane = int(threadIdx.x & 31);
  for (int64_t r = global_warp(); r < rows; r += warp_count()) {
    int64_t e0 = crow[r], e1 = crow[r + 1];  // warp-uniform
    if (e0 < 0 || e1 < e0 || e1 > nnz || (r == 0 && e0 != 0) || (r == rows - 1 && e1 != nnz)) {
      if (lane == 0) atomicOr(error, int32_t(kBadCrow));
      e0 = e1 = 0;
    }
    if (row_sums) {
      A sum = A(0);
      for (int64_t e = e0 + lane; e < e1; e += 32) sum += to_acc(vals[e]);
      sum = warp_sum(sum);
      if (lane == 0) row_sums[r] = sum;
    }
    if (!dense) continue;
    for (int64_t d0 = 0; d0 < D; d0 += 32 * Vec) {
      const int64_t d = d0 + lane * Vec;
      const bool active = d < D;
      A acc[Vec] = {};
      for (int64_t eb = e0; eb < e1; eb += 32) {
        const int n = int(e1 - eb < 32 ? e1 - eb : 32);
        int64_t my_col = lane < n ? cols[eb + lane] : 0;
        A my_val = lane < n ? to_acc(vals[eb + lane]) : A(0);
        if (lane < n && (my_col < 0 || my_col >= K)) {  // skipped: column −1, value 0
          atomicOr(error, int32_t(kBadCols));
          my_col = -1;
          my_val = A(0);
        }
        int t = 0;
        for (; t + kInFlight <= n; t += kInFlight) {
          Packed<T, Vec> g[kInFlight] = {};
          A v[kInFlight];
#pragma unroll
          for (int u = 0; u < kInFlight; ++u) {
            const int64_t c = __shfl_sync(kFullMask, my_col, t + u);
            v[u] = __shfl_sync(kFullMask, my_val, t + u);
            if (active && c >= 0) g[u] = load_packed<Vec>(dense + c * D + d);
          }
#pragma unroll
          for (int u = 0; u < kInFlight; ++u)
#pragma unroll
            for (int j = 0; j < Vec; ++j) acc[j] += v[u] * to_acc(g[u].v[j]);
        }
        for (; t < n; ++t) {
          const int64_t c = __shfl_sync(kFullMask, my_col, t);
          const A v = __shfl_sync(kFullMask, my_val, t);
          if (active && c >= 0) {
            const Packed<T, Vec> g = load_packed<Vec>(dense + c * D + d);
#pragma unroll
            for (int j = 0; j < Vec; ++j) acc[j] += v * to_acc(g.v[j]);
          }
        }
      }
      if (active) {
        Packed<T, Vec> o;
#pragma unroll
        for (int j = 0; j < Vec; ++j) o.v[j] = from_acc<T>(bias ? acc[j] + to_acc(bias[d + j]) : acc[j]);
        store_packed(out + r * D + d, o);
      }
    }
  }
}

// ---- sae_sddmm: one dot product per entry --------------------------------------------
// One warp per entry; lanes cover D with Vec-wide loads of both rows, warp sum.
// Minimum traffic: nnz·(16 + 2·D·sizeof(T)) bytes (rows of `a` repeat across a row's
// entries and come from cache); 2·nnz·D FLOPs. An entry with rows_of outside [0, R) or
// cols_of outside [0, K) gives 0 and sets kBadRowsOf / kBadColsOf.
template <typename T, int Vec>
__global__ void __launch_bounds__(kThreads, 2)
    sae_sddmm_kernel(const int64_t* __restrict__ rows_of,  // [nnz]
                     const int64_t* __restrict__ cols_of,  // [nnz]
                     const T* __restrict__ a,              // [R, D]
                     const T* __restrict__ b,              // [K, D]
                     acc_t<T>* __restrict__ out,           // [nnz]
                     int32_t* __restrict__ error,          // [1]
                     int64_t nnz, int64_t D, int64_t R, int64_t K) {
  using A = acc_t<T>;
  const int lane = int(threadIdx.x & 31);
  for (int64_t e = global_warp(); e < nnz; e += warp_count()) {
    const int64_t i = rows_of[e], j = cols_of[e];  // warp-uniform
    const bool bad_i = i < 0 || i >= R, bad_j = j < 0 || j >= K;
    if (bad_i || bad_j) {
      if (lane == 0) {
        atomicOr(error, int32_t((bad_i ? kBadRowsOf : 0) | (bad_j ? kBadColsOf : 0)));
        out[e] = A(0);
      }
      continue;
    }
    const T* x = a + i * D;
    const T* y = b + j * D;
    A dot = A(0);
#pragma unroll 2
    for (int64_t d = lane * Vec; d < D; d += 32 * Vec) {
      const Packed<T, Vec> px = load_packed<Vec>(x + d);
      const Packed<T, Vec> py = load_packed<Vec>(y + d);
#pragma unroll
      for (int j = 0; j < Vec; ++j) dot += to_acc(px.v[j]) * to_acc(py.v[j]);
    }
    dot = warp_sum(dot);
    if (lane == 0) out[e] = dot;
  }
}

// Vec = 16 / sizeof(T) when `inner` is a multiple of it and every pointer is 16-byte
// aligned (`narrow` pointers, whose elements are `narrow_bytes` wide, need Vec·narrow_bytes).
template <typename T>
bool use_vec16(int64_t inner, std::initializer_list<const void*> wide,
               std::initializer_list<const void*> narrow = {}, size_t narrow_bytes = 4) {
  if (inner % kVec16<T> != 0) return false;
  for (const void* p : wide)
    if (!is_aligned(p, 16)) return false;
  for (const void* p : narrow)
    if (!is_aligned(p, size_t(kVec16<T>) * narrow_bytes)) return false;
  return true;
}

// Calls f(std::integral_constant<int, Vec>{}) with Vec = kVec16<T> or 1.
template <typename T, typename F>
void with_vec(bool vec16, F&& f) {
  if (vec16) {
    f(std::integral_constant<int, kVec16<T>>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

LaunchShape warp_shape(int64_t warp_items, void* stream) {
  LaunchShape shape;
  shape.grid = dim3(warp_grid(warp_items));
  shape.block = dim3(kThreads);
  shape.stream = static_cast<cudaStream_t>(stream);
  return shape;
}

std::string dims(int64_t a, int64_t b) { return "rows=" + std::to_string(a) + " cols=" + std::to_string(b); }

}  // namespace

void sae_activate(const SaeActivateParams& p, void* stream) {
  if (p.rows == 0 || p.cols == 0) return;
  switch_acc_data(p.acc_dtype, p.out_dtype, "sae_activate", [&]<typename A, typename Out>() {
    const bool vec16 = use_vec16<A>(p.cols, {p.pre, p.bias}, {p.theta}) && p.ld_pre % kVec16<A> == 0 &&
                       p.ld_out % kVec16<A> == 0 && is_aligned(p.out, kVec16<A> * sizeof(Out));
    with_vec<A>(vec16, [&](auto vec_c) {
      constexpr int Vec = decltype(vec_c)::value;
      const int64_t tiles = (p.cols + 32 * Vec - 1) / (32 * Vec);
      const int64_t row_groups = (p.rows + kWarps - 1) / kWarps;
      const int64_t wanted = (int64_t(kBlocksPerSM) * sm_count() + tiles - 1) / tiles;
      LaunchShape shape;
      shape.grid = dim3(unsigned(tiles), unsigned(rk_min<int64_t>(rk_min<int64_t>(wanted, row_groups), 65535)));
      shape.block = dim3(32, kWarps);
      shape.stream = static_cast<cudaStream_t>(stream);
      launch_kernel(
          "sae_activate", [&] { return dims(p.rows, p.cols); }, sae_activate_kernel<A, Out, Vec>, shape,
          static_cast<const A*>(p.pre), p.ld_pre, static_cast<const A*>(p.bias), p.theta, static_cast<Out*>(p.out),
          p.ld_out, reinterpret_cast<unsigned long long*>(p.fire_counts), p.rows, p.cols);
    });
  });
}

void sae_sparsify(const SaeSparsifyParams& p, void* stream) {
  if (p.rows == 0 || p.cols == 0) return;
  switch_acc(p.acc_dtype, "sae_sparsify", [&](auto tag) {
    using A = typename decltype(tag)::type;
    with_vec<A>(use_vec16<A>(p.cols, {p.pre, p.bias}, {p.theta}), [&](auto vec_c) {
      constexpr int Vec = decltype(vec_c)::value;
      auto run = [&](auto kernel) {
        launch_kernel(
            "sae_sparsify", [&] { return dims(p.rows, p.cols); }, kernel, warp_shape(p.rows, stream),
            static_cast<const A*>(p.pre), static_cast<const A*>(p.bias), p.theta, p.counts, p.offsets, p.out_cols,
            static_cast<A*>(p.out_vals), p.error, p.rows, p.cols, p.col0, p.nnz);
      };
      if (p.counts) {
        run(sae_sparsify_kernel<A, Vec, false>);
      } else {
        run(sae_sparsify_kernel<A, Vec, true>);
      }
    });
  });
}

void sae_topk_merge(const SaeTopkMergeParams& p, void* stream) {
  if (p.rows == 0) return;
  if (p.k < 1 || p.k > kSaeMaxTopK)
    throw std::invalid_argument("sae_topk_merge: k must be in [1, " + std::to_string(kSaeMaxTopK) + "]");
  const int slots = (p.k + 31) / 32;
  const int R = slots <= 1 ? 1 : slots <= 2 ? 2 : slots <= 4 ? 4 : 8;
  switch_acc(p.acc_dtype, "sae_topk_merge", [&](auto tag) {
    using A = typename decltype(tag)::type;
    with_vec<A>(use_vec16<A>(p.cols, {p.pre, p.bias}), [&](auto vec_c) {
      constexpr int Vec = decltype(vec_c)::value;
      switch_value<int, 1, 2, 4, 8>(R, "sae_topk_merge slots", [&](auto r_c) {
        constexpr int Slots = decltype(r_c)::value;
        launch_kernel(
            "sae_topk_merge", [&] { return dims(p.rows, p.cols) + " k=" + std::to_string(p.k); },
            sae_topk_merge_kernel<A, Slots, Vec>, warp_shape(p.rows, stream), static_cast<const A*>(p.pre),
            static_cast<const A*>(p.bias), static_cast<A*>(p.top_vals), p.top_cols, p.rows, p.cols, p.col0, p.k,
            p.first, p.relu_first);
      });
    });
  });
}

void sae_spmm(const SaeSpmmParams& p, void* stream) {
  if (p.rows == 0) return;
  switch_dtype(p.dtype, "sae_spmm", [&](auto tag) {
    using T = typename decltype(tag)::type;
    with_vec<T>(use_vec16<T>(p.D, {p.dense, p.bias, p.out}), [&](auto vec_c) {
      constexpr int Vec = decltype(vec_c)::value;
      launch_kernel(
          "sae_spmm", [&] { return dims(p.rows, p.D); }, sae_spmm_kernel<T, Vec>, warp_shape(p.rows, stream), p.crow,
          p.cols, static_cast<const T*>(p.vals), static_cast<const T*>(p.dense), static_cast<const T*>(p.bias),
          static_cast<T*>(p.out), static_cast<acc_t<T>*>(p.row_sums), p.error, p.rows, p.D, p.nnz, p.K);
    });
  });
}

void sae_sddmm(const SaeSddmmParams& p, void* stream) {
  if (p.nnz == 0) return;
  switch_dtype(p.dtype, "sae_sddmm", [&](auto tag) {
    using T = typename decltype(tag)::type;
    with_vec<T>(use_vec16<T>(p.D, {p.a, p.b}), [&](auto vec_c) {
      constexpr int Vec = decltype(vec_c)::value;
      launch_kernel(
          "sae_sddmm", [&] { return dims(p.nnz, p.D); }, sae_sddmm_kernel<T, Vec>, warp_shape(p.nnz, stream), p.rows_of,
          p.cols_of, static_cast<const T*>(p.a), static_cast<const T*>(p.b), static_cast<acc_t<T>*>(p.out), p.error,
          p.nnz, p.D, p.R, p.K);
    });
  });
}

}  // namespace repkern::cuda
