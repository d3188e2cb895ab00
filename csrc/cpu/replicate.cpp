// CPU replicate row sums: rows split over threads, walked in blocks of rows that stay in L2;
// for each replicate, each row of the block takes one vectorizable pass (Permute: a gather
// from row π(i) of B). Blocking keeps a replicate's permutation or weights in cache across the
// rows of a block instead of reading them again for every row. Each (replicate, row) sum is
// written, not accumulated, so the result does not depend on the thread count.
#include "replicate.h"

#include <algorithm>

#include "common/parallel.h"

namespace repkern::cpu {
namespace {

constexpr int64_t kBlockBytes = 256 << 10;

template <ReplicateMode M, typename T>
void run(const T* a, const T* b, const int32_t* index, const float* weight, double* out, int64_t replicates,
         int64_t n, int num_threads) {
  constexpr int C = replicate_channels(M);
  // Rows of A (and of B for Bootstrap) per block: about kBlockBytes.
  const int64_t block_rows =
      std::max<int64_t>(1, kBlockBytes / (n * int64_t(sizeof(T)) * (M == ReplicateMode::Bootstrap ? 2 : 1)));
  parallel_for(n, num_threads, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t ib = i0; ib < i1; ib += block_rows) {
      for (int64_t r = 0; r < replicates; ++r) {
        for (int64_t i = ib; i < std::min(i1, ib + block_rows); ++i) {
        const T* a_row = a + i * n;
        double s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0;
        if constexpr (M == ReplicateMode::Permute) {
          const int32_t* perm = index + r * n;
          const T* b_row = b + int64_t(perm[i]) * n;
          // The gather reads row π(i) in random order: the hardware prefetcher cannot follow it, so
          // the next row is fetched (from L3) while this one is summed.
          if (i + 1 < i1) {
            const T* next = b + int64_t(perm[i + 1]) * n;
            for (int64_t j = 0; j < n; j += 64 / int64_t(sizeof(T))) __builtin_prefetch(next + j);
          }
#pragma omp simd reduction(+ : s0)
          for (int64_t j = 0; j < n; ++j)
            replicate_add<M>(s0, s1, s2, s3, s4, double(a_row[j]), double(b_row[perm[j]]), 1.0);
        } else {
          const float* w = weight + r * n;
          const T* b_row = b + i * n;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4)
          for (int64_t j = 0; j < n; ++j)
            replicate_add<M>(s0, s1, s2, s3, s4, double(a_row[j]), double(b_row[j]), double(w[j]));
        }
        const double s[5] = {s0, s1, s2, s3, s4};
        for (int c = 0; c < C; ++c) out[(r * n + i) * C + c] = s[c];
        }
      }
    }
  });
}

}  // namespace

void replicate_rows(ReplicateMode mode, DType dtype, const void* a, const void* b, const int32_t* index,
                    const float* weight, double* out, int64_t replicates, int64_t n, int num_threads) {
  if (replicates == 0 || n == 0) return;
  dispatch_replicate(mode, dtype, [&]<ReplicateMode M, typename T>() {
    run<M, T>(static_cast<const T*>(a), static_cast<const T*>(b), index, weight, out, replicates, n, num_threads);
  });
}

}  // namespace repkern::cpu
