// CUDA HSIC terms: one pass over a block of m Gram matrices that turns inner
// products into kernel values (gram_math.h) and accumulates, in float64, the
// pair products Σ K_a∘K_b, row sums and diagonals (common/cka_math.h).
//
// A launch stages up to kMaxMats matrices and computes up to kMaxPairs of their
// pairs (the host plans launches from the pair list, so each matrix of a
// cka_matrix is read once per launch that needs it; an hsic pair list in
// pair order is read exactly once). Work item = 4 KB of each staged matrix
// (a 32×32 float or 16×32 double chunk of an upper sub-tile): every thread issues
// one 16-byte load per matrix (all kMaxMats in flight, coalesced: 8 threads per
// 128-byte row segment), converts to kernel values into shared memory; then warp
// w sums the rows and columns of matrix slot w (conflict-free: padded rows), and
// every thread adds its entries' pair products to per-pair float64 registers.
// Grid: 2 blocks per SM (≤ 128 registers per thread), grid-stride over work items; one combine per block
// (warp shuffles, then one float64 atomicAdd per pair and block).
//
// Minimum traffic per launch: the upper half of each staged n×n matrix once
// (m·n²/2·sizeof(A); a whole off-diagonal block: m·rows·cols·sizeof(A)) plus aux;
// writes O(m·n + P) float64. FLOPs per entry read: the epilogue's ~4 (+1 exp for
// RBF) per matrix, 2 per matrix for row/column sums, 2 (float64) per pair.
#include <string>

#include "cka.h"
#include "common/launch.h"
#include "cuda/packed.cuh"
#include "cuda/reduce.cuh"
#include "cuda/tile_pairs.cuh"

namespace repkern::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kCols = 32;         // sub-tile edge = warp width
constexpr int kMaxMats = kWarps;  // warp w sums the rows/columns of matrix slot w
constexpr int kMaxPairs = 16;     // float64 pair partials per thread, in registers
constexpr int kBlocksPerSM = 2;   // with 8 loads of 16 B in flight per thread: 64 KB in flight per SM

template <typename A>
constexpr int kChunkRows = kThreads * kVec16<A> / kCols;  // rows per work item: one load per thread and matrix

// What one launch computes. Indexed only with compile-time constants in the kernel
// (dynamic indices go through shared-memory copies: no local memory).
struct LaunchGroup {
  const void* blocks[kMaxMats];              // [rows, cols] block of each slot
  int mats[kMaxMats];                        // matrix index of each slot (aux, scale, row_sums, diag)
  int pair_a[kMaxPairs], pair_b[kMaxPairs];  // slots of each pair
  int pair_out[kMaxPairs];                   // index into cross
  int num_mats, num_pairs;
  unsigned sums_mask;  // bit s: this launch adds the row sums and writes the diagonal of slot s
};

template <GramKind K, typename A, bool Vec>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM)
    hsic_terms_kernel(LaunchGroup group,
                      const A* __restrict__ aux,      // [m, n] or null (!gram_needs_aux)
                      const A* __restrict__ scale,    // [m] or null
                      double* __restrict__ cross,     // [P]
                      double* __restrict__ row_sums,  // [m, n]
                      double* __restrict__ diag,      // [m, n]
                      int64_t rows, int64_t cols, int64_t r0, int64_t c0, int64_t n, bool diagonal_block) {
  constexpr int V = kVec16<A>, CR = kChunkRows<A>, kLanesPerRow = kCols / V;
  constexpr int kChunks = kCols / CR;                // work items per sub-tile
  constexpr int kPerThread = CR * kCols / kThreads;  // entries per thread in the pair products
  RK_SHARED(A, tile, [kMaxMats][CR][kCols + 1]);  // +1: row and column reads without bank conflicts
  RK_SHARED(double, partial, [kWarps][kMaxPairs]);
  RK_SHARED(int, slot_mat, [kMaxMats]);
  RK_SHARED(int, slot_a, [kMaxPairs]);
  RK_SHARED(int, slot_b, [kMaxPairs]);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < kMaxMats; ++s) slot_mat[s] = group.mats[s];
#pragma unroll
    for (int q = 0; q < kMaxPairs; ++q) slot_a[q] = group.pair_a[q], slot_b[q] = group.pair_b[q];
  }
  // No barrier here: the slots are read only after the staging barrier of the first work item, which
  // orders thread 0's writes before them (a block without work items never reads them).

  const unsigned tiles_r = unsigned((rows + kCols - 1) / kCols), tiles_c = unsigned((cols + kCols - 1) / kCols);
  const unsigned tile_items = diagonal_block ? tiles_r * tile_pairs_per_row(tiles_r) : tiles_r * tiles_c;
  const unsigned items = tile_items * kChunks;
  const int r = tid / kLanesPerRow, c = (tid % kLanesPerRow) * V;  // this thread's entries when staging

  double acc[kMaxPairs];
