// CPU activation-sparsity statistics: one read of x from memory.
//
// Rows are split into one contiguous part per thread (per-part float64 feature states, merged in part
// order at the end: the result depends only on the thread count). A part is walked in blocks of 16 to
// 256 rows, each block in column tiles small enough that the tile's per-feature accumulators stay in L1
// and the tile itself in L2 (with `ordered`, the block's whole rows):
//   pass A (from memory, rows 16 ahead prefetched from inside the arithmetic): per-feature
//           count/sum/min/max/Σ|a|/fired/NaN of the tile and per-row partial n, L0, Σ|a|, Σa², in A
//           (the tile's counts are exact in A: at most tile_cols per row, kMaxBlockRows per column; the
//           rows' counts add up across tiles in int64, the per-feature ones in the float64 state);
//           first without NaN/Inf masks, four rows per step in SIMD vectors (the column
//           accumulators are loaded and stored once per step), redone row by row with masks if the tile
//           has any;
//   pass B (from cache, four rows per step): central sums Σδ², Σδ³, Σδ⁴ around the tile's column means,
//           then a Pébay merge of the tile into the part's float64 state.
// With `ordered`, each row of the block is then revisited (from L2): sortable keys of |a|, the zeros set
// aside (they sort first and add nothing), an LSD radix sort of the rest (8-bit digits; digit passes
// where every key agrees are skipped: 16-bit inputs sort in two passes), then float64 row sums, Gini,
// entropies, the threshold count (binary search) and top-p masses from the sorted values.
#include "sparsity.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>  // the f16 -> f32 vector conversion
#endif

#include "common/dispatch.h"
#include "common/parallel.h"

