// CPU SAE kernels: one pass over a GEMM chunk (activation, CSR pieces, top-k
// merge) and the sparse gathers of decode and backward. Rows are split across
// threads; every result is independent of the thread count.
#include "sae.h"

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <vector>

#include "common/parallel.h"
#include "common/sae_math.h"
#include "cpu/topk.h"

namespace repkern::cpu::REPKERN_ISA_NS {
namespace {

constexpr int64_t kMinRowsPerTask = 16;

template <typename A>
A activated(const A* pre_row, const A* bias, const float* theta, int64_t c) {
  return sae_activation(A(pre_row[c] + bias[c]), theta ? theta[c] : 0.0f);
}

template <typename A, typename Out>
void activate(const A* pre, int64_t ld_pre, const A* bias, const float* theta, Out* out, int64_t ld_out,
              int64_t* fire_counts, int64_t rows, int64_t cols, int num_threads) {
  parallel_for(rows, num_threads, kMinRowsPerTask, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> fires(fire_counts ? size_t(cols) : 0, 0);
    for (int64_t r = r0; r < r1; ++r) {
      const A* p = pre + r * ld_pre;
      Out* o = out + r * ld_out;
      if (fire_counts) {
        for (int64_t c = 0; c < cols; ++c) {
          const A v = activated(p, bias, theta, c);
          o[c] = from_acc<Out>(v);
          fires[size_t(c)] += v != A(0) ? 1 : 0;
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) o[c] = from_acc<Out>(activated(p, bias, theta, c));
      }
    }
    for (int64_t c = 0; c < int64_t(fires.size()); ++c)
      if (fires[size_t(c)]) std::atomic_ref<int64_t>(fire_counts[c]).fetch_add(fires[size_t(c)]);
  });
}

template <typename A>
void sparsify(const A* pre, const A* bias, const float* theta, int64_t* counts, const int64_t* offsets,
              int64_t* out_cols, A* out_vals, int64_t rows, int64_t cols, int64_t col0, int64_t nnz,
              int num_threads) {
  parallel_for(rows, num_threads, kMinRowsPerTask, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const A* p = pre + r * cols;
      if (counts) {
        int64_t n = 0;
#pragma omp simd reduction(+ : n)
        for (int64_t c = 0; c < cols; ++c) n += activated(p, bias, theta, c) != A(0) ? 1 : 0;
        counts[r] = n;
      } else {
        int64_t pos = offsets[r];
        for (int64_t c = 0; c < cols; ++c) {
          const A v = activated(p, bias, theta, c);
          if (v != A(0)) {
            if (pos < 0 || pos >= nnz) throw_index_error(kBadOffsets);  // parallel_for rethrows it
            out_cols[pos] = col0 + c;
            out_vals[pos] = v;
            ++pos;
          }
        }
      }
    }
  });
}

template <typename A, bool ReluFirst>
void topk_merge(const A* pre, const A* bias, A* top_vals, int64_t* top_cols, int64_t rows, int64_t cols,
                int64_t col0, int k, bool first, int num_threads) {
  constexpr int64_t kBlock = 16;  // screened at once by a vector loop; most blocks hold no candidate
  parallel_for(rows, num_threads, kMinRowsPerTask, [&](int64_t r0, int64_t r1) {
    RowTopK<A> top(k);
    for (int64_t r = r0; r < r1; ++r) {
      top.size = 0;
      if (!first) {
        for (int s = 0; s < k; ++s) {
          top.keys[size_t(s)] = sae_order_key(top_vals[r * k + s]);
          top.cols[size_t(s)] = int32_t(top_cols[r * k + s]);
        }
        top.size = k;
      }
      const A* p = pre + r * cols;
      // A candidate must be >= the k-th value, or NaN (it ranks above every number).
      A kth = top.full() ? sae_key_value<A>(top.keys[size_t(k - 1)]) : A(0);
      for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
        const int64_t n = std::min(kBlock, cols - c0);
        if (top.full() && n == kBlock) {  // a fixed trip count: one unrolled vector compare
          const A* pb = p + c0;  // block-local pointers: GCC emits gathers for p[c0 + j]
          const A* bb = bias + c0;
          int hit = 0;
#pragma omp simd reduction(| : hit)
          for (int j = 0; j < int(kBlock); ++j) {
            const A h = A(pb[j] + bb[j]);
            const A s = ReluFirst ? (h < A(0) ? A(0) : h) : h;
            hit |= !(s < kth);  // s >= kth, or NaN
          }
          if (!hit) continue;
        }
        for (int64_t j = 0; j < n; ++j) {
          const A h = A(p[c0 + j] + bias[c0 + j]);
          const A ranked = ReluFirst ? sae_activation(h, 0.0f) : h;
          if (top.full() && ranked < kth) continue;  // the common case, before any key arithmetic
          const auto key = sae_order_key(ranked);
          const int32_t col = int32_t(col0 + c0 + j);
          if (!top.admits(key, col)) continue;
          top.insert(key, col);
          if (top.full()) kth = sae_key_value<A>(top.keys[size_t(k - 1)]);
        }
      }
      for (int s = 0; s < k; ++s) {
        top_vals[r * k + s] = sae_key_value<A>(top.keys[size_t(s)]);
        top_cols[r * k + s] = top.cols[size_t(s)];
      }
    }
  });
}

