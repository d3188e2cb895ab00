// SAE encoding math shared by the CPU and CUDA kernels (docs/conventions.md).
//
// Activation of a pre-activation h with threshold θ >= 0 (θ = 0: ReLU):
//   a(h) = h if h > θ (strict), NaN if h is NaN, else 0.
// Top-k ranking: entries are ordered by an unsigned key that is monotone in the
// value, with NaN above +inf and -0 equal to +0; equal keys rank the lower
// column first (deterministic tie-breaking). Key 0 is never produced by a value
// and marks an empty slot.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/dispatch.h"
#include "common/macros.h"
#include "common/math.h"

namespace repkern {

template <typename A>
RK_HD A sae_activation(A h, float theta) {
  return h > A(theta) ? h : (h != h ? h : A(0));
}

template <typename A>
using sae_key_t = std::conditional_t<sizeof(A) == 4, uint32_t, uint64_t>;

template <typename A>
RK_HD sae_key_t<A> sae_order_key(A v) {
  using K = sae_key_t<A>;
  constexpr K sign = K(1) << (8 * sizeof(K) - 1);
  const K u = v != v ? K(~sign) : (v == A(0) ? K(0) : bit_cast_rk<K>(v));
  return (u & sign) ? K(~u) : K(u | sign);
}

template <typename A>
RK_HD A sae_key_value(sae_key_t<A> key) {
  using K = sae_key_t<A>;
  constexpr K sign = K(1) << (8 * sizeof(K) - 1);
  return bit_cast_rk<A>((key & sign) ? K(key & ~sign) : K(~key));
}

// Entry (ka, ia) ranks before (kb, ib): larger key, or equal key and lower column.
template <typename K>
RK_HD bool sae_ranks_before(K ka, int32_t ia, K kb, int32_t ib) {
  return ka > kb || (ka == kb && ia < ib);
}

constexpr int32_t kSaeEmptyIndex = 0x7fffffff;  // column of an empty slot (key 0)
constexpr int kSaeMaxTopK = 256;                 // largest k of the native top-k merge

}  // namespace repkern
