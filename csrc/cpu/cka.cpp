// CPU HSIC terms: the block's sub-tiles (64×64; on a diagonal block those with
// ti <= tj, read from the diagonal on) are split into one contiguous range per
// thread; a thread turns each sub-tile row into kernel values for all m matrices
// (vectorizable loop, the values stay in L1), then adds row sums, column sums
// (the mirrored entries) and the Σ K_a∘K_b products of every pair in float64.
// Per-thread partials are combined in thread order, so for a given thread count
// the result does not depend on timing.
#include "cka.h"

#include <algorithm>
#include <vector>

#include "common/parallel.h"

namespace repkern::cpu::REPKERN_ISA_NS {
namespace {

constexpr int64_t kTile = 64;

struct SubTile {
  int64_t ti, tj;
};

template <GramKind K, typename A>
void run(const std::vector<const void*>& blocks, const A* aux, const A* scale, const int64_t* pairs, int64_t num_pairs,
         double* cross, double* row_sums, double* diag, int64_t rows, int64_t cols, int64_t r0, int64_t c0, int64_t n,
         bool diagonal_block, int num_threads) {
  const int64_t m = int64_t(blocks.size());
  const int64_t tiles_r = (rows + kTile - 1) / kTile, tiles_c = (cols + kTile - 1) / kTile;
  std::vector<SubTile> tasks;
  for (int64_t ti = 0; ti < tiles_r; ++ti)
    for (int64_t tj = diagonal_block ? ti : 0; tj < tiles_c; ++tj) tasks.push_back({ti, tj});
  const int64_t num_tasks = int64_t(tasks.size());
  const int64_t slots = std::clamp<int64_t>(num_threads, 1, std::max<int64_t>(1, num_tasks));
  // Per-slot partials: pair products, and sums of the block's rows and of its columns
  // (for a diagonal block the columns are the same indices as the rows).
  const int64_t span = rows + (diagonal_block ? 0 : cols);
  std::vector<double> cross_part(size_t(slots * num_pairs), 0.0), sums_part(size_t(slots * m * span), 0.0);

  parallel_for(slots, num_threads, 1, [&](int64_t s0, int64_t s1) {
    std::vector<A> values(size_t(m * kTile));        // one sub-tile row of every matrix
    std::vector<double> col_acc(size_t(m * kTile));  // column sums of the current sub-tile
    for (int64_t slot = s0; slot < s1; ++slot) {
      double* cross_s = cross_part.data() + slot * num_pairs;
      double* sums_s = sums_part.data() + slot * m * span;
      for (int64_t t = slot * num_tasks / slots; t < (slot + 1) * num_tasks / slots; ++t) {
        const int64_t lr0 = tasks[size_t(t)].ti * kTile, lc0 = tasks[size_t(t)].tj * kTile;
        const int64_t tr = std::min(kTile, rows - lr0), tc = std::min(kTile, cols - lc0);
        const bool diag_tile = diagonal_block && lr0 == lc0;
        const int64_t col_base = diagonal_block ? lc0 : rows + lc0;  // where column sums land in sums_s
        std::fill(col_acc.begin(), col_acc.end(), 0.0);
        for (int64_t r = 0; r < tr; ++r) {
          const int64_t gi = r0 + lr0 + r;                 // row in the whole matrix
          const int64_t cb = diag_tile ? r : 0;            // first column read: the upper triangle only
          const int64_t mirrored = diag_tile ? r + 1 : 0;  // first column that stands for its mirror too
          for (int64_t a = 0; a < m; ++a) {
            const A* g = static_cast<const A*>(blocks[size_t(a)]) + (lr0 + r) * cols + lc0;
            const A* aux_c = aux ? aux + a * n + c0 + lc0 : nullptr;
            const A aux_r = aux ? aux[a * n + gi] : A(0);
            const A s = scale ? scale[a] : A(0);
            A* v = values.data() + a * kTile;
#pragma omp simd
            for (int64_t c = cb; c < tc; ++c) {
              if constexpr (gram_needs_aux(K)) {
                v[c] = gram_entry<K>(g[c], aux_r, aux_c[c], s);
              } else {
                v[c] = gram_entry<K>(g[c], A(0), A(0), s);
              }
            }
            if (diag_tile) {
              v[r] = hsic_diag_entry<K>(g[r], aux_r, s);
              diag[a * n + gi] = double(v[r]);
            }
            double row_sum = 0.0;
#pragma omp simd reduction(+ : row_sum)
            for (int64_t c = cb; c < tc; ++c) row_sum += double(v[c]);
            sums_s[a * span + lr0 + r] += row_sum;
            double* ca = col_acc.data() + a * kTile;
#pragma omp simd
            for (int64_t c = mirrored; c < tc; ++c) ca[c] += double(v[c]);
          }
          for (int64_t p = 0; p < num_pairs; ++p) {
            const A* va = values.data() + pairs[2 * p] * kTile;
            const A* vb = values.data() + pairs[2 * p + 1] * kTile;
            double dot = 0.0;
#pragma omp simd reduction(+ : dot)
            for (int64_t c = cb; c < tc; ++c) dot += double(va[c]) * double(vb[c]);
            cross_s[p] += 2.0 * dot - (diag_tile ? double(va[r]) * double(vb[r]) : 0.0);  // the diagonal once
          }
        }
        for (int64_t a = 0; a < m; ++a)
          for (int64_t c = 0; c < tc; ++c) sums_s[a * span + col_base + c] += col_acc[size_t(a * kTile + c)];
      }
    }
  });

  for (int64_t slot = 0; slot < slots; ++slot) {
    for (int64_t p = 0; p < num_pairs; ++p) cross[p] += cross_part[size_t(slot * num_pairs + p)];
    const double* sums_s = sums_part.data() + slot * m * span;
    for (int64_t a = 0; a < m; ++a) {
      for (int64_t i = 0; i < rows; ++i) row_sums[a * n + r0 + i] += sums_s[a * span + i];
      if (!diagonal_block)
        for (int64_t j = 0; j < cols; ++j) row_sums[a * n + c0 + j] += sums_s[a * span + rows + j];
    }
  }
}

}  // namespace

void hsic_terms(const HsicTermsParams& p, int num_threads) {
  if (p.blocks.empty() || p.rows == 0 || p.cols == 0) return;
  dispatch_hsic(p.kind, p.acc_dtype, [&]<GramKind K, typename A>() {
    run<K, A>(p.blocks, static_cast<const A*>(p.aux), static_cast<const A*>(p.scale), p.pairs, p.num_pairs, p.cross,
              p.row_sums, p.diag, p.rows, p.cols, p.r0, p.c0, p.n, p.diagonal_block, num_threads);
  });
}

}  // namespace repkern::cpu::REPKERN_ISA_NS
