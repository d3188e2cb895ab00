// kNN ranking shared by the CPU and CUDA kernels (knn.h).
//
// A candidate's score s is a similarity (ip, cosine) or, for euclidean, the
// selection score x̃_i·x̃_j − ½‖x̃_j‖² (= ½(‖x̃_i‖² − ‖x̃_i − x̃_j‖²): larger is nearer).
// Order: larger score first, NaN after every number (below −inf), −0 equal to +0;
// equal scores: lower candidate index first. The key of a number is the SAE
// top-k key (common/sae_math.h); NaN gets key 1 instead of the largest key, which
// no number produces; key 0 marks an empty slot (index −1 in the stored state).
#pragma once

#include <cstdint>

#include "common/macros.h"
#include "common/sae_math.h"

namespace repkern {

template <typename A>
RK_HD sae_key_t<A> knn_order_key(A s) {
  return s != s ? sae_key_t<A>(1) : sae_order_key(s);
}

// A stored state slot (value, index; index −1: empty) as a key.
template <typename A>
RK_HD sae_key_t<A> knn_slot_key(A value, int64_t index) {
  return index < 0 ? sae_key_t<A>(0) : knn_order_key(value);
}

constexpr int kKnnMaxK = kSaeMaxTopK;             // largest k of the native merge
constexpr int64_t kKnnMaxRows = kSaeEmptyIndex;  // indices are kept as int32 below the empty-slot index

}  // namespace repkern
