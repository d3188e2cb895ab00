// Compile-time switches: turn a runtime value into a template argument once,
// at the launcher, instead of copy-pasting a switch per kernel.
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/dtype.h"

namespace repkern {

// Calls f(std::integral_constant<T, V>{}) for the V in Vs equal to `value`.
template <typename T, T... Vs, typename F>
void switch_value(T value, const char* what, F&& f) {
  const bool found = ((value == Vs ? (f(std::integral_constant<T, Vs>{}), true) : false) || ...);
  if (!found) throw std::invalid_argument(std::string(what) + ": unsupported value");
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) for the C++ type of a floating dtype.
template <typename F>
void switch_dtype(DType dtype, const char* what, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(TypeTag<float>{});
    case DType::Float64: return f(TypeTag<double>{});
    case DType::Float16: return f(TypeTag<Half>{});
    case DType::BFloat16: return f(TypeTag<BFloat16>{});
    default: break;
  }
  throw std::invalid_argument(std::string(what) + ": unsupported dtype code");
}

// The accumulation rule, in one place: kernels accumulate in float32 or float64, and float64
// accumulation goes with float64 data only (float32 with float32, float16 or bfloat16 data).
inline DType accumulation_dtype(DType data) { return data == DType::Float64 ? DType::Float64 : DType::Float32; }

// Calls f(TypeTag<A>{}) for an accumulation dtype `acc` (float32 or float64).
template <typename F>
void switch_acc(DType acc, const char* what, F&& f) {
  if (acc == DType::Float32) return f(TypeTag<float>{});
  if (acc == DType::Float64) return f(TypeTag<double>{});
  throw std::invalid_argument(std::string(what) + ": must be float32 or float64 (an accumulation dtype)");
}

// Calls f.template operator()<A, T>() for an accumulation dtype and a data dtype that goes with it:
// (float64, float64) or (float32, float32 | float16 | bfloat16).
template <typename F>
void switch_acc_data(DType acc, DType data, const char* what, F&& f) {
  switch_acc(acc, what, [&](auto acc_t) {
    using A = typename decltype(acc_t)::type;
    if (accumulation_dtype(data) != acc)
      throw std::invalid_argument(std::string(what) + ": float64 accumulation goes with float64 data only");
    switch_dtype(data, what, [&](auto data_t) {
      using T = typename decltype(data_t)::type;
      if constexpr (std::is_same_v<A, double> == std::is_same_v<T, double>) f.template operator()<A, T>();
    });
  });
}

}  // namespace repkern
