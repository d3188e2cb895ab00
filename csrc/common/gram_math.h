// Gram-matrix entries from inner products, shared by the CPU and CUDA kernels.
//
// Input: g_ij = x_i·x_j (the GEMM output). Kinds (docs/conventions.md):
//   Linear  k = g_ij
//   SqDist  k = ‖x_i − x_j‖² = g_ii + g_jj − 2 g_ij, clamped at 0
//   Rbf     k = exp(scale · SqDist), scale = −1/(2σ²); scale = −inf (σ = 0) gives
//           the σ → 0 limit: 1 where the distance is 0, else 0
//   Cosine  k = g_ij / (‖x_i‖ ‖x_j‖); rows with zero norm give 0, the diagonal
//           of a nonzero row is exactly 1
//   RbfFromSqDist  the input already holds SqDist (median path): k = exp(scale · g_ij)
// (Linear, RbfFromSqDist need no aux; SqDist/Rbf: aux_i = g_ii; Cosine: aux_i = 1/‖x_i‖.)
// NaN anywhere in x_i propagates to row and column i.
//
// Median bandwidth (median_select, CPU): order statistics of the strict upper triangle of the squared
// distances by a radix select, kGramSelectBits bits per pass from the top, on the SAE top-k key
// (sae_order_key: monotone in the value, every NaN one key above +inf, as torch sorts, −0 equal to +0).
#pragma once

#include <stdexcept>
#include <type_traits>

#include "common/dispatch.h"
#include "common/macros.h"
#include "common/math.h"
#include "common/sae_math.h"

namespace repkern {

enum class GramKind : int { Linear = 0, Cosine = 1, Rbf = 2, SqDist = 3, RbfFromSqDist = 4 };
// Write: K. RowSums: accumulate Σ_j K_ij (no write). WriteCentered: HKH from the row sums.
enum class GramPass : int { Write = 0, RowSums = 1, WriteCentered = 2 };

// Whether the kind reads a per-row factor (aux).
RK_HD constexpr bool gram_needs_aux(GramKind k) {
  return k == GramKind::Cosine || k == GramKind::Rbf || k == GramKind::SqDist;
}

// Per-row factor every entry of row i needs, computed by the caller (torch) from
// the diagonal g_ii: g_ii itself for distances, 1/‖x_i‖ for cosine (0 for a zero
// row, so that its entries come out 0 without a division).
template <GramKind K, typename A>
RK_HD A gram_entry(A g_ij, A aux_i, A aux_j, A scale) {
  if constexpr (K == GramKind::Linear) {
    return g_ij;
  } else if constexpr (K == GramKind::Cosine) {
    return g_ij * aux_i * aux_j;
  } else if constexpr (K == GramKind::RbfFromSqDist) {
    return g_ij == A(0) ? A(1) : rk_exp(scale * g_ij);
  } else {
    A d = aux_i + aux_j - A(2) * g_ij;
    d = d < A(0) ? A(0) : d;  // rounding; NaN compares false and stays
    if constexpr (K == GramKind::SqDist) {
      return d;
    } else {
      return d == A(0) ? A(1) : rk_exp(scale * d);
    }
  }
}

// Diagonal entry: exact 0 distance / exact cosine 1 (the GEMM's g_ii is reused).
template <GramKind K, typename A>
RK_HD A gram_diag(A g_ii, A aux_i, A scale) {
  if constexpr (K == GramKind::Cosine) {
    return g_ii > A(0) ? A(1) : (g_ii == A(0) ? A(0) : g_ii);
  } else {
    return gram_entry<K>(g_ii, aux_i, aux_i, scale);
  }
}

// (HKH)_ij = K_ij − mean_i − mean_j + mean_all, with K symmetric.
template <typename A>
RK_HD A gram_center(A k, A mean_i, A mean_j, A mean_all) {
  return k - mean_i - mean_j + mean_all;
}

constexpr int kGramSelectBits = 11;        // digit width of one radix-select pass
constexpr int kMedianSelectMaxRanks = 2;  // the two middle ranks of an even count

// Host-side: calls f.template operator()<K, P, Acc, Out>() for the runtime
// arguments, rejecting combinations no caller needs: Linear is centered through
// x (exact and cheaper) and SqDist only feeds the median bandwidth.
template <typename F>
void dispatch_gram(GramKind kind, GramPass pass, DType acc_dtype, DType out_dtype, F&& f) {
  switch_value<GramKind, GramKind::Linear, GramKind::Cosine, GramKind::Rbf, GramKind::SqDist,
               GramKind::RbfFromSqDist>(
      kind, "gram_epilogue kind", [&](auto kind_c) {
        constexpr GramKind K = decltype(kind_c)::value;
        switch_value<GramPass, GramPass::Write, GramPass::RowSums, GramPass::WriteCentered>(
            pass, "gram_epilogue pass", [&](auto pass_c) {
              constexpr GramPass P = decltype(pass_c)::value;
              if constexpr ((K == GramKind::Linear || K == GramKind::SqDist) && P != GramPass::Write) {
                throw std::invalid_argument("gram_epilogue: this kind has only the Write pass");
              } else if constexpr (P == GramPass::RowSums) {  // writes no output: one instantiation per acc type
                switch_acc(acc_dtype, "gram_epilogue", [&](auto acc_t) {
                  using A = typename decltype(acc_t)::type;
                  f.template operator()<K, P, A, A>();
                });
              } else {
                switch_acc_data(acc_dtype, out_dtype, "gram_epilogue",
                                [&]<typename A, typename Out>() { f.template operator()<K, P, A, Out>(); });
              }
            });
      });
}

}  // namespace repkern
