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

}  // namespace repkern::cuda
