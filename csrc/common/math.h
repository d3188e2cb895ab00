// Scalar math overloaded on float/double, callable from host and device.
//
// exp: the device's expf for float; everywhere else a branch-free polynomial
// (vectorizes in CPU loops, and on the device it avoids the out-of-line slow
// path of CUDA's exp(double), whose call makes ptxas spill).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/macros.h"

namespace repkern {

template <typename To, typename From>
RK_HD To bit_cast_rk(From v) {
  static_assert(sizeof(To) == sizeof(From), "size mismatch");
  To out;
  memcpy(&out, &v, sizeof(To));
  return out;
}

// Cephes expf: ~1 ulp on [-87.3, 88.7]; below -87.3 returns 0 (no subnormals).
RK_HD float exp_poly(float x) {
  const float lo = -87.33654f, hi = 88.72283f;
  const float xs = x == x ? (x < lo ? lo : (x > hi ? hi : x)) : 0.0f;  // NaN: handled at the end
  const float kf = (xs * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x/ln2), 1.5·2^23 trick
  float r = xs - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * (r * r) + r + 1.0f;
  // 2^k as two normal factors so that k = 128 does not overflow the exponent field.
  const int32_t k = int32_t(kf);
  const int32_t k1 = k >> 1, k2 = k - k1;
  const float y = e * bit_cast_rk<float>(uint32_t(k1 + 127) << 23) * bit_cast_rk<float>(uint32_t(k2 + 127) << 23);
  return x != x ? x : (x < lo ? 0.0f : (x > hi ? HUGE_VALF : y));
}

// exp for double: Cody–Waite reduction, Taylor polynomial to r^13 (|r| <= ln2/2:
// truncation < 2e-18 relative), ~1 ulp; subnormal results via two scale factors.
RK_HD double exp_poly(double x) {
  const double lo = -745.2, hi = 709.78;
  const double xs = x == x ? (x < lo ? lo : (x > hi ? hi : x)) : 0.0;
  const double kf = (xs * 1.4426950408889634 + 6755399441055744.0) - 6755399441055744.0;  // 1.5·2^52 trick
  double r = xs - kf * 6.93147180369123816490e-01;  // ln2 high part: k·ln2_hi is exact
  r = r - kf * 1.90821492927058770002e-10;
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const int64_t k = int64_t(kf);
  const int64_t k1 = k >> 1, k2 = k - k1;
  const double y =
      p * bit_cast_rk<double>(uint64_t(k1 + 1023) << 52) * bit_cast_rk<double>(uint64_t(k2 + 1023) << 52);
  return x != x ? x : (x < lo ? 0.0 : (x > hi ? HUGE_VAL : y));
}

RK_HD float rk_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return exp_poly(x);
#endif
}
RK_HD double rk_exp(double x) { return exp_poly(x); }

template <typename T>
RK_HD T rk_min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
RK_HD T rk_max(T a, T b) {
  return a < b ? b : a;
}

}  // namespace repkern
