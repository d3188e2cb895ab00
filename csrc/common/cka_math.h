// HSIC terms of Gram blocks, shared by the CPU and CUDA kernels (docs/conventions.md).
//
// A call covers one block of m symmetric n×n matrices K_a: rows [r0, r0 + rows) ×
// cols [c0, c0 + cols). Entries come from inner products (or squared distances)
// through the Gram epilogue math (gram_math.h), so no Gram is ever written.
//   diagonal block (r0 == c0, rows == cols): only its upper triangle and diagonal
//     are read; an entry above the diagonal stands for itself and its mirror
//     (weight 2 in the products, its column sum is a row sum of the mirror);
//   off-diagonal block: read whole, every entry weight 2 (it stands for its mirror).
// So the lower triangle of a diagonal block is never read (the untiled path leaves
// it unwritten) and the result is a function of the upper triangle whatever the
// kernel's tile size.
// Terms, accumulated in float64 (the estimators cancel terms):
//   cross[p]     += Σ_ij K_a,ij K_b,ij     for each requested pair p = (a, b)
//   row_sums[a,i] += Σ_j K_a,ij
//   diag[a,i]     = K_a,ii
// Everything else both estimators need (totals, Σ diag(K)·diag(L), row sums with
// the diagonal removed) is O(n) from these, done by the caller in float64.
#pragma once

#include "common/gram_math.h"

namespace repkern {

// Kinds the HSIC kernels accept: Gram kinds that yield a kernel value (SqDist only feeds the median).
RK_HD constexpr bool hsic_kind_supported(GramKind k) { return k != GramKind::SqDist; }

// K_ii. Distances to itself are 0 by definition: a tiled caller computes aux_i =
// ‖x_i‖² apart from the GEMM's g_ii, so 2·aux_i − 2·g_ii is rounding, not distance.
// NaN in row i stays NaN.
template <GramKind K, typename A>
RK_HD A hsic_diag_entry(A g_ii, A aux_i, A scale) {
  if constexpr (K == GramKind::Rbf) {
    const A probe = g_ii + aux_i;  // NaN if either is
    return probe == probe ? A(1) : probe;
  } else {
    return gram_diag<K>(g_ii, aux_i, scale);
  }
}

// Entry (i, j) of a block; `on_diagonal`: i == j in the whole matrix.
template <GramKind K, typename A>
RK_HD A hsic_entry(A g, A aux_i, A aux_j, A scale, bool on_diagonal) {
  return on_diagonal ? hsic_diag_entry<K>(g, aux_i, scale) : gram_entry<K>(g, aux_i, aux_j, scale);
}

// Host-side: calls f.template operator()<K, A>() for the runtime kind and accumulation type.
template <typename F>
void dispatch_hsic(GramKind kind, DType acc_dtype, F&& f) {
  switch_value<GramKind, GramKind::Linear, GramKind::Cosine, GramKind::Rbf, GramKind::RbfFromSqDist>(
      kind, "hsic_terms kind", [&](auto kind_c) {
        constexpr GramKind K = decltype(kind_c)::value;
        switch_acc(acc_dtype, "hsic_terms blocks",
                   [&](auto acc_t) { f.template operator()<K, typename decltype(acc_t)::type>(); });
      });
}

}  // namespace repkern
