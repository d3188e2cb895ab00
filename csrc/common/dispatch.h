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

}  // namespace repkern
