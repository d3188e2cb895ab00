// A row's running top-k held by one warp in registers, shared by the CUDA top-k merges
// (sae_topk_merge, knn_topk_merge). Entries are sorted by rank (common/sae_math.h: larger
// key first, equal keys lower column first) and lane-major: lane l keeps ranks
// l·R .. l·R + R − 1 (R = ceil(k/32) rounded to a power of two; register arrays indexed by
// compile-time constants only). Lanes hold one candidate each; a ballot finds those that
// outrank the current k-th entry, and each is inserted by the whole warp (its rank by a
// warp sum, the shift by one shuffle-up). Every lane of the warp must take part.
#pragma once

#include <cstdint>

#include "common/macros.h"
#include "common/sae_math.h"
#include "cuda/packed.cuh"
#include "cuda/reduce.cuh"

namespace repkern::cuda {

// The k-th entry (rank k − 1: lane kth_lane, slot kth_slot) broadcast to every lane.
template <typename K, int R>
__device__ __forceinline__ void broadcast_kth(const K (&key)[R], const int32_t (&col)[R], int kth_lane, int kth_slot,
                                              K& kth_key, int32_t& kth_col) {
  K mine_key = key[0];
  int32_t mine_col = col[0];
#pragma unroll
  for (int s = 1; s < R; ++s) {
    if (s == kth_slot) {
      mine_key = key[s];
      mine_col = col[s];
    }
  }
  kth_key = __shfl_sync(kFullMask, mine_key, kth_lane);
  kth_col = __shfl_sync(kFullMask, mine_col, kth_lane);
}

// Inserts (new_key, new_col) at its rank; the k-th entry drops out.
template <typename K, int R>
__device__ __forceinline__ void warp_insert(K (&key)[R], int32_t (&col)[R], K new_key, int32_t new_col, int lane,
                                            int k) {
  int before = 0;  // kept entries of this lane that outrank the candidate
#pragma unroll
  for (int s = 0; s < R; ++s) before += (lane * R + s < k && sae_ranks_before(key[s], col[s], new_key, new_col)) ? 1 : 0;
  const int rank = warp_sum(before);
  const K up_key = __shfl_up_sync(kFullMask, key[R - 1], 1);
  const int32_t up_col = __shfl_up_sync(kFullMask, col[R - 1], 1);
#pragma unroll
  for (int s = R - 1; s >= 0; --s) {
    const int q = lane * R + s;
    const K prev_key = s > 0 ? key[s > 0 ? s - 1 : 0] : up_key;
    const int32_t prev_col = s > 0 ? col[s > 0 ? s - 1 : 0] : up_col;
    if (q > rank) {
      key[s] = prev_key;
      col[s] = prev_col;
    } else if (q == rank) {
      key[s] = new_key;
      col[s] = new_col;
    }
  }
}

// Offers each lane's candidate (my_key, my_col) where `pending` (it outranks the k-th entry;
// false on lanes without one): inserts them one by one, lowest lane first, and keeps
// (kth_key, kth_col) current. A lane's candidate is dropped once the k-th entry outranks it.
template <typename K, int R>
__device__ __forceinline__ void warp_offer(K (&key)[R], int32_t (&col)[R], K& kth_key, int32_t& kth_col, K my_key,
                                           int32_t my_col, bool pending, int lane, int k, int kth_lane,
                                           int kth_slot) {
  for (unsigned mask = __ballot_sync(kFullMask, pending); mask != 0; mask = __ballot_sync(kFullMask, pending)) {
    const int src = __ffs(int(mask)) - 1;
    const K new_key = __shfl_sync(kFullMask, my_key, src);
    const int32_t new_col = __shfl_sync(kFullMask, my_col, src);
    warp_insert(key, col, new_key, new_col, lane, k);
    broadcast_kth(key, col, kth_lane, kth_slot, kth_key, kth_col);
    pending = pending && lane != src && sae_ranks_before(my_key, my_col, kth_key, kth_col);
  }
}

// Offers every entry j of one row, p[j] + bias[j] for j in [0, cols) (Vec-wide loads, lane l
// reading Vec entries at a time), as the candidate (key_of(value), col0 + j) unless skip(col0 + j).
template <int Vec, typename A, typename K, int R, typename KeyOf, typename Skip>
__device__ __forceinline__ void warp_offer_row(const A* p, const A* bias, int64_t cols, int64_t col0, KeyOf key_of,
                                               Skip skip, K (&key)[R], int32_t (&col)[R], K& kth_key,
                                               int32_t& kth_col, int lane, int k, int kth_lane, int kth_slot) {
  for (int64_t base = 0; base < cols; base += 32 * Vec) {
    const int64_t c = base + lane * Vec;
    Packed<A, Vec> h{}, b{};
    if (c < cols) {
      h = load_packed<Vec>(p + c);
      b = load_packed<Vec>(bias + c);
    }
#pragma unroll
    for (int j = 0; j < Vec; ++j) {
      const K my_key = key_of(A(h.v[j] + b.v[j]));
      const int64_t my_col = col0 + c + j;
      const bool pending =
          c + j < cols && !skip(my_col) && sae_ranks_before(my_key, int32_t(my_col), kth_key, kth_col);
      warp_offer(key, col, kth_key, kth_col, my_key, int32_t(my_col), pending, lane, k, kth_lane, kth_slot);
    }
  }
}

}  // namespace repkern::cuda