namespace repkern::cpu::REPKERN_ISA_NS {
namespace {

constexpr int64_t kMaxBlockRows = 256, kMinBlockRows = 16;
constexpr int64_t kOrderedBlockBytes = 1 << 20;  // whole rows of a block stay in L2 until the ordered pass
constexpr int64_t kTileBytes = 512 << 10;        // a tile of x stays in L2 between passes A and B
constexpr int64_t kTileAccBytes = 20 << 10;      // per-feature tile accumulators kept in L1
constexpr int kStepRows = 4;                     // rows per step of the register-blocked passes
constexpr int64_t kPrefetchRows = 16;            // look-ahead of pass A's in-loop prefetches
constexpr int64_t kMinRowsPerPart = 64;

template <typename A>
using KeyOf = std::conditional_t<sizeof(A) == 8, uint64_t, uint32_t>;

// Sortable bits of |a| for finite a (monotone for non-negative floats); non-finite entries sort last.
template <typename A>
inline KeyOf<A> sort_key(A magnitude, bool finite) {
  return finite ? bit_cast_rk<KeyOf<A>>(magnitude) : std::numeric_limits<KeyOf<A>>::max();
}

// LSD radix sort, 8-bit digits; digits shared by all keys are skipped. Result in `keys`.
template <typename K>
void radix_sort(K* keys, K* tmp, int64_t n) {
  constexpr int kPasses = int(sizeof(K));
  uint32_t hist[kPasses * 256] = {};
  for (int64_t i = 0; i < n; ++i) {
    const K k = keys[i];
    for (int p = 0; p < kPasses; ++p) ++hist[p * 256 + int((k >> (8 * p)) & 0xff)];
  }
  K* src = keys;
  K* dst = tmp;
  for (int p = 0; p < kPasses; ++p) {
    uint32_t* h = hist + p * 256;
    if (h[int((src[0] >> (8 * p)) & 0xff)] == uint32_t(n)) continue;  // every key has this digit
    uint32_t offset = 0;
    for (int b = 0; b < 256; ++b) {
      const uint32_t c = h[b];
      h[b] = offset;
      offset += c;
    }
    for (int64_t i = 0; i < n; ++i) {
      const K k = src[i];
      dst[h[int((k >> (8 * p)) & 0xff)]++] = k;
    }
    std::swap(src, dst);
  }
  if (src != keys) std::memcpy(keys, src, size_t(n) * sizeof(K));
}

// Per-feature float64 state of one part of the rows ([kFeatureFields, d], sparsity_math.h), in `into`
// (the kernel's output, for the first part: no second d-sized copy) or in storage of its own.
struct PartState {
  std::vector<double> storage;
  double* f;
  int64_t d;
  PartState(int64_t d_, double* into)
      : storage(into ? 0 : size_t(kFeatureFields * d_)), f(into ? into : storage.data()), d(d_) {
    std::fill_n(f, kFeatureFields * d, 0.0);
    std::fill_n(field(kMin), d, std::numeric_limits<double>::infinity());
    std::fill_n(field(kMax), d, -std::numeric_limits<double>::infinity());
  }
  PartState(PartState&&) noexcept = default;  // a moved vector keeps its buffer: f stays valid
  PartState(const PartState&) = delete;
  double* field(int k) { return f + k * d; }
  const double* field(int k) const { return f + k * d; }
};

// Columns [0, w) of dst ∪= src; field k of column j lies at dst[k * dst_stride + j] (src alike): a
// feature state, or a tile's accumulators. One named pointer per field, set before the loop: gcc then
// sees unit-stride loads and stores at every x86 level. (From an array of field pointers it reloaded
// them and gathered, 4x slower; from `base[k * stride + j]` it vectorized only under some -mtune
// settings, so the portable AVX-512 copy ran this loop scalar.)
template <typename S>
void merge_columns(double* __restrict dst, int64_t dst_stride, const S* __restrict src, int64_t src_stride,
                   int64_t w) {
  double *const cnt = dst + kCount * dst_stride, *const mean = dst + kMean * dst_stride,
                *const m2 = dst + kM2 * dst_stride, *const m3 = dst + kM3 * dst_stride,
                *const m4 = dst + kM4 * dst_stride, *const fired = dst + kFired * dst_stride,
                *const nan = dst + kNan * dst_stride, *const absum = dst + kAbsSum * dst_stride,
                *const mn = dst + kMin * dst_stride, *const mx = dst + kMax * dst_stride;
  const S *const o_cnt = src + kCount * src_stride, *const o_mean = src + kMean * src_stride,
          *const o_m2 = src + kM2 * src_stride, *const o_m3 = src + kM3 * src_stride,
          *const o_m4 = src + kM4 * src_stride, *const o_fired = src + kFired * src_stride,
          *const o_nan = src + kNan * src_stride, *const o_absum = src + kAbsSum * src_stride,
          *const o_mn = src + kMin * src_stride, *const o_mx = src + kMax * src_stride;
#pragma omp simd
  for (int64_t j = 0; j < w; ++j) {
    const Moments<double> a{cnt[j], mean[j], m2[j], m3[j], m4[j]};
    const Moments<double> b{double(o_cnt[j]), double(o_mean[j]), double(o_m2[j]), double(o_m3[j]),
                            double(o_m4[j])};
    const Moments<double> m = merge_moments(a, b);
    cnt[j] = m.n, mean[j] = m.mean, m2[j] = m.m2, m3[j] = m.m3, m4[j] = m.m4;
    fired[j] += double(o_fired[j]);
    nan[j] += double(o_nan[j]);
    absum[j] += double(o_absum[j]);
    const double lo = double(o_mn[j]), hi = double(o_mx[j]), cur_lo = mn[j], cur_hi = mx[j];
    mn[j] = lo < cur_lo ? lo : cur_lo;  // std::min/max by value: a select, not a branch
    mx[j] = cur_hi < hi ? hi : cur_hi;
  }
}

// SIMD vectors of A as wide as this ISA level's registers (gcc/clang vector extensions: one register per
// vector, so no vector is passed in memory between the helpers); loads and stores need no alignment.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

template <typename A>
struct Simd {
  static constexpr int kLanes = kVecBytes / int(sizeof(A));
  typedef A Vec __attribute__((vector_size(kVecBytes)));
  using Bits = decltype(Vec{} < Vec{});  // the signed integer vector of the same lanes

