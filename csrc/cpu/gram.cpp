// CPU Gram epilogue: tiles of the upper triangle, each computed once (with a
// vectorizable inner loop) and written to both triangles. Each task reads only
// its own upper tile, so `out` may be `inner` (in-place, as on CUDA). Row sums
// for centering are owned per row tile, so they do not depend on the thread count.
#include "gram.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

#include "common/parallel.h"

namespace repkern::cpu::REPKERN_ISA_NS {
namespace {

constexpr int64_t kTile = 64;

// 8×8 transpose in vector registers (GCC vector extensions: AVX shuffles where
// available, split into narrower ones elsewhere). src/dst rows are kTile apart.
template <typename A>
inline void transpose8x8(const A* src, A* dst) {
  typedef A vec __attribute__((vector_size(8 * sizeof(A))));
  vec r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) std::memcpy(&r[i], src + i * kTile, sizeof(vec));
  for (int i = 0; i < 8; i += 2) {  // interleave row pairs
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {  // 2×2 blocks of pairs
    u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int i = 0; i < 4; ++i) {  // halves
    const vec lo = __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    const vec hi = __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    std::memcpy(dst + i * kTile, &lo, sizeof(vec));
    std::memcpy(dst + (i + 4) * kTile, &hi, sizeof(vec));
  }
}

template <GramKind K, typename A>
struct Tile {
  A v[kTile][kTile];
  A vt[kTile][kTile];  // transpose of v, for the mirrored write
  int64_t rows = 0, cols = 0;

  // vt[c][r] = v[r][c] by 8×8 register transposes, so that the mirrored write
  // reads rows (a strided column walk does not vectorize).
  void transpose() {
    for (int64_t rb = 0; rb < kTile; rb += 8)
      for (int64_t cb = 0; cb < kTile; cb += 8) transpose8x8(&v[rb][cb], &vt[cb][rb]);
  }

