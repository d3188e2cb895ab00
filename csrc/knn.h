// kNN top-k merge launchers: CPU (cpu/knn.cpp) and CUDA (cuda/knn.cu, also compiled into
// the emulator). Same contract; ranking in common/knn_math.h.
//
// The caller computes the scores of row block I against row block J as one tile
// (torch.matmul) and merges it into the running top-k of BOTH blocks: row r of the tile
// holds the scores of row row0 + r against rows col0 .. col0 + cols − 1, and, read as a
// column, tile[:, c] holds the scores of row col0 + c against rows row0 .. (the scores are
// symmetric up to the per-candidate bias). So a symmetric similarity needs only the tiles
// with I <= J. The pair (i, i) is never a candidate (self exclusion).
//   rows' merge:    score of candidate col0 + c for row row0 + r = tile[r, c] + col_bias[c]
//   columns' merge: score of candidate row0 + r for row col0 + c = tile[r, c] + row_bias[r]
// State: each row's k best (value, index) sorted by rank, index −1 for an empty slot
// (values of empty slots are ignored). Candidates must reach a row at most once.
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "cpu/isa.h"

namespace repkern {

// A: the accumulation dtype, float32 (or float64 for float64 data).
struct KnnTopkMergeParams {
  DType acc_dtype;
  const void* tile;      // [rows, cols] A, contiguous
  const void* col_bias;  // [cols] A: per candidate of the rows' merge
  const void* row_bias;  // [rows] A: per candidate of the columns' merge (with col_vals)
  void* row_vals;        // [rows, k] A, running top-k of rows row0 .. row0 + rows − 1 (in/out)
  int64_t* row_idx;      // [rows, k] their indices (−1: empty)
  void* col_vals;        // [cols, k] A, running top-k of rows col0 .., or null (no columns' merge)
  int64_t* col_idx;      // [cols, k] their indices, or null
  int64_t rows, cols, row0, col0;
  int k;
};

namespace cpu {
REPKERN_CPU_KERNEL(knn_topk_merge, KnnTopkMergeParams)
}  // namespace cpu
namespace cuda {
void knn_topk_merge(const KnnTopkMergeParams& p, void* stream);  // stream: cudaStream_t
}  // namespace cuda

}  // namespace repkern
