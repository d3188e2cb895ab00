// A tensor as the native core sees it: a pointer, sizes, strides (elements),
// and a dtype code. Built by the bindings from what Python passes.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/dtype.h"

namespace repkern {

struct TensorView {
  void* data = nullptr;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
  DType dtype = DType::Float32;
  std::string name;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : sizes) n *= s;
    return n;
  }
  bool is_contiguous() const {
    if (numel() == 0) return true;
    int64_t expected = 1;
    for (size_t i = sizes.size(); i-- > 0;) {
      if (sizes[i] != 1 && strides[i] != expected) return false;
      expected *= sizes[i];
    }
    return true;
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data);
  }

  // Checks used by the bindings: a misuse from Python becomes an error, not a crash.
  const TensorView& expect(DType want, const std::vector<int64_t>& want_sizes) const {
    if (dtype != want) throw std::invalid_argument(name + ": unexpected dtype code " + std::to_string(int(dtype)));
    if (sizes != want_sizes) throw std::invalid_argument(name + ": unexpected shape");
    if (!is_contiguous()) throw std::invalid_argument(name + ": must be contiguous");
    return *this;
  }
};

}  // namespace repkern