  static Vec load(const A* p) {
    Vec v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  template <typename T>
  static Vec load_converted(const T* p) {
    if constexpr (std::is_same_v<T, A>) {
      return load(p);
    } else if constexpr (std::is_same_v<T, BFloat16>) {  // the float's upper half
      typedef uint16_t Narrow __attribute__((vector_size(kVecBytes / 2)));  // A is float
      typedef uint32_t Wide __attribute__((vector_size(kVecBytes)));
      Narrow bits;
      std::memcpy(&bits, p, sizeof bits);
      return Vec(__builtin_convertvector(bits, Wide) << 16);
#if defined(__AVX512F__)
    } else if constexpr (std::is_same_v<T, Half>) {
      // One instruction (gcc converts _Float16 vectors lane by lane); the unmasked intrinsic trips
      // gcc 12's -Wmaybe-uninitialized.
      return Vec(_mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#endif
    } else {
      Vec v;
      for (int q = 0; q < kLanes; ++q) v[q] = to_acc(p[q]);
      return v;
    }
  }
  static void store(A* p, Vec v) { std::memcpy(p, &v, sizeof v); }
  static Vec abs(Vec v) { return Vec(Bits(v) & (Bits{} + (~KeyOf<A>(0) >> 1))); }
  static Vec min(Vec a, Vec b) { return a < b ? a : b; }
  static Vec max(Vec a, Vec b) { return a > b ? a : b; }
  // Σ of the lanes: pairwise, by rotating half, a quarter, ... of the vector onto itself.
  template <int kShift = kLanes / 2>
  static A sum(Vec v) {
    if constexpr (kShift == 0) {
      return v[0];
    } else {
      return sum<kShift / 2>(v + rotate<kShift>(v, std::make_integer_sequence<int, kLanes>{}));
    }
  }
  template <int kShift, int... kLane>
  static Vec rotate(Vec v, std::integer_sequence<int, kLane...>) {
    return __builtin_shufflevector(v, v, ((kLane + kShift) % kLanes)...);
  }
};

template <typename T>
struct Stats {
  using A = acc_t<T>;
  using K = KeyOf<A>;

  const T* x;
  int64_t rows, d, ld;
  A eps;
  const double* top_p;
  int num_top_p;
  bool ordered;
  A* row_out;           // [channels, rows]
  int64_t* row_counts;  // [kRowCounts, rows]
  int64_t tile_cols, block_rows;

  // Scratch of one part (one thread).
  struct Scratch {
    std::vector<A> tile_storage;  // tile accumulators [kFeatureFields, tile_cols] (kMean holds the tile mean)
    A* tile;                      // ... from a 64-byte boundary: vector loads/stores of them never split
    std::vector<int64_t> row_n, row_l0;  // per row of the block, summed over the tiles: exact counts
    std::vector<A> row_l1, row_l2sq;
    std::vector<K> keys, keys_tmp;
    Scratch(int64_t tile_cols, int64_t d, bool ordered)
        : tile_storage(size_t(kFeatureFields * tile_cols) + 64 / sizeof(A)),
          tile(reinterpret_cast<A*>((reinterpret_cast<uintptr_t>(tile_storage.data()) + 63) & ~uintptr_t(63))),
          row_n(kMaxBlockRows), row_l0(kMaxBlockRows),
          row_l1(kMaxBlockRows), row_l2sq(kMaxBlockRows), keys(ordered ? size_t(d) : 0),
          keys_tmp(ordered ? size_t(d) : 0) {}
  };

  // Pass A over the tile: per-feature count/sum/min/max/Σ|a|/fired/NaN and per-row n, L0, Σ|a|, Σa².
  // kChecked=false assumes every entry is finite (no masks: about half the work); kChecked=true turns
  // non-finite entries into neutral values. Both are branch-free so that gcc vectorizes them.
  template <bool kChecked>
  void tile_sums(A* const* acc, A* row_acc, int64_t r0, int64_t nr, int64_t c0, int64_t w) const {
    A *cnt = acc[kCount], *sum = acc[kMean], *mn = acc[kMin], *mx = acc[kMax], *absum = acc[kAbsSum],
      *fired = acc[kFired], *nan = acc[kNan];
    const A inf = inf_value<A>();
    for (int64_t j = 0; j < w; ++j) {
      cnt[j] = sum[j] = absum[j] = fired[j] = nan[j] = A(0);
      mn[j] = inf;
      mx[j] = -inf;
    }
    std::fill_n(row_acc, 4 * kMaxBlockRows, A(0));
    int64_t r = 0;
    if constexpr (!kChecked) {
      const int64_t w_vec = w / Simd<A>::kLanes * Simd<A>::kLanes;
      for (; r + kStepRows <= nr; r += kStepRows) {
        sums_step(acc, row_acc, r0, r, nr, c0, w);
        for (int k = 0; k < kStepRows; ++k) row_sums<false>(acc, row_acc, r0, r + k, c0, w_vec, w);
      }
    }
    for (; r < nr; ++r) row_sums<kChecked>(acc, row_acc, r0, r, c0, 0, w);
    if constexpr (!kChecked) {
      for (int64_t j = 0; j < w; ++j) cnt[j] = A(nr);
    }
  }

  // Columns [j0, w) of row r of pass A, added to the tile's column and row accumulators.
  template <bool kChecked>
  void row_sums(A* const* acc, A* row_acc, int64_t r0, int64_t r, int64_t c0, int64_t j0, int64_t w) const {
    A *cnt = acc[kCount], *sum = acc[kMean], *mn = acc[kMin], *mx = acc[kMax], *absum = acc[kAbsSum],
      *fired = acc[kFired], *nan = acc[kNan];
    const A inf = inf_value<A>();
    const T* row = x + (r0 + r) * ld + c0;
    A n = 0, l0 = 0, l1 = 0, l2sq = 0;
#pragma omp simd reduction(+ : n, l0, l1, l2sq)
    for (int64_t j = j0; j < w; ++j) {
      const A v = to_acc(row[j]);
      const bool fin = !kChecked || is_finite(v);
      const A vf = fin ? v : A(0);
      const A av = abs_value(vf);
      const A fire = av > eps ? A(1) : A(0);
      const A lo = fin ? v : inf, hi = fin ? v : -inf;
      sum[j] += vf;
      mn[j] = lo < mn[j] ? lo : mn[j];
      mx[j] = hi > mx[j] ? hi : mx[j];
      absum[j] += av;
      fired[j] += fire;
      if constexpr (kChecked) {
        cnt[j] += fin ? A(1) : A(0);
        nan[j] += v != v ? A(1) : A(0);
        n += fin ? A(1) : A(0);
      }
      l0 += fire;
      l1 += av;
      l2sq += av * av;
    }
    row_acc[0 * kMaxBlockRows + r] += kChecked ? n : A(w - j0);
    row_acc[1 * kMaxBlockRows + r] += l0;
    row_acc[2 * kMaxBlockRows + r] += l1;
    row_acc[3 * kMaxBlockRows + r] += l2sq;
  }

  // Rows r .. r+3 of the all-finite pass A over the tile's whole vectors of columns (row_sums does the
  // rest), in SIMD vectors: the column accumulators are read and written once per four rows
  // instead of once per row (loads and stores, not arithmetic, bound the one-row form). Each vector step
  // also prefetches the same columns kPrefetchRows rows ahead (past the tile's last row: the next tile's
  // first rows): spread through the arithmetic, the prefetches keep the memory stream going while it
  // runs (a burst of a whole row step's prefetches stalled the core until they landed, and gcc does not
  // vectorize a loop that contains prefetches).
  void sums_step(A* const* acc, A* row_acc, int64_t r0, int64_t r, int64_t nr, int64_t c0, int64_t w) const {
    using V = Simd<A>;
    using Vec = typename V::Vec;
    static_assert(kStepRows == 4, "four rows per step");
    A *sum = acc[kMean], *mn = acc[kMin], *mx = acc[kMax], *absum = acc[kAbsSum], *fired = acc[kFired];
    const T* row[kStepRows];
    uintptr_t ahead[kStepRows];  // integer addresses: they may lie past the tensor (prefetches never fault)
    for (int k = 0; k < kStepRows; ++k) {
      row[k] = x + (r0 + r + k) * ld + c0;
      const int64_t later = r + k + kPrefetchRows;
      const int64_t element = later < nr    ? (r0 + later) * ld + c0
                              : c0 + w < d  ? (r0 + later - nr) * ld + c0 + w  // the next tile
                                            : (r0 + later) * ld;               // the next block
      ahead[k] = reinterpret_cast<uintptr_t>(x) + uintptr_t(element) * sizeof(T);
    }
    const Vec eps_v = Vec{} + eps, one = Vec{} + A(1);
    Vec l0[kStepRows] = {}, l1[kStepRows] = {}, l2sq[kStepRows] = {};
    const int64_t w_vec = w / V::kLanes * V::kLanes;
    for (int64_t j = 0; j < w_vec; j += V::kLanes) {
      Vec v[kStepRows], a[kStepRows], fire_count = V::load(fired + j);
      for (int k = 0; k < kStepRows; ++k) {
        __builtin_prefetch(reinterpret_cast<const void*>(ahead[k] + uintptr_t(j) * sizeof(T)), 0, 3);
        v[k] = V::load_converted(row[k] + j);
        a[k] = V::abs(v[k]);
        const auto fires = a[k] > eps_v;
        l0[k] = fires ? l0[k] + one : l0[k];
        fire_count = fires ? fire_count + one : fire_count;
        l1[k] += a[k];
        l2sq[k] += a[k] * a[k];
      }
      V::store(fired + j, fire_count);
      V::store(sum + j, V::load(sum + j) + ((v[0] + v[1]) + (v[2] + v[3])));
      V::store(absum + j, V::load(absum + j) + ((a[0] + a[1]) + (a[2] + a[3])));
      const Vec lo = V::min(V::min(v[0], v[1]), V::min(v[2], v[3]));
      const Vec hi = V::max(V::max(v[0], v[1]), V::max(v[2], v[3]));
      V::store(mn + j, V::min(lo, V::load(mn + j)));
      V::store(mx + j, V::max(hi, V::load(mx + j)));
    }
    for (int k = 0; k < kStepRows; ++k) {
      row_acc[0 * kMaxBlockRows + r + k] += A(w_vec);
      row_acc[1 * kMaxBlockRows + r + k] += V::sum(l0[k]);
      row_acc[2 * kMaxBlockRows + r + k] += V::sum(l1[k]);
      row_acc[3 * kMaxBlockRows + r + k] += V::sum(l2sq[k]);
    }
  }

  // Pass B over the tile (from cache): central sums Σδ², Σδ³, Σδ⁴ around the tile's column means.
  template <bool kChecked>
  void tile_central(A* const* acc, int64_t r0, int64_t nr, int64_t c0, int64_t w) const {
    A *mean = acc[kMean], *c2 = acc[kM2], *c3 = acc[kM3], *c4 = acc[kM4];
    for (int64_t j = 0; j < w; ++j) {
      const A count = acc[kCount][j];
      mean[j] = count > A(0) ? mean[j] / count : A(0);  // kMean held the sum
      c2[j] = c3[j] = c4[j] = A(0);
    }
    int64_t r = 0;
    for (; r + kStepRows <= nr; r += kStepRows) central_step<kChecked, kStepRows>(acc, r0 + r, c0, w);
    for (; r < nr; ++r) central_step<kChecked, 1>(acc, r0 + r, c0, w);
  }

  // kR rows of pass B: the central-sum accumulators are read and written once per kR rows.
  template <bool kChecked, int kR>
  void central_step(A* const* acc, int64_t row0, int64_t c0, int64_t w) const {
    A *mean = acc[kMean], *c2 = acc[kM2], *c3 = acc[kM3], *c4 = acc[kM4];
    const T* rp[kR];
    for (int k = 0; k < kR; ++k) rp[k] = x + (row0 + k) * ld + c0;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) {
      A s2 = c2[j], s3 = c3[j], s4 = c4[j];
#pragma GCC unroll 8
      for (int k = 0; k < kR; ++k) {
        const A v = to_acc(rp[k][j]);
        const A dv = !kChecked || is_finite(v) ? v - mean[j] : A(0);
        const A d2 = dv * dv;
        s2 += d2;
        s3 += d2 * dv;
        s4 += d2 * d2;
      }
      c2[j] = s2;
      c3[j] = s3;
      c4[j] = s4;
    }
  }

  void tile_pass(PartState& state, Scratch& s, int64_t r0, int64_t nr, int64_t c0, int64_t w) const {
    A* acc[kFeatureFields];
    for (int k = 0; k < kFeatureFields; ++k) acc[k] = s.tile + k * tile_cols;
    A row_acc[4 * kMaxBlockRows];
    // All-finite fast path first; a NaN or Inf anywhere makes some column's Σ|a| non-finite (as does an
    // overflow of Σ|a|), and the tile is redone with masks.
    tile_sums<false>(acc, row_acc, r0, nr, c0, w);
    bool finite = true;
    for (int64_t j = 0; j < w; ++j) finite = finite && is_finite(acc[kAbsSum][j]);
    if (finite) {
      tile_central<false>(acc, r0, nr, c0, w);
    } else {
      tile_sums<true>(acc, row_acc, r0, nr, c0, w);
      tile_central<true>(acc, r0, nr, c0, w);
    }
    for (int64_t r = 0; r < nr; ++r) {
      s.row_n[size_t(r)] += int64_t(row_acc[r]);  // an integer <= tile_cols, exact in A
      s.row_l0[size_t(r)] += int64_t(row_acc[kMaxBlockRows + r]);
      s.row_l1[size_t(r)] += row_acc[2 * kMaxBlockRows + r];
      s.row_l2sq[size_t(r)] += row_acc[3 * kMaxBlockRows + r];
    }
    merge_columns(state.f + c0, d, s.tile, tile_cols, w);
  }

  // Every channel of one row given n (finite entries) and L0: sortable keys of |a| (non-finite last), radix
  // sort, then all statistics from the n sorted finite values (vectorized loops over L1-resident data).
  // Σ|a| and Σa² are recomputed here in float64: the thresholded L0 compares entries with a threshold made
  // of them.
  void ordered_row(Scratch& s, int64_t row_index, int64_t count, int64_t l0) const {
    const double n = double(count);
    const T* row = x + row_index * ld;
    K* keys = s.keys.data();
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      const A v = to_acc(row[j]);
      const bool fin = is_finite(v);
      keys[j] = sort_key(abs_value(fin ? v : A(0)), fin);
    }
    // Zeros (most entries after a ReLU, nearly all of an SAE code) sort first and add nothing to any sum:
    // only the other keys are sorted, and the `zeros` entries count as a prefix of the sorted row.
    int64_t sorted = 0;
    for (int64_t j = 0; j < d; ++j) {
      const K key = keys[j];
      keys[sorted] = key;
      sorted += key != 0;
    }
    if (sorted > 1) radix_sort(keys, s.keys_tmp.data(), sorted);
    const int64_t zeros = d - sorted;
    // Finite nonzero values, ascending in keys[0, nonzero); the clamp only guards the reads.
    const int64_t nonzero = std::clamp<int64_t>(count - zeros, 0, sorted);
    auto value = [keys](int64_t i) { return bit_cast_rk<A>(keys[i]); };
    double l1 = 0, l2sq = 0, gini_sum = 0;
#pragma omp simd reduction(+ : l1, l2sq, gini_sum)
    for (int64_t i = 0; i < nonzero; ++i) {
      const double a = double(value(i));
      l1 += a;
      l2sq += a * a;
      gini_sum += gini_weight(zeros + i, n) * a;
    }
    double sum_a_log_a = 0, sum_a2_log_a = 0;
#pragma omp simd reduction(+ : sum_a_log_a, sum_a2_log_a)
    for (int64_t i = 0; i < nonzero; ++i) {
      const A a = value(i);
      const A a_log_a = a * log_poly(a);  // float products then float64 sums: this form vectorizes
      sum_a_log_a += double(a_log_a);
      sum_a2_log_a += double(a_log_a) * double(a);
    }
    // #{|a| > threshold}: the sorted values above the first one that exceeds it (threshold >= 0: never a zero).
    const double threshold = abs_threshold(n, l1, l2sq);
    int64_t lo = 0, hi = nonzero;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (double(value(mid)) > threshold) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    write_sort_free_row(row_out, row_counts, rows, row_index, d, count, l0, l1, l2sq);
    write_ordered_row(row_out, rows, row_index, n, l1, l2sq, double(nonzero - lo), sum_a_log_a, sum_a2_log_a,
                      gini_sum);
    for (int p = 0; p < num_top_p; ++p) {
      const int64_t k = std::min(top_k_count(top_p[p], n), count);
      double s1 = 0, s2 = 0;
      for (int64_t i = std::max<int64_t>(0, count - k - zeros); i < nonzero; ++i) {
        const double a = double(value(i));
        s1 += a;
        s2 += a * a;
      }
      write_top_p(row_out, rows, row_index, p, num_top_p, l1, l2sq, s1, s2);
    }
  }

