// Enumeration of the upper tile pairs (ti <= tj) of a square matrix of `tiles`
// tiles per edge, one pair per block index: shared by every kernel that reads
// only the upper triangle of a symmetric matrix.
#pragma once

#include "common/macros.h"

namespace repkern::cuda {

// Block p -> unordered tile pair {a, a + k mod T}, k = 0..T/2: every pair once
// (for even T the pairs with k = T/2 come up twice; the second is skipped).
// Integer-only: a sqrt-based triangle inverse costs a slow-path call and spills.
__host__ __device__ __forceinline__ unsigned tile_pairs_per_row(unsigned tiles) { return tiles / 2 + 1; }

__device__ __forceinline__ bool tile_pair(unsigned p, unsigned tiles, unsigned& ti, unsigned& tj) {
  const unsigned per_row = tile_pairs_per_row(tiles);
  const unsigned a = p / per_row, k = p % per_row;
  if (2 * k == tiles && a >= tiles / 2) return false;
  unsigned b = a + k;
  if (b >= tiles) b -= tiles;
  ti = a < b ? a : b;
  tj = a < b ? b : a;
  return true;
}

}  // namespace repkern::cuda
