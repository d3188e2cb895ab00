// Activation-sparsity math shared by the CPU and CUDA kernels (docs/conventions.md).
//
// Layouts crossing the Python boundary (python/repkern/ops/sparsity.py):
//  - feature state [kFeatureFields, d] float64: per feature (column) count of finite values, count fired
//    (|a| > eps), NaN count, mean and central moment sums M2, M3, M4 (Pébay), min, max, Σ|a|, all over
//    the finite values. Partial states merge exactly (up to rounding) in any order: merge_moments.
//  - row outputs [row_channels(P, ordered), rows] in the accumulation type, channels RowField, and the
//    per-row counts [kRowCounts, rows] int64 (RowCount): exact integers from the kernels' accumulators to
//    the Python result (a float32 channel would round l0 above 2^24).
// Non-finite entries are excluded everywhere: per row, n = number of finite entries replaces d.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/macros.h"
#include "common/math.h"

namespace repkern {

enum FeatureField : int { kCount, kFired, kNan, kMean, kM2, kM3, kM4, kMin, kMax, kAbsSum, kFeatureFields };

// Per-row counts ([kRowCounts, rows] int64): L0 = #{finite |a| > eps}, non-finite entries.
enum RowCount : int { kCountL0, kCountNonfinite, kRowCounts };

enum RowField : int {
  kRowL1,
  kRowL2,
  kRowHoyer,
  kRowSortFree,  // channels of the one-read subset
  kRowGini = kRowSortFree,
  kRowThresholdedL0,
  kRowErankL1,
  kRowErankL2,
  kRowTopP,  // then top_p_l1[P], top_p_l2[P]
};
// Per-row totals of the one-read pass ([kRowTotals, rows] float64 on CUDA); the threshold is filled in
// from the others by the sort-free finalize step.
enum RowTotal : int { kTotFinite, kTotL0, kTotL1, kTotL2Sq, kTotThreshold, kRowTotals };
// Per-row sums of the ordered pass ([ordered_sums(P), rows] float64 on CUDA): count above the threshold,
// Σ|a| ln|a|, Σa² ln|a|, Gini sum, then Σ and Σ² of the top-p entries for each p.
enum OrderedSum : int { kSumAbove, kSumALogA, kSumA2LogA, kSumGini, kSumTopP };

// Names of the fields, counts and row channels above, in order (exported to Python by the bindings).
inline constexpr const char* kFeatureFieldNames[kFeatureFields] = {"count", "fired", "nan", "mean", "m2",
                                                                   "m3",    "m4",    "min", "max",  "abs_sum"};
inline constexpr const char* kRowCountNames[kRowCounts] = {"l0", "nonfinite"};
inline constexpr const char* kRowChannelNames[kRowTopP] = {
    "l1", "l2", "hoyer", "gini", "thresholded_l0", "effective_rank_l1", "effective_rank_l2"};

constexpr int kMaxTopP = 8;
// top p = the ceil(p·n − kTopKTolerance) largest |a|: a p·n that is an integer up to rounding (0.07·100) gives it.
constexpr double kTopKTolerance = 1e-9;

RK_HD constexpr int row_channels(int num_top_p, bool ordered) {
  return ordered ? int(kRowTopP) + 2 * num_top_p : int(kRowSortFree);
}
RK_HD constexpr int ordered_sums(int num_top_p) { return int(kSumTopP) + 2 * num_top_p; }

// Finite test without library calls (vectorizes, no device slow path): v − v is 0 only for finite v.
template <typename A>
RK_HD bool is_finite(A v) {
  return v - v == A(0);
}

// Count, mean and central moment sums of a set of values.
template <typename S>
struct Moments {
  S n, mean, m2, m3, m4;
};

// Moments of the union of two disjoint sets (Chan et al. for M2, Pébay 2008 for M3 and M4).
// Branch-free; an empty side leaves the other unchanged.
template <typename S>
RK_HD Moments<S> merge_moments(const Moments<S>& a, const Moments<S>& b) {
  const S n = a.n + b.n;
  const S inv_n = n > S(0) ? S(1) / n : S(0);
  const S delta = b.mean - a.mean;
  const S delta_n = delta * inv_n;
  const S delta_n2 = delta_n * delta_n;
  const S na_nb = a.n * b.n;
  const S term = delta * delta_n * na_nb;  // δ² na nb / n
  Moments<S> out;
  out.n = n;
  out.mean = a.n == S(0) ? b.mean : a.mean + delta_n * b.n;
  out.m2 = a.m2 + b.m2 + term;
  out.m3 = a.m3 + b.m3 + term * delta_n * (a.n - b.n) + S(3) * delta_n * (a.n * b.m2 - b.n * a.m2);
  out.m4 = a.m4 + b.m4 + term * delta_n2 * (a.n * a.n - na_nb + b.n * b.n) +
           S(6) * delta_n2 * (a.n * a.n * b.m2 + b.n * b.n * a.m2) + S(4) * delta_n * (a.n * b.m3 - b.n * a.m3);
  return out;
}

// ---- per-row formulas (n = finite entries, l1 = Σ|a|, l2sq = Σa², all float64) ------------------

RK_HD double nan_value() { return bit_cast_rk<double>(uint64_t(0x7ff8000000000000ull)); }
template <typename A>
RK_HD A inf_value() {
  return A(bit_cast_rk<double>(uint64_t(0x7ff0000000000000ull)));
}
// |v| by clearing the sign bit: one AND per vector, and -0 -> +0 (sort keys are sign-free).
template <typename A>
RK_HD A abs_value(A v) {
  using Bits = std::conditional_t<sizeof(A) == 8, uint64_t, uint32_t>;
  return bit_cast_rk<A>(bit_cast_rk<Bits>(v) & (~Bits(0) >> 1));
}

// Hoyer: (√n − l1/l2)/(√n − 1); NaN for an all-zero row or n <= 1.
RK_HD double hoyer(double n, double l1, double l2sq) {
  const double sqrt_n = sqrt(n);
  return n > 1.0 && l2sq > 0.0 ? (sqrt_n - l1 / sqrt(l2sq)) / (sqrt_n - 1.0) : nan_value();
}

// mean(|a|) + std(|a|), population std: the thresholded-L0 threshold.
RK_HD double abs_threshold(double n, double l1, double l2sq) {
  const double mean = l1 / n;
  const double var = l2sq / n - mean * mean;
  return mean + sqrt(var > 0.0 ? var : 0.0);
}

// Number of largest entries in "top p": ceil(p·n) (1e-9 tolerance), at least 1. n must be a count in
// [0, 2^53] (kernels pass their clamped count_in_range, not a raw total: NaN would not convert).
RK_HD int64_t top_k_count(double p, double n) {
  const double k = ceil(p * n - kTopKTolerance);
  return k < 1.0 ? 1 : int64_t(k);
}

// Gini weight of the i-th smallest (0-based) of n values: Gini = Σ (2i + 1 − n)·a₍ᵢ₎ / (n·Σa).
RK_HD double gini_weight(int64_t i, double n) { return double(2 * i + 1) - n; }

// ln x for finite x > 0 (subnormals included), about 1 ulp; 0 for other input (callers mask it).
// Branch-free and division-free, so that it vectorizes on the CPU and needs no device slow path:
// x = m·2^e, m in [√½, √2), ln m = 2 atanh(f), f = (m − 1)/(m + 1), 1/(m + 1) by Newton steps from a
// linear minimax start (1.5% error; each step squares it).
template <typename S>
struct LogTraits;
template <>
struct LogTraits<float> {
  using Bits = uint32_t;
  static constexpr int kMantBits = 23, kBias = 127, kNewton = 3, kScaleExp = 24;
  static constexpr float kMinNormal = 1.17549435e-38f, kScale = 16777216.0f;
};
template <>
struct LogTraits<double> {
  using Bits = uint64_t;
  static constexpr int kMantBits = 52, kBias = 1023, kNewton = 4, kScaleExp = 54;
  static constexpr double kMinNormal = 2.2250738585072014e-308, kScale = 18014398509481984.0;
};

template <typename S>
RK_HD S log_poly(S x) {
  using L = LogTraits<S>;
  using Bits = typename L::Bits;
  const bool subnormal = x < L::kMinNormal;
  const S xs = subnormal ? x * L::kScale : x;
  const Bits bits = bit_cast_rk<Bits>(xs);
  const Bits mant_mask = (Bits(1) << L::kMantBits) - 1;
  S e = S(int((bits >> L::kMantBits) & Bits(2 * L::kBias + 1)) - L::kBias - (subnormal ? L::kScaleExp : 0));
  S m = bit_cast_rk<S>((bits & mant_mask) | (Bits(L::kBias) << L::kMantBits));  // [1, 2)
  const bool fold = m > S(1.4142135623730951);
  m = fold ? m * S(0.5) : m;
  e = fold ? e + S(1) : e;
  const S q = m + S(1);  // [1.707, 2.414]
  S r = S(0.5783721531) - S(0.2426406871) * (q - S(1.7071067812));
  for (int it = 0; it < L::kNewton; ++it) r = r * (S(2) - q * r);  // constant trip count: unrolled
  const S f = (m - S(1)) * r;
  const S s = f * f;
  S poly;
  if constexpr (sizeof(S) == 8) {
    poly = S(1.0 / 21);
    poly = poly * s + S(1.0 / 19);
    poly = poly * s + S(1.0 / 17);
    poly = poly * s + S(1.0 / 15);
    poly = poly * s + S(1.0 / 13);
    poly = poly * s + S(1.0 / 11);
    poly = poly * s + S(1.0 / 9);
  } else {
    poly = S(1.0 / 9);
  }
  poly = poly * s + S(1.0 / 7);
  poly = poly * s + S(1.0 / 5);
  poly = poly * s + S(1.0 / 3);
  poly = poly * s + S(1);
  const S ln2_hi = S(0.693145751953125), ln2_lo = S(1.42860682030941723212e-6);
  const S y = e * ln2_hi + (e * ln2_lo + S(2) * f * poly);
  return x > S(0) ? y : S(0);
}

// exp of the entropy of p_i = w_i / Σw, from Σw and Σ w_i ln w_i: H = ln Σw − Σ w ln w / Σw.
// NaN when Σw = 0 (an all-zero row).
RK_HD double effective_rank(double total, double sum_w_log_w) {
  return total > 0.0 ? exp_poly(log_poly(total) - sum_w_log_w / total) : nan_value();
}

// A count the caller holds in a float64 (exact below 2^53) as an int64 in [0, limit]; NaN gives 0. Kernels
// that loop over a row by such a count never run past the row, whatever the count says.
RK_HD int64_t count_in_range(double count, int64_t limit) {
  if (!(count >= 0.0)) return 0;  // negative or NaN
  const int64_t c = count < 0x1p53 ? int64_t(count) : limit;  // a constant bound: no int64 -> double conversion
  return c < limit ? c : limit;
}

// Sort-free channels and the counts of row r from its totals (n finite entries out of d, l0, l1 = Σ|a|,
// l2sq = Σa²).
template <typename A>
RK_HD void write_sort_free_row(A* out,            // [channels, rows]
                               int64_t* counts,   // [kRowCounts, rows]
                               int64_t rows, int64_t r, int64_t d, int64_t n, int64_t l0, double l1, double l2sq) {
  counts[kCountL0 * rows + r] = l0;
  counts[kCountNonfinite * rows + r] = d - n;
  out[kRowL1 * rows + r] = A(l1);
  out[kRowL2 * rows + r] = A(sqrt(l2sq));
  out[kRowHoyer * rows + r] = A(hoyer(double(n), l1, l2sq));
}

// Ordered channels of row r except top-p, from the sums over its finite entries: `above` = #{|a| >
// abs_threshold}, Σ|a| ln|a|, Σa² ln|a|, and Σ gini_weight(i)·a₍ᵢ₎ over |a| ascending.
template <typename A>
RK_HD void write_ordered_row(A* out,  // [channels, rows]
                             int64_t rows, int64_t r, double n, double l1, double l2sq, double above,
                             double sum_a_log_a, double sum_a2_log_a, double gini_sum) {
  out[kRowGini * rows + r] = A(l1 > 0.0 ? gini_sum / (n * l1) : nan_value());
  out[kRowThresholdedL0 * rows + r] = A(n > 0.0 ? above / n : nan_value());
  out[kRowErankL1 * rows + r] = A(effective_rank(l1, sum_a_log_a));
  out[kRowErankL2 * rows + r] = A(effective_rank(l2sq, 2.0 * sum_a2_log_a));  // Σ a² ln a² = 2 Σ a² ln|a|
}

// Top-p masses of row r for the p-th fraction: Σ and Σ² of its top_k_count largest |a|.
template <typename A>
RK_HD void write_top_p(A* out,  // [channels, rows]
                       int64_t rows, int64_t r, int p, int num_top_p, double l1, double l2sq, double top_sum,
                       double top_sum_sq) {
  const bool defined = l1 > 0.0;
  out[(kRowTopP + p) * rows + r] = A(defined ? top_sum / l1 : nan_value());
  out[(kRowTopP + num_top_p + p) * rows + r] = A(defined ? top_sum_sq / l2sq : nan_value());
}

}  // namespace repkern
