// CPU kNN top-k merge: one tile of scores into the running top-k of its rows and of its
// columns (knn.h). Rows' merge: one row at a time, 16 scores screened at once by a vector
// compare against the row's k-th score. Columns' merge: a band of columns per thread, the
// tile read row by row; each tile row is screened against the band's k-th scores at once.
// Only screened-in candidates reach the scalar key comparison and insertion (cpu/topk.h).
// Every result is independent of the thread count.
#include "knn.h"

#include <algorithm>
#include <vector>

#include "common/dispatch.h"
#include "common/knn_math.h"
#include "common/parallel.h"
#include "cpu/topk.h"

namespace repkern::cpu::REPKERN_ISA_NS {
namespace {

constexpr int64_t kMinRowsPerTask = 16;
constexpr int kBlock = 16;          // rows' merge: scores screened by one vector compare
constexpr int kGroup = 64;          // columns' merge: columns screened by one vector compare
constexpr int64_t kBandGroups = 8;  // columns' merge: groups whose states are held while a band is read

template <typename A>
void load_state(RowTopK<A>& top, const A* vals, const int64_t* idx, int k) {
  for (int s = 0; s < k; ++s) {
    top.keys[size_t(s)] = knn_slot_key(vals[s], idx[s]);
    top.cols[size_t(s)] = idx[s] < 0 ? kSaeEmptyIndex : int32_t(idx[s]);
  }
  top.size = k;  // empty slots hold key 0: every candidate ranks before them
}

template <typename A>
void store_state(const RowTopK<A>& top, A* vals, int64_t* idx, int k) {
  for (int s = 0; s < k; ++s) {
    const auto key = top.keys[size_t(s)];
    vals[s] = sae_key_value<A>(key);
    idx[s] = key == 0 ? int64_t(-1) : int64_t(top.cols[size_t(s)]);
  }
}

// The screening threshold: a candidate score s can enter only if !(s < kth). NaN when the
// last slot is empty or NaN: then every candidate goes on to the key comparison.
template <typename A>
A kth_score(const RowTopK<A>& top) {
  return sae_key_value<A>(top.keys.back());
}

template <typename A>
void merge_rows(const A* tile, const A* bias, A* vals, int64_t* idx, int64_t rows, int64_t cols, int64_t row0,
                int64_t col0, int k, int num_threads) {
  parallel_for(rows, num_threads, kMinRowsPerTask, [&](int64_t r0, int64_t r1) {
    RowTopK<A> top(k);
    for (int64_t r = r0; r < r1; ++r) {
      load_state(top, vals + r * k, idx + r * k, k);
      const int64_t self = row0 + r - col0;  // the row's own column (often outside the tile)
      const A* p = tile + r * cols;
      A kth = kth_score(top);
      for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
        const int64_t n = std::min<int64_t>(kBlock, cols - c0);
        if (n == kBlock) {  // a fixed trip count: one unrolled vector compare
          const A* pb = p + c0;  // block-local pointers: GCC emits gathers for p[c0 + j]
          const A* bb = bias + c0;
          int hit = 0;
#pragma omp simd reduction(| : hit)
          for (int j = 0; j < kBlock; ++j) hit |= !(A(pb[j] + bb[j]) < kth);
          if (!hit) continue;
        }
        for (int64_t j = 0; j < n; ++j) {
          const A s = A(p[c0 + j] + bias[c0 + j]);
          if (s < kth || c0 + j == self) continue;
          const auto key = knn_order_key(s);
          const int32_t col = int32_t(col0 + c0 + j);
          if (!top.admits(key, col)) continue;
          top.insert(key, col);
          kth = kth_score(top);
        }
      }
      store_state(top, vals + r * k, idx + r * k, k);
    }
  });
}

template <typename A>
void merge_cols(const A* tile, const A* bias, A* vals, int64_t* idx, int64_t rows, int64_t cols, int64_t row0,
                int64_t col0, int k, int num_threads) {
  const int64_t groups = (cols + kGroup - 1) / kGroup;
  parallel_for(groups, num_threads, 1, [&](int64_t g_begin, int64_t g_end) {
    std::vector<RowTopK<A>> tops(size_t(kBandGroups * kGroup), RowTopK<A>(k));
    std::vector<A> kth(size_t(kBandGroups * kGroup));
    for (int64_t g0 = g_begin; g0 < g_end; g0 += kBandGroups) {
      const int64_t b0 = g0 * kGroup;  // the band: columns b0 .. b1 − 1
      const int64_t b1 = std::min(cols, std::min(g_end, g0 + kBandGroups) * kGroup);
      for (int64_t c = b0; c < b1; ++c) {
        RowTopK<A>& top = tops[size_t(c - b0)];
        load_state(top, vals + c * k, idx + c * k, k);
        kth[size_t(c - b0)] = kth_score(top);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const A b = bias[r];
        const int32_t cand = int32_t(row0 + r);
        const int64_t self = row0 + r - col0;  // the column of row r itself (often outside the tile)
        for (int64_t c0 = b0; c0 < b1; c0 += kGroup) {
          const int64_t n = std::min<int64_t>(kGroup, b1 - c0);
          const A* p = tile + r * cols + c0;
          const A* t = kth.data() + (c0 - b0);
          if (n == kGroup) {
            int hit = 0;
#pragma omp simd reduction(| : hit)
            for (int j = 0; j < kGroup; ++j) hit |= !(A(p[j] + b) < t[j]);
            if (!hit) continue;
          }
          for (int64_t j = 0; j < n; ++j) {
            const A s = A(p[j] + b);
            if (s < t[j] || c0 + j == self) continue;
            RowTopK<A>& top = tops[size_t(c0 - b0 + j)];
            const auto key = knn_order_key(s);
            if (!top.admits(key, cand)) continue;
            top.insert(key, cand);
            kth[size_t(c0 - b0 + j)] = kth_score(top);
          }
        }
      }
      for (int64_t c = b0; c < b1; ++c) store_state(tops[size_t(c - b0)], vals + c * k, idx + c * k, k);
    }
  });
}

}  // namespace

void knn_topk_merge(const KnnTopkMergeParams& p, int num_threads) {
  if (p.rows == 0 || p.cols == 0) return;
  switch_acc(p.acc_dtype, "knn_topk_merge", [&](auto tag) {
    using A = typename decltype(tag)::type;
    const A* tile = static_cast<const A*>(p.tile);
    merge_rows(tile, static_cast<const A*>(p.col_bias), static_cast<A*>(p.row_vals), p.row_idx, p.rows, p.cols,
               p.row0, p.col0, p.k, num_threads);
    if (p.col_vals)
      merge_cols(tile, static_cast<const A*>(p.row_bias), static_cast<A*>(p.col_vals), p.col_idx, p.rows, p.cols,
                 p.row0, p.col0, p.k, num_threads);
  });
}

}  // namespace repkern::cpu::REPKERN_ISA_NS
