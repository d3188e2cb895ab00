// Per-replicate row sums of the cka_test kernels (permutation null, bootstrap), shared
// by the CPU and CUDA kernels (docs/conventions.md; the estimators are finished in float64 by
// python/repkern/ops/cka_test.py).
//
// Replicate r, row i of two symmetric n×n matrices A, B:
//   Permute   (π_r a permutation):     out[r,i,0] = P_ii + 2 · Σ_{j>i} P_ij,  P_ij = A_ij · B_{π_r(i) π_r(j)}
//             P is symmetric, so these upper-triangle shares add up to Σ_ij P_ij over i (half the
//             products of full rows). With A, B centered (HKH, HLH) or U-centered, that total is the
//             HSIC numerator of K and the permuted L (centering commutes with permutations, and
//             ⟨HKH, HLH⟩ = ⟨HKH, L⟩), without a permuted copy of L.
//   Bootstrap (w_r multinomial counts, Σ w = n: w_j copies of sample j in the resample):
//             out[r,i,·] = Σ_j w_j · (A_ij B_ij, A_ij², B_ij², A_ij, B_ij)
//             from which the weighted sums Σ_i w_i out[r,i,·] give every term of the biased
//             and unbiased HSIC of the resampled data (duplicates included).
// Products of float32 values are exact in float64; sums are float64.
#pragma once

#include "common/dispatch.h"
#include "common/dtype.h"
#include "common/macros.h"

namespace repkern {

enum class ReplicateMode : int { Permute = 0, Bootstrap = 1 };

RK_HD constexpr int replicate_channels(ReplicateMode m) { return m == ReplicateMode::Permute ? 1 : 5; }

// Channel sums s0..s4 += the terms of entry (a = A_ij, b = B at the replicate's position,
// w = weight of column j). Permute only uses s0 (the compiler drops the others). Scalars,
// not an array, so CPU loops vectorize them as reductions and CUDA keeps them in registers.
template <ReplicateMode M>
RK_HD void replicate_add(double& s0, double& s1, double& s2, double& s3, double& s4, double a, double b, double w) {
  if constexpr (M == ReplicateMode::Permute) {
    s0 += a * b;
  } else {
    const double wa = w * a, wb = w * b;
    s0 += wa * b;
    s1 += wa * a;
    s2 += wb * b;
    s3 += wa;
    s4 += wb;
  }
}

// Host-side: calls f.template operator()<M, T>() for the runtime mode and matrix dtype.
template <typename F>
void dispatch_replicate(ReplicateMode mode, DType dtype, F&& f) {
  switch_value<ReplicateMode, ReplicateMode::Permute, ReplicateMode::Bootstrap>(
      mode, "replicate_rows mode", [&](auto mode_c) {
        constexpr ReplicateMode M = decltype(mode_c)::value;
        switch_acc(dtype, "replicate_rows matrices", [&](auto acc_t) {
          f.template operator()<M, typename decltype(acc_t)::type>();
        });
      });
}

}  // namespace repkern
