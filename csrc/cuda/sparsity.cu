// CUDA activation-sparsity statistics (math: common/sparsity_math.h).
//
// sparsity_features: ONE read of x for the per-feature statistics and the sort-free row totals.
//   features_kernel  grid (column strips, row splits sized from the SM count), kThreads threads. A thread
//                    owns one 16-byte vector of columns (float32: 4, 16-bit: 8, float64: 2) and walks the
//                    row chunks of its split (grid-stride), kBatch rows at a time: kBatch independent
//                    16-byte loads in flight, per-column batch moments merged into its running state in A
//                    (Pébay); per-row partials (finite count, L0, Σ|a|, Σa² in float64) reduced with
//                    warp shuffles, combined once per block in shared memory, one atomicAdd per row and
//                    total. Writes one partial state per (split, column).
//     bytes: rows·d·sizeof(T) read + splits·d·10·sizeof(A) written + 4·rows·8 atomics.
//     FLOPs: ~25 per element (conversion, batch moments, merge amortized over kBatch rows, row sums).
//   merge_kernel     per column, merges the split partials in float64 (fixed order: deterministic).
//     bytes: splits·d·10·sizeof(A) read + 10·d·8 written. FLOPs: ~40 per partial.
//   row_totals_kernel  per row: L0 and non-finite count (int64: the float64 totals hold them exactly),
//     L1, L2, Hoyer and the thresholded-L0 threshold from the totals.
//     bytes: 4·rows·8 read + rows·(3·sizeof(A) + 3·8) written.
// sparsity_ordered: per row (block per row, grid-stride), a second read of the row: |a| into shared
//   memory (16-byte loads), threshold count and entropy sums on the way, bitonic sort of the next power
//   of two ≥ d (padding +inf), Gini and top-p masses from the sorted row. Rows longer than the shared
//   buffer (sparsity_max_smem_sort) come sorted from the caller (Presorted: torch.sort by row chunks).
//     Writes float64 sums per row; ordered_finalize_kernel (thread per row) turns them into the channels.
//     Every per-row division lives in the two finalize kernels: a float64 division carries an out-of-line
//     slow path whose call makes ptxas spill in the big kernels.
//     bytes: rows·d·sizeof(T) read (Presorted: rows·d·sizeof(A)) + rows·(4 + 2P)·(8 + sizeof(A)) written.
//     FLOPs: ~30 per element (log, sums) + P'·log²P'/4 compare-exchanges per row, P' = pow2 ≥ d.
// The 16-byte loads need a 16-byte aligned base and a row stride that is a multiple of the vector
// width; otherwise the same kernels are instantiated with scalar loads (runtime choice, compile-time
// path).
#include "sparsity.h"

#include <cstring>
#include <string>

#include "common/dispatch.h"
#include "common/launch.h"
#include "cuda/reduce.cuh"

namespace repkern::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBatch = 4;       // rows per step: loads in flight per thread
constexpr int kChunkRows = 32;  // rows per grid-stride work item
constexpr int kBlocksPerSM = 2;
constexpr int kOrderedThreads = 128;
constexpr int kOrderedWarps = kOrderedThreads / 32;
constexpr int kSortBytes = 32 << 10;  // shared sort buffer (static shared memory stays under 48 KB)
static_assert(kChunkRows % kBatch == 0, "a chunk is whole batches");

template <typename T>
constexpr int kVecWidth = 16 / int(sizeof(T));  // elements per 16-byte load
template <typename A>
constexpr int kSortCapacity = kSortBytes / int(sizeof(A));

// Loads `V` consecutive elements: one 16-byte load (kVector: p is 16-byte aligned), otherwise
// element-wise for the first `valid` (the rest are zero).
template <typename T, bool kVector>
__device__ __forceinline__ void load_values(const T* p, int valid, T (&out)[kVecWidth<T>]) {
  constexpr int V = kVecWidth<T>;
  if (kVector && valid == V) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    memcpy(out, &raw, sizeof(raw));
  } else {
#pragma unroll
    for (int c = 0; c < V; ++c) {
      if (c < valid) {
        out[c] = p[c];
      } else {
        memset(&out[c], 0, sizeof(T));
      }
    }
  }
}

