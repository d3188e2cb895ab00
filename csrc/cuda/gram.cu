// Gram epilogue: one pass over the GEMM output that applies the kernel function
// (cosine / squared distance / RBF), writes both triangles from the upper one
// (exact symmetry), and optionally centers (HKH) from row sums of a first pass.
//
// One block per (upper tile pair, batch). The tile goes through shared memory so
// that the mirrored tile is written with coalesced stores. Each block reads only
// its own upper tile, so `out` may be `inner` (float32/float64 Grams are written
// in place over the GEMM output: one n×n buffer instead of two).
// Minimum traffic per matrix: read n²/2 · sizeof(acc), write n² · sizeof(out)
// (the centered path reads twice). FLOPs: ~4 per entry, plus one exp (RBF).
#include "gram.h"

#include <cmath>
#include <string>

#include "common/launch.h"
#include "cuda/reduce.cuh"
#include "cuda/tile_pairs.cuh"

namespace repkern::cuda {
namespace {

constexpr int kTile = 32;          // tile edge = warp width
constexpr int kRowsPerPass = 8;    // blockDim.y
constexpr int kRowIters = kTile / kRowsPerPass;
constexpr unsigned kMaxGridY = 65535;  // batch matrices: blockIdx.y + 65535 · blockIdx.z

template <GramKind K, GramPass P, typename A, typename Out>
__global__ void __launch_bounds__(kTile* kRowsPerPass)
    gram_epilogue_kernel(const A* inner,                     // [B, n, n]
                         const A* __restrict__ aux,          // [B, n] or null (!gram_needs_aux)
                         Out* out,                           // [B, n, n], may be `inner` (see launcher)
                         const A* __restrict__ scale,        // [B] or null
                         double* __restrict__ row_sums,      // [B, n] or null
                         const double* __restrict__ totals,  // [B] or null
                         int64_t batch, int64_t n,
                         double inv_n) {  // 1/n from the host: no device division
  RK_SHARED(A, tile, [kTile][kTile + 1]);  // +1: column reads without bank conflicts
  RK_SHARED(A, aux_r, [kTile]);
  RK_SHARED(A, aux_c, [kTile]);
  RK_SHARED(A, mean_r, [kTile]);
  RK_SHARED(A, mean_c, [kTile]);
  RK_SHARED(double, col_part, [kRowsPerPass][kTile]);

  unsigned ti, tj;
  if (!tile_pair(blockIdx.x, unsigned((n + kTile - 1) / kTile), ti, tj)) return;  // whole block
  const int64_t b = int64_t(blockIdx.z) * kMaxGridY + blockIdx.y;
  if (b >= batch) return;  // whole block
  const int64_t r0 = int64_t(ti) * kTile, c0 = int64_t(tj) * kTile;
  const int rows = int(rk_min<int64_t>(kTile, n - r0)), cols = int(rk_min<int64_t>(kTile, n - c0));
  const bool diagonal = ti == tj;
  const int tx = threadIdx.x, ty = threadIdx.y;

  if (ty == 0) {
    if constexpr (gram_needs_aux(K)) {
      if (tx < rows) aux_r[tx] = aux[b * n + r0 + tx];
      if (tx < cols) aux_c[tx] = aux[b * n + c0 + tx];
    }
    if constexpr (P == GramPass::WriteCentered) {
      if (tx < rows) mean_r[tx] = A(row_sums[b * n + r0 + tx] * inv_n);
      if (tx < cols) mean_c[tx] = A(row_sums[b * n + c0 + tx] * inv_n);
    }
  }
  __syncthreads();

  const A s = K == GramKind::Rbf || K == GramKind::RbfFromSqDist ? scale[b] : A(0);
  const A* g = inner + (b * n + r0) * n + c0;  // tile origin
#pragma unroll
  for (int k = 0; k < kRowIters; ++k) {
    const int r = ty + k * kRowsPerPass;
    A v = A(0);  // out-of-range entries stay 0 (row sums rely on it)
    if (r < rows && tx < cols) {
      const A gij = g[r * n + tx];
      v = diagonal && r == tx ? gram_diag<K>(gij, aux_r[r], s) : gram_entry<K>(gij, aux_r[r], aux_c[tx], s);
    }
    tile[r][tx] = v;
  }
  __syncthreads();

  // Entry (r, c) of this tile; diagonal tiles mirror their upper triangle.
  auto value = [&](int r, int c) -> A { return diagonal && r > c ? tile[c][r] : tile[r][c]; };

  if constexpr (P == GramPass::RowSums) {
    double col_acc = 0.0;
#pragma unroll
    for (int k = 0; k < kRowIters; ++k) {
      const int r = ty + k * kRowsPerPass;
      const double v = double(value(r, tx));
      const double row_total = warp_sum(v);
      if (tx == 0 && r < rows) atomicAdd(&row_sums[b * n + r0 + r], row_total);
      col_acc += v;
    }
    if (!diagonal) {  // the mirrored tile adds its rows' sums: column sums here
      col_part[ty][tx] = col_acc;
      __syncthreads();
      if (ty == 0 && tx < cols) {
        double t = 0.0;
#pragma unroll
        for (int y = 0; y < kRowsPerPass; ++y) t += col_part[y][tx];
        atomicAdd(&row_sums[b * n + c0 + tx], t);
      }
    }
  } else {
    A mean_all = A(0);
    if constexpr (P == GramPass::WriteCentered) mean_all = A(totals[b] * inv_n * inv_n);
    Out* o = out + (b * n + r0) * n + c0;
    // In place, a linear off-diagonal tile already holds its values: only the mirror is written.
    const bool skip_tile = K == GramKind::Linear && !diagonal && static_cast<const void*>(out) == inner;
#pragma unroll
    for (int k = 0; k < kRowIters && !skip_tile; ++k) {
      const int r = ty + k * kRowsPerPass;
      if (r < rows && tx < cols) {
        A v = value(r, tx);
        if constexpr (P == GramPass::WriteCentered) v = gram_center(v, mean_r[r], mean_c[tx], mean_all);
        o[r * n + tx] = from_acc<Out>(v);
      }
    }
    if (!diagonal) {
      Out* m = out + (b * n + c0) * n + r0;  // mirrored tile origin
#pragma unroll
      for (int k = 0; k < kRowIters; ++k) {
        const int c = ty + k * kRowsPerPass;  // row of the mirrored tile
        if (c < cols && tx < rows) {
          A v = tile[tx][c];
          if constexpr (P == GramPass::WriteCentered) v = gram_center(v, mean_c[c], mean_r[tx], mean_all);
          m[c * n + tx] = from_acc<Out>(v);
        }
      }
    }
  }
}

template <GramKind K, GramPass P, typename A, typename Out>
void launch(const void* inner, const void* aux, void* out, const void* scale, double* row_sums, const double* totals, int64_t batch,
            int64_t n, void* stream) {
  const unsigned tiles = unsigned((n + kTile - 1) / kTile);
  LaunchShape shape;
  const unsigned batch_y = unsigned(batch < kMaxGridY ? batch : kMaxGridY);
  shape.grid = dim3(tiles * tile_pairs_per_row(tiles), batch_y, unsigned((batch + kMaxGridY - 1) / kMaxGridY));
  shape.block = dim3(kTile, kRowsPerPass);
  shape.stream = static_cast<cudaStream_t>(stream);
  launch_kernel(
      "gram_epilogue",
      [&] {
        return "kind=" + std::to_string(int(K)) + " pass=" + std::to_string(int(P)) + " B=" + std::to_string(batch) +
               " n=" + std::to_string(n);
      },
      gram_epilogue_kernel<K, P, A, Out>, shape, static_cast<const A*>(inner), static_cast<const A*>(aux),
      static_cast<Out*>(out),
      static_cast<const A*>(scale), row_sums, totals, batch, n, 1.0 / double(n));
}

}  // namespace

void gram_epilogue(const GramEpilogueParams& p, void* stream) {
  if (p.batch == 0 || p.n == 0) return;
  const int64_t tiles = (p.n + kTile - 1) / kTile;
  if (tiles * (tiles / 2 + 1) > 2147483647) throw std::invalid_argument("gram_epilogue: n too large for one launch");
  dispatch_gram(p.kind, p.pass, p.acc_dtype, p.out_dtype, [&]<GramKind K, GramPass P, typename A, typename Out>() {
    launch<K, P, A, Out>(p.inner, p.aux, p.out, p.scale, p.row_sums, p.totals, p.batch, p.n, stream);
  });
}

}  // namespace repkern::cuda