#pragma unroll
  for (int q = 0; q < kMaxPairs; ++q) acc[q] = 0.0;

  for (unsigned item = blockIdx.x; item < items; item += gridDim.x) {  // block-uniform control flow
    const unsigned t = item / kChunks, chunk = item % kChunks;
    unsigned ti, tj;
    if (diagonal_block) {
      if (!tile_pair(t, tiles_r, ti, tj)) continue;
    } else {
      ti = t / tiles_c;
      tj = t % tiles_c;
    }
    const int64_t lr0 = int64_t(ti) * kCols + int64_t(chunk) * CR, lc0 = int64_t(tj) * kCols;
    if (lr0 >= rows) continue;  // second chunk of a short last sub-tile
    const int tr = int(rk_min<int64_t>(CR, rows - lr0)), tc = int(rk_min<int64_t>(kCols, cols - lc0));
    const bool diag_tile = diagonal_block && ti == tj;
    const int64_t gi = r0 + lr0 + r, gj = c0 + lc0 + c;  // this thread's row / first column in the matrix

#pragma unroll
    for (int s = 0; s < kMaxMats; ++s) {
      if (s < group.num_mats) {
        const A* g = static_cast<const A*>(group.blocks[s]) + (lr0 + r) * cols + lc0 + c;
        A in[V] = {};
        if constexpr (Vec) {  // cols % V == 0: a row's last chunk is whole 16-byte loads
          if (r < tr && c < tc) {
            const Packed<A, V> packed = load_packed<V>(g);
#pragma unroll
            for (int v = 0; v < V; ++v) in[v] = packed.v[v];
          }
        } else {
#pragma unroll
          for (int v = 0; v < V; ++v) in[v] = r < tr && c + v < tc ? g[v] : A(0);
        }
        const int64_t a = group.mats[s];
        const A s_a = scale ? scale[a] : A(0);
        const A aux_r = gram_needs_aux(K) && r < tr ? aux[a * n + gi] : A(0);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          A value = A(0);                                             // out-of-range entries stay 0 (sums rely on it)
          if (r < tr && c + v < tc && !(diag_tile && gj + v < gi)) {  // diagonal sub-tile: upper triangle only
            const A aux_c = gram_needs_aux(K) ? aux[a * n + gj + v] : A(0);
            value = hsic_entry<K>(in[v], aux_r, aux_c, s_a, diag_tile && gi == gj + v);
          }
          tile[s][r][c + v] = value;
        }
      }
    }
    __syncthreads();

    if (warp < group.num_mats && (group.sums_mask >> warp & 1u)) {
      const int64_t a = slot_mat[warp];
      if (lane < tr) {  // lane = row
        double sum = 0.0;
#pragma unroll 8
        for (int k = 0; k < kCols; ++k) sum += double(tile[warp][lane][k]);
        atomicAdd(&row_sums[a * n + r0 + lr0 + lane], sum);
        if (diag_tile) diag[a * n + r0 + lr0 + lane] = double(tile[warp][lane][int(chunk) * CR + lane]);
      }
      if (lane < tc) {  // lane = column: row sums of the mirrored entries (the diagonal is not mirrored)
        const int diag_row = diag_tile ? lane - int(chunk) * CR : -1;
        double sum = 0.0;
#pragma unroll 8
        for (int k = 0; k < CR; ++k) sum += k == diag_row ? 0.0 : double(tile[warp][k][lane]);
        atomicAdd(&row_sums[a * n + c0 + lc0 + lane], sum);
      }
    }

#pragma unroll
    for (int q = 0; q < kMaxPairs; ++q) {
      if (q < group.num_pairs) {
        const int pa = slot_a[q], pb = slot_b[q];
        double dot = 0.0;
#pragma unroll
        for (int k = 0; k < kPerThread; ++k) {
          const int e = tid + k * kThreads;  // a warp reads one row segment: no bank conflicts
          const int er = e / kCols, ec = e % kCols;
          const double weight = diag_tile && int(chunk) * CR + er == ec ? 1.0 : 2.0;  // the diagonal stands for itself
          dot += weight * double(tile[pa][er][ec]) * double(tile[pb][er][ec]);
        }
        acc[q] += dot;
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int q = 0; q < kMaxPairs; ++q) {
    if (q < group.num_pairs) {
      const double v = warp_sum(acc[q]);
      if (lane == 0) partial[warp][q] = v;
    }
  }
  __syncthreads();
  if (tid < group.num_pairs) {
    double total = 0.0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += partial[w][tid];
    int out = 0;
#pragma unroll
    for (int q = 0; q < kMaxPairs; ++q) out = q == tid ? group.pair_out[q] : out;
    atomicAdd(&cross[out], total);
  }
}

