// CPU replicate row sums. Each (replicate, row) sum is written, not accumulated across
// threads, so the result does not depend on the thread count.
//   Permute: replicates split over threads, each replicate whole on one thread; row i gathers only
//            its products with j ≥ i (common/cka_test_math.h: the upper-triangle share of the total).
//   Bootstrap: rows split over threads, walked in blocks that stay in L2 while every replicate
//            passes over them (a replicate's weights stay in cache across the block's rows).
#include "cka_test.h"

#include <algorithm>

#include "common/parallel.h"

namespace repkern::cpu::REPKERN_ISA_NS {
namespace {

constexpr int64_t kBlockBytes = 256 << 10;

template <typename T>
void run_permute(const T* a, const T* b, const int32_t* index, double* out, int64_t replicates, int64_t n,
                 int num_threads) {
  parallel_for(replicates, num_threads, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int32_t* perm = index + r * n;
      for (int64_t i = 0; i < n; ++i) {
        const T* a_row = a + i * n;
        const T* b_row = b + int64_t(perm[i]) * n;
        // The gather reads row π(i) in random order: the hardware prefetcher cannot follow it, so
        // the next row is fetched (from L3) while this one is summed.
        if (i + 1 < n) {
          const T* next = b + int64_t(perm[i + 1]) * n;
          for (int64_t j = 0; j < n; j += 64 / int64_t(sizeof(T))) __builtin_prefetch(next + j, 0, 1);
        }
        double s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = i + 1; j < n; ++j) s += double(a_row[j]) * double(b_row[perm[j]]);
        out[r * n + i] = double(a_row[i]) * double(b_row[perm[i]]) + 2 * s;
      }
    }
  });
}

template <typename T>
void run_bootstrap(const T* a, const T* b, const float* weight, double* out, int64_t replicates, int64_t n,
                   int num_threads) {
  constexpr ReplicateMode M = ReplicateMode::Bootstrap;
  constexpr int C = replicate_channels(M);
  const int64_t block_rows = std::max<int64_t>(1, kBlockBytes / (2 * n * int64_t(sizeof(T))));  // of A and B
  parallel_for(n, num_threads, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t ib = i0; ib < i1; ib += block_rows) {
      for (int64_t r = 0; r < replicates; ++r) {
        const float* w = weight + r * n;
        for (int64_t i = ib; i < std::min(i1, ib + block_rows); ++i) {
          const T *a_row = a + i * n, *b_row = b + i * n;
          double s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4)
          for (int64_t j = 0; j < n; ++j)
            replicate_add<M>(s0, s1, s2, s3, s4, double(a_row[j]), double(b_row[j]), double(w[j]));
          const double s[C] = {s0, s1, s2, s3, s4};
          for (int c = 0; c < C; ++c) out[(r * n + i) * C + c] = s[c];
        }
      }
    }
  });
}

}  // namespace

void replicate_rows(const ReplicateRowsParams& p, int num_threads) {
  if (p.replicates == 0 || p.n == 0) return;
  dispatch_replicate(p.mode, p.dtype, [&]<ReplicateMode M, typename T>() {
    const T *a_t = static_cast<const T*>(p.a), *b_t = static_cast<const T*>(p.b);
    if constexpr (M == ReplicateMode::Permute) {
      check_indices(p.index, p.replicates * p.n, p.n, kBadPermutation);
      run_permute<T>(a_t, b_t, p.index, p.out, p.replicates, p.n, num_threads);
    } else {
      run_bootstrap<T>(a_t, b_t, p.weight, p.out, p.replicates, p.n, num_threads);
    }
  });
}

}  // namespace repkern::cpu::REPKERN_ISA_NS
