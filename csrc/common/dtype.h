// Scalar types crossing the Python boundary, 16-bit float storage types that
// need no CUDA headers, conversions, and compile-time dtype dispatch.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/macros.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace repkern {

// Codes of the tensor views; exported to Python as repkern._C.DTYPE_CODES.
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3, Int32 = 4, Int64 = 5 };
constexpr int kNumDTypes = 6;

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

RK_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}
RK_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

RK_HD float half_to_float(Half h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h.bits));
#else
  // Integer masks instead of branches or selects: gcc vectorizes CPU loops over half data only in this form.
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t magnitude = h.bits & 0x7fffu;  // exponent and mantissa
  // Normal: rebias the exponent by 127 − 15; Inf/NaN (all-ones exponent): by 2·(127 − 15).
  const uint32_t rebiased = (magnitude << 13) + 0x38000000u + uint32_t(magnitude >= 0x7c00u) * 0x38000000u;
  const uint32_t subnormal = float_bits(float(int32_t(magnitude)) * 5.9604644775390625e-8f);  // mant · 2^-24
  const uint32_t is_subnormal = 0u - uint32_t(magnitude < 0x400u);  // all ones for zero/subnormal
  return bits_float((subnormal & is_subnormal) | (rebiased & ~is_subnormal) | sign);
#endif
}

// Round to nearest even, overflow to infinity, NaN stays NaN.
RK_HD Half float_to_half(float f) {
#if defined(__CUDA_ARCH__)
  return Half{__half_as_ushort(__float2half_rn(f))};
#else
  uint32_t u = float_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t o;
  if (u >= 0x47800000u) {  // |f| >= 65536 (or inf/nan)
    o = u > 0x7f800000u ? 0x7e00 : 0x7c00;
  } else if (u < 0x38800000u) {  // result is subnormal or zero: align mantissa with a magic add
    const float magic = bits_float(0x3f000000u);  // 0.5 = 2^-1: ulp(0.5f) = 2^-24 = half subnormal step
    o = uint16_t(float_bits(bits_float(u) + magic) - 0x3f000000u);
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += (uint32_t(15 - 127) << 23) + 0xfffu + mant_odd;
    o = uint16_t(u >> 13);
  }
  return Half{uint16_t(o | (sign >> 16))};
#endif
}

RK_HD float bfloat16_to_float(BFloat16 b) { return bits_float(uint32_t(b.bits) << 16); }

RK_HD BFloat16 float_to_bfloat16(float f) {
#if defined(__CUDA_ARCH__)
  return BFloat16{__bfloat16_as_ushort(__float2bfloat16_rn(f))};
#else
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  return BFloat16{uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
#endif
}

// Accumulation type: float for 16/32-bit inputs, double for double.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

RK_HD float to_acc(float v) { return v; }
RK_HD double to_acc(double v) { return v; }
RK_HD float to_acc(Half v) { return half_to_float(v); }
RK_HD float to_acc(BFloat16 v) { return bfloat16_to_float(v); }

template <typename T>
struct Store;
template <>
struct Store<float> {
  static RK_HD float from(float v) { return v; }
};
template <>
struct Store<double> {
  static RK_HD double from(double v) { return v; }
};
template <>
struct Store<Half> {
  static RK_HD Half from(float v) { return float_to_half(v); }
};
template <>
struct Store<BFloat16> {
  static RK_HD BFloat16 from(float v) { return float_to_bfloat16(v); }
};
// Converts an accumulator value to the storage type T.
template <typename T, typename A>
RK_HD T from_acc(A v) {
  return Store<T>::from(v);
}

}  // namespace repkern