// Launch plan: pairs in the given order, a new launch when the next pair needs more
// than kMaxMats staged matrices or kMaxPairs pairs; each matrix's row sums and
// diagonal come from the first launch that stages it; matrices in no pair get
// launches of their own.
std::vector<LaunchGroup> plan_launches(const std::vector<const void*>& blocks, const int64_t* pairs,
                                       int64_t num_pairs) {
  const int64_t m = int64_t(blocks.size());
  std::vector<char> summed(size_t(m), 0);
  std::vector<LaunchGroup> plan;
  LaunchGroup cur{};
  auto slot_of = [&](int64_t a) {
    for (int s = 0; s < cur.num_mats; ++s)
      if (cur.mats[s] == a) return s;
    return -1;
  };
  auto flush = [&] {
    if (cur.num_mats > 0) plan.push_back(cur);
    cur = LaunchGroup{};
  };
  auto stage = [&](int64_t a) {
    int s = slot_of(a);
    if (s >= 0) return s;
    s = cur.num_mats++;
    cur.blocks[s] = blocks[size_t(a)];
    cur.mats[s] = int(a);
    if (!summed[size_t(a)]) cur.sums_mask |= 1u << s, summed[size_t(a)] = 1;
    return s;
  };
  for (int64_t p = 0; p < num_pairs; ++p) {
    const int64_t a = pairs[2 * p], b = pairs[2 * p + 1];
    const int missing = (slot_of(a) < 0) + (b != a && slot_of(b) < 0);
    if (cur.num_pairs == kMaxPairs || cur.num_mats + missing > kMaxMats) flush();
    const int q = cur.num_pairs++;
    cur.pair_a[q] = stage(a);
    cur.pair_b[q] = stage(b);
    cur.pair_out[q] = int(p);
  }
  for (int64_t a = 0; a < m; ++a) {
    if (summed[size_t(a)]) continue;
    if (cur.num_mats == kMaxMats) flush();
    stage(a);
  }
  flush();
  return plan;
}

template <GramKind K, typename A>
void launch(const LaunchGroup& group, int64_t m, const void* aux, const void* scale, double* cross, double* row_sums,
            double* diag, int64_t rows, int64_t cols, int64_t r0, int64_t c0, int64_t n, bool diagonal_block,
            void* stream) {
  bool vec = cols % kVec16<A> == 0;
  for (int s = 0; s < group.num_mats; ++s) vec = vec && reinterpret_cast<uintptr_t>(group.blocks[s]) % 16 == 0;
  const int64_t tiles_r = (rows + kCols - 1) / kCols, tiles_c = (cols + kCols - 1) / kCols;
  const int64_t items = (diagonal_block ? tiles_r * (tiles_r / 2 + 1) : tiles_r * tiles_c) * (kCols / kChunkRows<A>);
  if (items > 2147483647) throw std::invalid_argument("hsic_terms: block too large for one launch");
  LaunchShape shape;
  shape.grid = dim3(unsigned(rk_min<int64_t>(items, int64_t(sm_count()) * kBlocksPerSM)));
  shape.block = dim3(kThreads);
  shape.stream = static_cast<cudaStream_t>(stream);
  auto describe = [&] {
    return "kind=" + std::to_string(int(K)) + " m=" + std::to_string(m) + " rows=" + std::to_string(rows) +
           " cols=" + std::to_string(cols) + " n=" + std::to_string(n) + " pairs=" + std::to_string(group.num_pairs);
  };
  auto run = [&](auto kernel) {
    launch_kernel("hsic_terms", describe, kernel, shape, group, static_cast<const A*>(aux),
                  static_cast<const A*>(scale), cross, row_sums, diag, rows, cols, r0, c0, n, diagonal_block);
  };
  switch_value<bool, false, true>(vec, "hsic_terms vector loads",
                                  [&](auto vec_c) { run(hsic_terms_kernel<K, A, decltype(vec_c)::value>); });
}

}  // namespace

void hsic_terms(const HsicTermsParams& p, void* stream) {
  if (p.blocks.empty() || p.rows == 0 || p.cols == 0) return;
  const std::vector<LaunchGroup> plan = plan_launches(p.blocks, p.pairs, p.num_pairs);
  dispatch_hsic(p.kind, p.acc_dtype, [&]<GramKind K, typename A>() {
    for (const LaunchGroup& group : plan)
      launch<K, A>(group, int64_t(p.blocks.size()), p.aux, p.scale, p.cross, p.row_sums, p.diag, p.rows, p.cols, p.r0,
                   p.c0, p.n, p.diagonal_block, stream);
  });
}

}  // namespace repkern::cuda