// 1/n for a batch count n in [0, kBatch] without a division (0 for n = 0).
template <typename A>
__device__ __forceinline__ A batch_reciprocal(A n) {
  static_assert(kBatch == 4, "table for kBatch = 4");
  return n == A(4) ? A(0.25) : n == A(3) ? A(1) / A(3) : n == A(2) ? A(0.5) : n == A(1) ? A(1) : A(0);
}

template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads)
    features_kernel(const T* __restrict__ x,             // [rows, d], rows ld apart
                    int64_t rows, int64_t d, int64_t ld, acc_t<T> eps,
                    acc_t<T>* __restrict__ partials,     // [gridDim.y, kFeatureFields, d]
                    double* __restrict__ row_totals) {   // [kRowTotals, rows], accumulated
  using A = acc_t<T>;
  constexpr int V = kVecWidth<T>;
  RK_SHARED(int, red_counts, [kWarps][kBatch]);  // finite count | L0 << 16 (each <= kThreads·V <= 2048)
  RK_SHARED(double, red_l1, [kWarps][kBatch]);
  RK_SHARED(double, red_l2sq, [kWarps][kBatch]);

  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int64_t col0 = int64_t(blockIdx.x) * (kThreads * V) + int64_t(tid) * V;
  const int cols = int(rk_max<int64_t>(0, rk_min<int64_t>(V, d - col0)));

  Moments<A> mom[V];
  A mn[V], mx[V], abs_sum[V], fired[V], nans[V];
#pragma unroll
  for (int c = 0; c < V; ++c) {
    mom[c] = Moments<A>{A(0), A(0), A(0), A(0), A(0)};
    mn[c] = inf_value<A>();
    mx[c] = -inf_value<A>();
    abs_sum[c] = fired[c] = nans[c] = A(0);
  }

  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  for (int64_t chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
    const int64_t chunk_end = rk_min<int64_t>(rows, (chunk + 1) * kChunkRows);
    for (int64_t r0 = chunk * kChunkRows; r0 < chunk_end; r0 += kBatch) {  // uniform across the block
      T raw[kBatch][V];
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int64_t r = r0 + k;
        load_values<T, kVector>(x + (r < rows ? r : r0) * ld + col0, r < rows ? cols : 0, raw[k]);
      }
      int counts[kBatch];
      double l1[kBatch], l2sq[kBatch];
#pragma unroll
      for (int k = 0; k < kBatch; ++k) counts[k] = 0, l1[k] = 0.0, l2sq[k] = 0.0;
#pragma unroll
      for (int c = 0; c < V; ++c) {
        A v[kBatch];
        bool fin[kBatch];
        Moments<A> batch{A(0), A(0), A(0), A(0), A(0)};
#pragma unroll
        for (int k = 0; k < kBatch; ++k) {
          const bool present = r0 + k < rows && c < cols;
          v[k] = to_acc(raw[k][c]);
          fin[k] = present && is_finite(v[k]);
          const A av = fin[k] ? abs_value(v[k]) : A(0);
          const bool fire = av > eps;
          batch.n += fin[k] ? A(1) : A(0);
          batch.mean += fin[k] ? v[k] : A(0);
          mn[c] = fin[k] && v[k] < mn[c] ? v[k] : mn[c];
          mx[c] = fin[k] && v[k] > mx[c] ? v[k] : mx[c];
          abs_sum[c] += av;
          fired[c] += fire ? A(1) : A(0);
          nans[c] += present && v[k] != v[k] ? A(1) : A(0);
          counts[k] += (fin[k] ? 1 : 0) + (fire ? 1 << 16 : 0);
          l1[k] += double(av);
          l2sq[k] += double(av) * double(av);
        }
        batch.mean *= batch_reciprocal(batch.n);
#pragma unroll
        for (int k = 0; k < kBatch; ++k) {
          const A dv = fin[k] ? v[k] - batch.mean : A(0);
          const A d2 = dv * dv;
          batch.m2 += d2;
          batch.m3 += d2 * dv;
          batch.m4 += d2 * d2;
        }
        mom[c] = merge_moments(mom[c], batch);
      }
      // Row partials: warp shuffles, one combine per block, one atomic per row and total.
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        counts[k] = warp_sum(counts[k]);
        l1[k] = warp_sum(l1[k]);
        l2sq[k] = warp_sum(l2sq[k]);
        if (lane == 0) {
          red_counts[warp][k] = counts[k];
          red_l1[warp][k] = l1[k];
          red_l2sq[warp][k] = l2sq[k];
        }
      }
      __syncthreads();
      if (tid < kBatch && r0 + tid < rows) {
        int count = 0;
        double s1 = 0.0, s2 = 0.0;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          count += red_counts[w][tid];
          s1 += red_l1[w][tid];
          s2 += red_l2sq[w][tid];
        }
        const int64_t r = r0 + tid;
        atomicAdd(&row_totals[kTotFinite * rows + r], double(count & 0xffff));
        atomicAdd(&row_totals[kTotL0 * rows + r], double(count >> 16));
        atomicAdd(&row_totals[kTotL1 * rows + r], s1);
        atomicAdd(&row_totals[kTotL2Sq * rows + r], s2);
      }
      __syncthreads();  // the reduction buffers are reused by the next batch
    }
  }

  A* out = partials + int64_t(blockIdx.y) * kFeatureFields * d + col0;