  void run_part(PartState& state, int64_t begin, int64_t end) const {
    Scratch s(tile_cols, d, ordered);
    for (int64_t r0 = begin; r0 < end; r0 += block_rows) {
      const int64_t nr = std::min(block_rows, end - r0);
      for (auto* v : {&s.row_n, &s.row_l0}) std::fill_n(v->begin(), nr, int64_t(0));
      for (auto* v : {&s.row_l1, &s.row_l2sq}) std::fill_n(v->begin(), nr, A(0));
      for (int64_t c0 = 0; c0 < d; c0 += tile_cols) tile_pass(state, s, r0, nr, c0, std::min(tile_cols, d - c0));
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t i = r0 + r, n = s.row_n[size_t(r)], l0 = s.row_l0[size_t(r)];
        if (ordered) {
          ordered_row(s, i, n, l0);
        } else {
          write_sort_free_row(row_out, row_counts, rows, i, d, n, l0, double(s.row_l1[size_t(r)]),
                              double(s.row_l2sq[size_t(r)]));
        }
      }
    }
  }
};

template <typename T>
void run(const T* x, int64_t rows, int64_t d, int64_t ld, double eps, const double* top_p, int num_top_p,
         bool ordered, double* feature_state, acc_t<T>* row_out, int64_t* row_counts, int num_threads) {
  using A = acc_t<T>;
  const int64_t tile_cols =
      std::min<int64_t>(d, std::max<int64_t>(16, kTileAccBytes / int64_t(kFeatureFields * sizeof(A)) / 16 * 16));
  // Longer blocks mean fewer float64 merges per element; they are bounded by what must stay in L2.
  const int64_t block_bytes_per_row = (ordered ? d : tile_cols) * int64_t(sizeof(T));
  const int64_t block_rows = std::clamp<int64_t>((ordered ? kOrderedBlockBytes : kTileBytes) / block_bytes_per_row,
                                                 kMinBlockRows, kMaxBlockRows);
  const Stats<T> stats{x, rows, d, ld, A(eps), top_p, num_top_p, ordered, row_out, row_counts, tile_cols, block_rows};
  const int64_t parts =
      std::clamp<int64_t>((rows + kMinRowsPerPart - 1) / kMinRowsPerPart, 1, std::max(1, num_threads));
  std::vector<PartState> states;
  states.reserve(size_t(parts));
  for (int64_t p = 0; p < parts; ++p) states.emplace_back(d, p == 0 ? feature_state : nullptr);
  parallel_for(parts, num_threads, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) stats.run_part(states[size_t(p)], rows * p / parts, rows * (p + 1) / parts);
  });
  for (int64_t p = 1; p < parts; ++p) merge_columns(feature_state, d, states[size_t(p)].f, d, d);
}