  // Fills tile (ti, tj), ti <= tj, of batch matrix g; diagonal tiles mirrored.
  void compute(const A* g, const A* aux, A scale, int64_t n, int64_t ti, int64_t tj) {
    const int64_t r0 = ti * kTile, c0 = tj * kTile;
    rows = std::min(kTile, n - r0);
    cols = std::min(kTile, n - c0);
    for (int64_t r = 0; r < rows; ++r) {
      const A* grow = g + (r0 + r) * n + c0;
      const A* aux_c = aux ? aux + c0 : nullptr;
      const A aux_r = aux ? aux[r0 + r] : A(0);
      A* vr = v[r];
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        if constexpr (gram_needs_aux(K)) {
          vr[c] = gram_entry<K>(grow[c], aux_r, aux_c[c], scale);
        } else {
          vr[c] = gram_entry<K>(grow[c], A(0), A(0), scale);
        }
      }
    }
    if (ti == tj) {
      for (int64_t r = 0; r < rows; ++r) {
        v[r][r] = gram_diag<K>(g[(r0 + r) * (n + 1)], aux ? aux[r0 + r] : A(0), scale);
        for (int64_t c = 0; c < r; ++c) v[r][c] = v[c][r];
      }
    }
  }
};

template <GramKind K, GramPass P, typename A, typename Out>
void run(const A* inner, const A* aux, Out* out, const A* scale, double* row_sums, const double* totals, int64_t batch, int64_t n,
         int num_threads) {
  const int64_t tiles = (n + kTile - 1) / kTile;
  auto batch_aux = [&](int64_t b) { return aux ? aux + b * n : nullptr; };

  if constexpr (P == GramPass::RowSums) {
    // Task = (batch, row tile): sums whole rows, mirrored tiles included.
    parallel_for(batch * tiles, num_threads, 1, [&](int64_t t0, int64_t t1) {
      auto tile = std::make_unique<Tile<K, A>>();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / tiles, ti = t % tiles;
        const A* g = inner + b * n * n;
        const A s = K == GramKind::Rbf || K == GramKind::RbfFromSqDist ? scale[b] : A(0);
        double sums[kTile] = {};
        for (int64_t tj = 0; tj < tiles; ++tj) {
          const bool upper = tj >= ti;
          tile->compute(g, batch_aux(b), s, n, upper ? ti : tj, upper ? tj : ti);
          for (int64_t r = 0; r < tile->rows; ++r)
            for (int64_t c = 0; c < tile->cols; ++c) sums[upper ? r : c] += double(tile->v[r][c]);
        }
        const int64_t r0 = ti * kTile;
        for (int64_t r = 0; r < std::min(kTile, n - r0); ++r) row_sums[b * n + r0 + r] = sums[r];
      }
    });
    return;
  } else {
    const int64_t pairs = tiles * (tiles + 1) / 2;
    std::vector<int64_t> pair_ti(static_cast<size_t>(pairs)), pair_tj(static_cast<size_t>(pairs));
    for (int64_t ti = 0, p = 0; ti < tiles; ++ti)
      for (int64_t tj = ti; tj < tiles; ++tj, ++p) pair_ti[size_t(p)] = ti, pair_tj[size_t(p)] = tj;

    parallel_for(batch * pairs, num_threads, 1, [&](int64_t t0, int64_t t1) {
      auto tile = std::make_unique<Tile<K, A>>();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / pairs, ti = pair_ti[size_t(t % pairs)], tj = pair_tj[size_t(t % pairs)];
        const A s = K == GramKind::Rbf || K == GramKind::RbfFromSqDist ? scale[b] : A(0);
        tile->compute(inner + b * n * n, batch_aux(b), s, n, ti, tj);
        Out* o = out + b * n * n;
        const int64_t r0 = ti * kTile, c0 = tj * kTile;
        A mean_r[kTile] = {}, mean_c[kTile] = {};
        A mean_all = A(0);
        if constexpr (P == GramPass::WriteCentered) {
          for (int64_t r = 0; r < tile->rows; ++r) mean_r[r] = A(row_sums[b * n + r0 + r] / double(n));
          for (int64_t c = 0; c < tile->cols; ++c) mean_c[c] = A(row_sums[b * n + c0 + c] / double(n));
          mean_all = A(totals[b] / (double(n) * double(n)));
        }
        // In place, a linear off-diagonal tile already holds its values: only the mirror is written.
        const bool skip_tile = K == GramKind::Linear && ti != tj && static_cast<const void*>(out) == inner;
        for (int64_t r = 0; r < tile->rows && !skip_tile; ++r) {
          Out* orow = o + (r0 + r) * n + c0;
          for (int64_t c = 0; c < tile->cols; ++c) {
            A v = tile->v[r][c];
            if constexpr (P == GramPass::WriteCentered) v = gram_center(v, mean_r[r], mean_c[c], mean_all);
            orow[c] = from_acc<Out>(v);
          }
        }
        if (ti == tj) continue;
        tile->transpose();
        for (int64_t c = 0; c < tile->cols; ++c) {
          Out* orow = o + (c0 + c) * n + r0;
          for (int64_t r = 0; r < tile->rows; ++r) {
            A v = tile->vt[c][r];
            if constexpr (P == GramPass::WriteCentered) v = gram_center(v, mean_c[c], mean_r[r], mean_all);
            orow[r] = from_acc<Out>(v);
          }
        }
      }
    });
  }
}

}  // namespace

void gram_epilogue(const GramEpilogueParams& p, int num_threads) {
  if (p.batch == 0 || p.n == 0) return;
  dispatch_gram(p.kind, p.pass, p.acc_dtype, p.out_dtype, [&]<GramKind K, GramPass P, typename A, typename Out>() {
    run<K, P, A, Out>(static_cast<const A*>(p.inner), static_cast<const A*>(p.aux), static_cast<Out*>(p.out),
                      static_cast<const A*>(p.scale), p.row_sums, p.totals, p.batch, p.n, num_threads);
  });
}

}  // namespace repkern::cpu::REPKERN_ISA_NS