#pragma unroll
  for (int c = 0; c < V; ++c) {
    if (c < cols) {
      out[kCount * d + c] = mom[c].n;
      out[kMean * d + c] = mom[c].mean;
      out[kM2 * d + c] = mom[c].m2;
      out[kM3 * d + c] = mom[c].m3;
      out[kM4 * d + c] = mom[c].m4;
      out[kMin * d + c] = mn[c];
      out[kMax * d + c] = mx[c];
      out[kAbsSum * d + c] = abs_sum[c];
      out[kFired * d + c] = fired[c];
      out[kNan * d + c] = nans[c];
    }
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    merge_kernel(const A* __restrict__ partials,  // [splits, kFeatureFields, d]
                 int64_t splits, int64_t d,
                 double* __restrict__ state) {    // [kFeatureFields, d]
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < d; j += int64_t(gridDim.x) * blockDim.x) {
    Moments<double> m{0.0, 0.0, 0.0, 0.0, 0.0};
    double fired = 0.0, nans = 0.0, abs_sum = 0.0, mn = inf_value<double>(), mx = -inf_value<double>();
    for (int64_t s = 0; s < splits; ++s) {
      const A* p = partials + s * kFeatureFields * d + j;
      m = merge_moments(m, Moments<double>{double(p[kCount * d]), double(p[kMean * d]), double(p[kM2 * d]),
                                           double(p[kM3 * d]), double(p[kM4 * d])});
      fired += double(p[kFired * d]);
      nans += double(p[kNan * d]);
      abs_sum += double(p[kAbsSum * d]);
      mn = rk_min(mn, double(p[kMin * d]));
      mx = rk_max(mx, double(p[kMax * d]));
    }
    state[kCount * d + j] = m.n;
    state[kMean * d + j] = m.mean;
    state[kM2 * d + j] = m.m2;
    state[kM3 * d + j] = m.m3;
    state[kM4 * d + j] = m.m4;
    state[kFired * d + j] = fired;
    state[kNan * d + j] = nans;
    state[kAbsSum * d + j] = abs_sum;
    state[kMin * d + j] = mn;
    state[kMax * d + j] = mx;
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    row_totals_kernel(double* __restrict__ totals,  // [kRowTotals, rows]; writes kTotThreshold
                      int64_t rows, int64_t d,
                      A* __restrict__ out,          // [channels, rows]
                      int64_t* __restrict__ counts) {  // [kRowCounts, rows]
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += int64_t(gridDim.x) * blockDim.x) {
    const double n = totals[kTotFinite * rows + r], l1 = totals[kTotL1 * rows + r];
    const double l2sq = totals[kTotL2Sq * rows + r];
    write_sort_free_row(out, counts, rows, r, d, count_in_range(n, d), count_in_range(totals[kTotL0 * rows + r], d),
                        l1, l2sq);
    totals[kTotThreshold * rows + r] = abs_threshold(n, l1, l2sq);
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    ordered_finalize_kernel(const double* __restrict__ totals,  // [kRowTotals, rows]
                            const double* __restrict__ sums,    // [ordered_sums(num_top_p), rows]
                            int64_t rows, int64_t row_begin, int64_t row_end, int num_top_p,
                            A* __restrict__ out) {              // [channels, rows]
  for (int64_t r = row_begin + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < row_end;
       r += int64_t(gridDim.x) * blockDim.x) {
    const double n = totals[kTotFinite * rows + r], l1 = totals[kTotL1 * rows + r];
    const double l2sq = totals[kTotL2Sq * rows + r];
    write_ordered_row(out, rows, r, n, l1, l2sq, sums[kSumAbove * rows + r], sums[kSumALogA * rows + r],
                      sums[kSumA2LogA * rows + r], sums[kSumGini * rows + r]);
    for (int p = 0; p < num_top_p; ++p) {
      write_top_p(out, rows, r, p, num_top_p, l1, l2sq, sums[(kSumTopP + p) * rows + r],
                  sums[(kSumTopP + num_top_p + p) * rows + r]);
    }
  }
}

// Sums `N` per-thread values over the block; every thread gets the totals.
template <int N>
__device__ __forceinline__ void block_sum(double (&v)[N], double (&scratch)[kOrderedWarps][N]) {
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    v[i] = warp_sum(v[i]);
    if (lane == 0) scratch[warp][i] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    double t = 0.0;
#pragma unroll
    for (int w = 0; w < kOrderedWarps; ++w) t += scratch[w][i];
    v[i] = t;
  }
  __syncthreads();  // scratch is reused by the next call
}

// Ascending bitonic sort of v[0, n), n a power of two, by the whole block.
template <typename A>
__device__ __forceinline__ void bitonic_sort(A* v, int n) {
  for (int k = 2; k <= n; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int t = int(threadIdx.x); t < n / 2; t += int(blockDim.x)) {
        const int i = ((t & ~(j - 1)) << 1) | (t & (j - 1));  // first of the pair (i, i + j)
        const A a = v[i], b = v[i + j];
        if ((a > b) == ((i & k) == 0)) {
          v[i] = b;
          v[i + j] = a;
        }
      }
      __syncthreads();
    }
  }
}