// Sum and count of the non-NaN values of one channel and, for divisor > 0, the histogram of value / divisor
// clamped to [0, 1] (NaN dropped) in `bins` bins: torch.histc's binning, as the results package's sparsity histogram.
template <typename A>
void summarize_channel(const A* values, int64_t rows, double divisor, int64_t bins, double* sum, int64_t* defined,
                       int64_t* hist) {
  double total = 0;
  int64_t count = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const double v = double(values[i]);
    if (v != v) continue;
    total += v;
    ++count;
    if (divisor > 0) {
      const double share = std::clamp(v / divisor, 0.0, 1.0);
      ++hist[std::min(int64_t(share * double(bins)), bins - 1)];
    }
  }
  *sum = total;
  *defined = count;
}

}  // namespace

void sparsity_merge_states(const SparsityMergeStatesParams& p, int /*num_threads: one vectorized pass*/) {
  merge_columns(p.state, p.d, p.other, p.d, p.d);
}

void sparsity_row_summaries(const SparsityRowSummariesParams& p, int num_threads) {
  const int64_t summaries = kRowCounts + p.channels;  // the counts, then the row channels
  std::fill_n(p.hist, summaries * p.bins, int64_t(0));
  parallel_for(summaries, num_threads, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      auto summarize = [&](const auto* values) {
        summarize_channel(values, p.rows, p.hist_divisor[c], p.bins, p.sums + c, p.defined + c, p.hist + c * p.bins);
      };
      const int64_t channel = c - kRowCounts;
      if (channel < 0) {
        summarize(p.row_counts + c * p.rows);
      } else if (p.dtype == DType::Float64) {
        summarize(static_cast<const double*>(p.row_out) + channel * p.rows);
      } else {
        summarize(static_cast<const float*>(p.row_out) + channel * p.rows);
      }
    }
  });
}

void sparsity_stats(const SparsityStatsParams& p, int num_threads) {
  if (p.d <= 0) return;
  switch_dtype(p.dtype, "sparsity_stats x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    run<T>(static_cast<const T*>(p.x), p.rows, p.d, p.ld, p.eps, p.top_p, p.num_top_p, p.ordered, p.feature_state,
           static_cast<acc_t<T>*>(p.row_out), p.row_counts, num_threads);
  });
}

}  // namespace repkern::cpu::REPKERN_ISA_NS