template <typename T>
void spmm(const int64_t* crow, const int64_t* cols, const T* vals, const T* dense, const T* bias, T* out,
          acc_t<T>* row_sums, int64_t rows, int64_t D, int num_threads) {
  using A = acc_t<T>;
  parallel_for(rows, num_threads, kMinRowsPerTask, [&](int64_t r0, int64_t r1) {
    std::vector<A> acc(static_cast<size_t>(D));
    for (int64_t r = r0; r < r1; ++r) {
      A sum = A(0);
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t e = crow[r]; e < crow[r + 1]; ++e) {
        const A v = to_acc(vals[e]);
        sum += v;
        if (!dense) continue;
        const T* row = dense + cols[e] * D;
        A* a = acc.data();
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] += v * to_acc(row[d]);
      }
      if (row_sums) row_sums[r] = sum;
      if (!dense) continue;
      T* o = out + r * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] = from_acc<T>(bias ? acc[size_t(d)] + to_acc(bias[d]) : acc[size_t(d)]);
    }
  });
}

template <typename T>
void sddmm(const int64_t* rows_of, const int64_t* cols_of, const T* a, const T* b, acc_t<T>* out, int64_t nnz,
           int64_t D, int num_threads) {
  using A = acc_t<T>;
  parallel_for(nnz, num_threads, 256, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const T* x = a + rows_of[e] * D;
      const T* y = b + cols_of[e] * D;
      A dot = A(0);
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += to_acc(x[d]) * to_acc(y[d]);
      out[e] = dot;
    }
  });
}

}  // namespace

void sae_activate(const SaeActivateParams& p, int num_threads) {
  if (p.rows == 0 || p.cols == 0) return;
  switch_acc_data(p.acc_dtype, p.out_dtype, "sae_activate", [&]<typename A, typename Out>() {
    activate(static_cast<const A*>(p.pre), p.ld_pre, static_cast<const A*>(p.bias), p.theta, static_cast<Out*>(p.out),
             p.ld_out, p.fire_counts, p.rows, p.cols, num_threads);
  });
}

void sae_sparsify(const SaeSparsifyParams& p, int num_threads) {
  if (p.rows == 0 || p.cols == 0) return;
  switch_acc(p.acc_dtype, "sae_sparsify", [&](auto tag) {
    using A = typename decltype(tag)::type;
    sparsify(static_cast<const A*>(p.pre), static_cast<const A*>(p.bias), p.theta, p.counts, p.offsets, p.out_cols,
             static_cast<A*>(p.out_vals), p.rows, p.cols, p.col0, p.nnz, num_threads);
  });
}

void sae_topk_merge(const SaeTopkMergeParams& p, int num_threads) {
  if (p.rows == 0) return;
  switch_acc(p.acc_dtype, "sae_topk_merge", [&](auto tag) {
    using A = typename decltype(tag)::type;
    // A compile-time switch: a runtime one in the screening loop costs about 4x there.
    auto run = p.relu_first ? topk_merge<A, true> : topk_merge<A, false>;
    run(static_cast<const A*>(p.pre), static_cast<const A*>(p.bias), static_cast<A*>(p.top_vals), p.top_cols, p.rows,
        p.cols, p.col0, p.k, p.first, num_threads);
  });
}

void sae_spmm(const SaeSpmmParams& p, int num_threads) {
  if (p.rows == 0) return;
  check_csr(p.crow, p.rows, p.nnz);
  if (p.dense) check_indices(p.cols, p.nnz, p.K, kBadCols);
  switch_dtype(p.dtype, "sae_spmm", [&](auto tag) {
    using T = typename decltype(tag)::type;
    spmm(p.crow, p.cols, static_cast<const T*>(p.vals), static_cast<const T*>(p.dense), static_cast<const T*>(p.bias),
         static_cast<T*>(p.out), static_cast<acc_t<T>*>(p.row_sums), p.rows, p.D, num_threads);
  });
}

void sae_sddmm(const SaeSddmmParams& p, int num_threads) {
  if (p.nnz == 0) return;
  check_indices(p.rows_of, p.nnz, p.R, kBadRowsOf);
  check_indices(p.cols_of, p.nnz, p.K, kBadColsOf);
  switch_dtype(p.dtype, "sae_sddmm", [&](auto tag) {
    using T = typename decltype(tag)::type;
    sddmm(p.rows_of, p.cols_of, static_cast<const T*>(p.a), static_cast<const T*>(p.b), static_cast<acc_t<T>*>(p.out),
          p.nnz, p.D, num_threads);
  });
}

}  // namespace repkern::cpu::REPKERN_ISA_NS