enum class Source { Scalar, Vector, Presorted };

template <typename T, Source kSource>
__global__ void __launch_bounds__(kOrderedThreads)
    ordered_kernel(const T* __restrict__ x,  // [rows, d] rows ld apart; Presorted: [row_end − row_begin, d] A
                   int64_t rows, int64_t d, int64_t ld, int64_t row_begin, int64_t row_end,
                   int padded,  // power of two >= d (sorted in shared memory)
                   const double* __restrict__ top_p,       // [num_top_p]
                   int num_top_p,
                   const double* __restrict__ totals,      // [kRowTotals, rows]
                   double* __restrict__ sums) {            // [ordered_sums(num_top_p), rows]
  using A = acc_t<T>;
  constexpr int V = kVecWidth<T>;
  RK_SHARED(A, sorted_smem, [kSource == Source::Presorted ? 1 : kSortCapacity<A>]);
  RK_SHARED(double, scratch4, [kOrderedWarps][kSumTopP]);
  RK_SHARED(double, scratch2, [kOrderedWarps][2]);
  const int tid = int(threadIdx.x);

  for (int64_t r = row_begin + blockIdx.x; r < row_end; r += gridDim.x) {
    // The entries read below: never past the row, whatever the totals hold.
    const int64_t count = count_in_range(totals[kTotFinite * rows + r], d);
    const double n = double(count), threshold = totals[kTotThreshold * rows + r];
    double row_sums[kSumTopP] = {0.0, 0.0, 0.0, 0.0};  // OrderedSum order
    auto add_value = [&](A a) {              // a finite |value|
      const double ad = double(a), lg = double(log_poly(a));
      row_sums[kSumAbove] += ad > threshold ? 1.0 : 0.0;
      row_sums[kSumALogA] += ad * lg;
      row_sums[kSumA2LogA] += ad * ad * lg;
    };
    const A* sorted;
    if constexpr (kSource == Source::Presorted) {
      sorted = x + (r - row_begin) * d;
      for (int64_t i = tid; i < count; i += kOrderedThreads) add_value(sorted[i]);
    } else {
      const T* row = x + r * ld;
      for (int i0 = tid * V; i0 < padded; i0 += kOrderedThreads * V) {
        T raw[V];
        load_values<T, kSource == Source::Vector>(row + i0, int(rk_max<int64_t>(0, rk_min<int64_t>(V, d - i0))), raw);
#pragma unroll
        for (int c = 0; c < V; ++c) {
          if (i0 + c < padded) {
            const A v = to_acc(raw[c]);
            const bool fin = i0 + c < d && is_finite(v);
            const A a = fin ? abs_value(v) : inf_value<A>();
            sorted_smem[i0 + c] = a;
            if (fin) add_value(a);
          }
        }
      }
      __syncthreads();
      bitonic_sort(sorted_smem, padded);
      sorted = sorted_smem;
    }
    for (int64_t i = tid; i < count; i += kOrderedThreads) row_sums[kSumGini] += gini_weight(i, n) * double(sorted[i]);
    block_sum(row_sums, scratch4);
    if (tid == 0) {
#pragma unroll
      for (int i = 0; i < kSumTopP; ++i) sums[i * rows + r] = row_sums[i];
    }
    for (int p = 0; p < num_top_p; ++p) {
      const int64_t k = rk_min(top_k_count(top_p[p], n), count);
      double top[2] = {0.0, 0.0};
      for (int64_t i = count - k + tid; i < count; i += kOrderedThreads) {
        const double a = double(sorted[i]);
        top[0] += a;
        top[1] += a * a;
      }
      block_sum(top, scratch2);
      if (tid == 0) {
        sums[(kSumTopP + p) * rows + r] = top[0];
        sums[(kSumTopP + num_top_p + p) * rows + r] = top[1];
      }
    }
    // block_sum ended with a barrier: the shared row may be overwritten by the next row.
  }
}

