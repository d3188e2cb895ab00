// Running top-k of one row, shared by the CPU top-k merges (sae_topk_merge, knn_topk_merge):
// keys and columns sorted by rank (common/sae_math.h: larger key first, equal keys lower
// column first), `size` slots filled. Compiled into each instruction-set level's namespace.
#pragma once

#include <cstdint>
#include <vector>

#include "common/sae_math.h"

namespace repkern::cpu::REPKERN_ISA_NS {

template <typename A>
struct RowTopK {
  using K = sae_key_t<A>;
  std::vector<K> keys;
  std::vector<int32_t> cols;
  int size = 0;

  explicit RowTopK(int k) : keys(size_t(k)), cols(size_t(k)) {}

  bool full() const { return size == int(keys.size()); }
  // Rank of the last kept entry: a candidate must rank before it.
  bool admits(K key, int32_t col) const {
    return !full() || sae_ranks_before(key, col, keys[size_t(size - 1)], cols[size_t(size - 1)]);
  }
  void insert(K key, int32_t col) {
    int i = full() ? size - 1 : size++;
    while (i > 0 && sae_ranks_before(key, col, keys[size_t(i - 1)], cols[size_t(i - 1)])) {
      keys[size_t(i)] = keys[size_t(i - 1)];
      cols[size_t(i)] = cols[size_t(i - 1)];
      --i;
    }
    keys[size_t(i)] = key;
    cols[size_t(i)] = col;
  }
};

}  // namespace repkern::cpu::REPKERN_ISA_NS
