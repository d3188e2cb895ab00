// Activation-sparsity launchers: CPU (cpu/sparsity.cpp) and CUDA (cuda/sparsity.cu, also compiled
// into the emulator). Math and layouts: common/sparsity_math.h.
//
// Input x: [rows, d] in `dtype`, unit column stride, rows `ld` elements apart (any float dtype).
// A = float64 for float64 input, float32 otherwise (the row outputs' and the CUDA partials' type).
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/sparsity_math.h"
#include "cpu/isa.h"

namespace repkern {

// Everything in one call on the CPU: per-feature state and every row output, one read of x (the rows of
// a block are revisited in cache for the central moments and the ordered statistics).
struct SparsityStatsParams {
  DType dtype;
  const void* x;  // [rows, d] dtype, rows ld apart
  int64_t rows, d, ld;
  double eps;
  const double* top_p;  // [num_top_p] fractions in (0, 1]
  int num_top_p;
  bool ordered;
  double* feature_state;  // [kFeatureFields, d]
  void* row_out;          // [row_channels(num_top_p, ordered), rows] A
  int64_t* row_counts;    // [kRowCounts, rows]
};

// state ∪= other: two per-feature states (a batch's into an accumulator's), merge_moments per feature.
struct SparsityMergeStatesParams {
  double* state;        // [kFeatureFields, d]
  const double* other;  // [kFeatureFields, d]
  int64_t d;
};

// Per-row summaries of the row counts and channels (what the accumulator keeps of each batch): per
// summary channel c — the kRowCounts counts first, then the row channels — the float64 sum and count of
// its non-NaN values and, where hist_divisor[c] > 0, the histogram on [0, 1] of value / hist_divisor[c]
// (clamped; torch.histc's binning). The results package's row_summary_parts is the same in torch.
struct SparsityRowSummariesParams {
  DType dtype;                // of row_out: float32 or float64
  const int64_t* row_counts;  // [kRowCounts, rows]
  const void* row_out;        // [channels, rows]
  int64_t channels, rows;
  const double* hist_divisor;  // [kRowCounts + channels]; 0 = no histogram
  int64_t bins;
  double* sums;      // [kRowCounts + channels]
  int64_t* defined;  // [kRowCounts + channels]
  int64_t* hist;     // [kRowCounts + channels, bins]
};

// CUDA, one read of x: per-feature state, row totals (threshold included) and the sort-free row channels.
struct SparsityFeaturesParams {
  DType dtype;
  const void* x;  // [rows, d] dtype, rows ld apart
  int64_t rows, d, ld;
  double eps;
  void* partials;         // [plan.splits, kFeatureFields, d] A, workspace
  double* row_totals;     // [kRowTotals, rows], zero-filled by the caller
  double* feature_state;  // [kFeatureFields, d]
  void* row_out;          // [channels, rows] A; channels >= kRowSortFree
  int64_t* row_counts;    // [kRowCounts, rows]
  int64_t channels;
};

// CUDA, the ordered row channels (kRowGini..) of rows [row_begin, row_end): Gini, thresholded L0,
// effective ranks, top-p masses. Reads x (or `sorted`) and the row totals of sparsity_features (a
// row's finite count is clamped to [0, d]: the kernel never reads past a row).
struct SparsityOrderedParams {
  DType dtype;
  const void* x;       // [rows, d] dtype, rows ld apart
  const void* sorted;  // [row_end − row_begin, d] A, or null (sort in shared memory)
  int64_t rows, d, ld, row_begin, row_end;
  const double* top_p;  // [num_top_p], device memory
  int num_top_p;
  const double* row_totals;  // [kRowTotals, rows]
  double* sums;              // [ordered_sums(num_top_p), rows], workspace
  void* row_out;             // [row_channels(num_top_p, true), rows] A
};

namespace cpu {
REPKERN_CPU_KERNEL(sparsity_stats, SparsityStatsParams)
REPKERN_CPU_KERNEL(sparsity_merge_states, SparsityMergeStatesParams)
REPKERN_CPU_KERNEL(sparsity_row_summaries, SparsityRowSummariesParams)
}  // namespace cpu

namespace cuda {
// Grid of the one-read pass: column strips × row splits (splits sized from the SM count).
struct SparsityPlan {
  int64_t strips = 0, splits = 0;
};
SparsityPlan sparsity_plan(DType dtype, int64_t rows, int64_t d);
// Largest d whose rows the ordered kernel sorts in shared memory; beyond it the caller passes rows
// already sorted (|a| ascending, non-finite as +inf, in A).
int64_t sparsity_max_smem_sort(DType dtype);

void sparsity_features(const SparsityFeaturesParams& p, void* stream);  // stream: cudaStream_t
void sparsity_ordered(const SparsityOrderedParams& p, void* stream);
}  // namespace cuda

}  // namespace repkern