int64_t grid_for(int64_t work, int64_t per_block, int64_t max_blocks) {
  return rk_max<int64_t>(1, rk_min<int64_t>((work + per_block - 1) / per_block, max_blocks));
}

template <typename T>
bool vector_loads_ok(const void* x, int64_t rows, int64_t ld) {
  return reinterpret_cast<uintptr_t>(x) % 16 == 0 && (rows <= 1 || ld % kVecWidth<T> == 0);
}

std::string shape_text(int64_t rows, int64_t d, int64_t ld) {
  return "rows=" + std::to_string(rows) + " d=" + std::to_string(d) + " ld=" + std::to_string(ld);
}

}  // namespace

SparsityPlan sparsity_plan(DType dtype, int64_t rows, int64_t d) {
  SparsityPlan plan;
  switch_dtype(dtype, "sparsity x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t width = int64_t(kThreads) * kVecWidth<T>;
    plan.strips = (d + width - 1) / width;
    const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
    const int64_t target = (int64_t(kBlocksPerSM) * sm_count() + plan.strips - 1) / rk_max<int64_t>(1, plan.strips);
    plan.splits = rk_max<int64_t>(1, rk_min<int64_t>(chunks, target));
  });
  return plan;
}

void sparsity_features(const SparsityFeaturesParams& p, void* stream) {
  if (p.d <= 0) return;
  if (p.channels < kRowSortFree) throw std::invalid_argument("sparsity_features: too few row channels");
  const SparsityPlan plan = sparsity_plan(p.dtype, p.rows, p.d);
  if (plan.strips > 2147483647 || plan.splits > 65535) throw std::invalid_argument("sparsity_features: d too large");
  switch_dtype(p.dtype, "sparsity x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    LaunchShape shape;
    shape.stream = static_cast<cudaStream_t>(stream);
    auto describe = [&] { return shape_text(p.rows, p.d, p.ld); };
    if (p.rows > 0) {
      shape.grid = dim3(unsigned(plan.strips), unsigned(plan.splits));
      shape.block = dim3(kThreads);
      switch_value<bool, false, true>(vector_loads_ok<T>(p.x, p.rows, p.ld), "sparsity vector loads", [&](auto vec) {
        launch_kernel("sparsity_features", describe, features_kernel<T, decltype(vec)::value>, shape,
                      static_cast<const T*>(p.x), p.rows, p.d, p.ld, A(p.eps), static_cast<A*>(p.partials),
                      p.row_totals);
      });
    }
    const int64_t blocks = 2 * int64_t(sm_count());
    shape.block = dim3(kThreads);
    shape.grid = dim3(unsigned(grid_for(p.d, kThreads, blocks)));
    launch_kernel("sparsity_merge", describe, merge_kernel<A>, shape, static_cast<const A*>(p.partials),
                  p.rows > 0 ? plan.splits : int64_t(0), p.d, p.feature_state);
    shape.grid = dim3(unsigned(grid_for(p.rows, kThreads, blocks)));
    if (p.rows > 0) {
      launch_kernel("sparsity_row_totals", describe, row_totals_kernel<A>, shape, p.row_totals, p.rows, p.d,
                    static_cast<A*>(p.row_out), p.row_counts);
    }
  });
}

int64_t sparsity_max_smem_sort(DType dtype) {
  int64_t capacity = 0;
  switch_dtype(dtype, "sparsity x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    capacity = kSortCapacity<acc_t<T>>;
  });
  return capacity;
}

void sparsity_ordered(const SparsityOrderedParams& p, void* stream) {
  if (p.d <= 0 || p.row_end <= p.row_begin) return;
  if (p.row_begin < 0 || p.row_end > p.rows) throw std::invalid_argument("sparsity_ordered: bad row range");
  if (p.num_top_p < 0 || p.num_top_p > kMaxTopP) throw std::invalid_argument("sparsity_ordered: bad number of top_p");
  switch_dtype(p.dtype, "sparsity x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    LaunchShape shape;
    shape.stream = static_cast<cudaStream_t>(stream);
    shape.block = dim3(kOrderedThreads);
    shape.grid = dim3(unsigned(grid_for(p.row_end - p.row_begin, 1, 8 * int64_t(sm_count()))));
    auto describe = [&] {
      return shape_text(p.rows, p.d, p.ld) + " rows [" + std::to_string(p.row_begin) + ", " +
             std::to_string(p.row_end) + ")";
    };
    if (p.sorted != nullptr) {
      launch_kernel("sparsity_ordered", describe, ordered_kernel<A, Source::Presorted>, shape,
                    static_cast<const A*>(p.sorted), p.rows, p.d, p.d, p.row_begin, p.row_end, 1, p.top_p, p.num_top_p,
                    p.row_totals, p.sums);
    } else {
      if (p.d > kSortCapacity<A>) throw std::invalid_argument("sparsity_ordered: d too large to sort in shared memory");
      int padded = 1;
      while (padded < p.d) padded <<= 1;
      switch_value<bool, false, true>(vector_loads_ok<T>(p.x, p.rows, p.ld), "sparsity vector loads", [&](auto vec) {
        constexpr Source kSource = decltype(vec)::value ? Source::Vector : Source::Scalar;
        launch_kernel("sparsity_ordered", describe, ordered_kernel<T, kSource>, shape, static_cast<const T*>(p.x),
                      p.rows, p.d, p.ld, p.row_begin, p.row_end, padded, p.top_p, p.num_top_p, p.row_totals, p.sums);
      });
    }
    shape.block = dim3(kThreads);
    shape.grid = dim3(unsigned(grid_for(p.row_end - p.row_begin, kThreads, 2 * int64_t(sm_count()))));
    launch_kernel("sparsity_ordered_finalize", describe, ordered_finalize_kernel<A>, shape, p.row_totals,
                  static_cast<const double*>(p.sums), p.rows, p.row_begin, p.row_end, p.num_top_p,
                  static_cast<A*>(p.row_out));
  });
}

}  // namespace repkern::cuda
