// CPU Gram epilogue: tiles of the upper triangle, each computed once (with a
// vectorizable inner loop) and written to both triangles. Each task reads only
// its own upper tile, so `out` may be `inner` (in-place, as on CUDA). Row sums
// for centering are owned per row tile, so they do not depend on the thread count.
//
// Median selection: a radix select over the strict upper triangle in place (no packed copy). Each pass
// histograms the next kGramSelectBits bits of the keys that share the bits chosen so far (per-part
// histograms, summed); once few candidates are left, one pass gathers them in position order and the
// rest is chosen among those. Histogram sums, the gathered order and the lowest position found do not
// depend on how the triangle is split, so neither does the result.
#include "gram.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

#include "common/parallel.h"

namespace repkern::cpu::REPKERN_ISA_NS {
namespace {

constexpr int64_t kTile = 64;

// 8×8 transpose in vector registers (GCC vector extensions: AVX shuffles where
// available, split into narrower ones elsewhere). src/dst rows are kTile apart.
template <typename A>
inline void transpose8x8(const A* src, A* dst) {
  typedef A vec __attribute__((vector_size(8 * sizeof(A))));
  vec r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) std::memcpy(&r[i], src + i * kTile, sizeof(vec));
  for (int i = 0; i < 8; i += 2) {  // interleave row pairs
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {  // 2×2 blocks of pairs
    u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int i = 0; i < 4; ++i) {  // halves
    const vec lo = __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    const vec hi = __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    std::memcpy(dst + i * kTile, &lo, sizeof(vec));
    std::memcpy(dst + (i + 4) * kTile, &hi, sizeof(vec));
  }
}

template <GramKind K, typename A>
struct Tile {
  A v[kTile][kTile];
  A vt[kTile][kTile];  // transpose of v, for the mirrored write
  int64_t rows = 0, cols = 0;

  // vt[c][r] = v[r][c] by 8×8 register transposes, so that the mirrored write
  // reads rows (a strided column walk does not vectorize).
  void transpose() {
    for (int64_t rb = 0; rb < kTile; rb += 8)
      for (int64_t cb = 0; cb < kTile; cb += 8) transpose8x8(&v[rb][cb], &vt[cb][rb]);
  }

  // Fills tile (ti, tj), ti <= tj, of batch matrix g; diagonal tiles mirrored.
  void compute(const A* g, const A* aux, A scale, int64_t n, int64_t ti, int64_t tj) {
    const int64_t r0 = ti * kTile, c0 = tj * kTile;
    rows = std::min(kTile, n - r0);
    cols = std::min(kTile, n - c0);
    for (int64_t r = 0; r < rows; ++r) {
      const A* grow = g + (r0 + r) * n + c0;
      const A* aux_c = aux ? aux + c0 : nullptr;
      const A aux_r = aux ? aux[r0 + r] : A(0);
      A* vr = v[r];
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        if constexpr (gram_needs_aux(K)) {
          vr[c] = gram_entry<K>(grow[c], aux_r, aux_c[c], scale);
        } else {
          vr[c] = gram_entry<K>(grow[c], A(0), A(0), scale);
        }
      }
    }
    if (ti == tj) {
      for (int64_t r = 0; r < rows; ++r) {
        v[r][r] = gram_diag<K>(g[(r0 + r) * (n + 1)], aux ? aux[r0 + r] : A(0), scale);
        for (int64_t c = 0; c < r; ++c) v[r][c] = v[c][r];
      }
    }
  }
};

template <GramKind K, GramPass P, typename A, typename Out>
void run(const A* inner, const A* aux, Out* out, const A* scale, double* row_sums, const double* totals, int64_t batch, int64_t n,
         int num_threads) {
  const int64_t tiles = (n + kTile - 1) / kTile;
  auto batch_aux = [&](int64_t b) { return aux ? aux + b * n : nullptr; };

  if constexpr (P == GramPass::RowSums) {
    // Task = (batch, row tile): sums whole rows, mirrored tiles included.
    parallel_for(batch * tiles, num_threads, 1, [&](int64_t t0, int64_t t1) {
      auto tile = std::make_unique<Tile<K, A>>();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / tiles, ti = t % tiles;
        const A* g = inner + b * n * n;
        const A s = K == GramKind::Rbf || K == GramKind::RbfFromSqDist ? scale[b] : A(0);
        double sums[kTile] = {};
        for (int64_t tj = 0; tj < tiles; ++tj) {
          const bool upper = tj >= ti;
          tile->compute(g, batch_aux(b), s, n, upper ? ti : tj, upper ? tj : ti);
          for (int64_t r = 0; r < tile->rows; ++r)
            for (int64_t c = 0; c < tile->cols; ++c) sums[upper ? r : c] += double(tile->v[r][c]);
        }
        const int64_t r0 = ti * kTile;
        for (int64_t r = 0; r < std::min(kTile, n - r0); ++r) row_sums[b * n + r0 + r] = sums[r];
      }
    });
    return;
  } else {
    const int64_t pairs = tiles * (tiles + 1) / 2;
    std::vector<int64_t> pair_ti(static_cast<size_t>(pairs)), pair_tj(static_cast<size_t>(pairs));
    for (int64_t ti = 0, p = 0; ti < tiles; ++ti)
      for (int64_t tj = ti; tj < tiles; ++tj, ++p) pair_ti[size_t(p)] = ti, pair_tj[size_t(p)] = tj;

    parallel_for(batch * pairs, num_threads, 1, [&](int64_t t0, int64_t t1) {
      auto tile = std::make_unique<Tile<K, A>>();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / pairs, ti = pair_ti[size_t(t % pairs)], tj = pair_tj[size_t(t % pairs)];
        const A s = K == GramKind::Rbf || K == GramKind::RbfFromSqDist ? scale[b] : A(0);
        tile->compute(inner + b * n * n, batch_aux(b), s, n, ti, tj);
        Out* o = out + b * n * n;
        const int64_t r0 = ti * kTile, c0 = tj * kTile;
        A mean_r[kTile] = {}, mean_c[kTile] = {};
        A mean_all = A(0);
        if constexpr (P == GramPass::WriteCentered) {
          for (int64_t r = 0; r < tile->rows; ++r) mean_r[r] = A(row_sums[b * n + r0 + r] / double(n));
          for (int64_t c = 0; c < tile->cols; ++c) mean_c[c] = A(row_sums[b * n + c0 + c] / double(n));
          mean_all = A(totals[b] / (double(n) * double(n)));
        }
        // In place, a linear off-diagonal tile already holds its values: only the mirror is written.
        const bool skip_tile = K == GramKind::Linear && ti != tj && static_cast<const void*>(out) == inner;
        for (int64_t r = 0; r < tile->rows && !skip_tile; ++r) {
          Out* orow = o + (r0 + r) * n + c0;
          for (int64_t c = 0; c < tile->cols; ++c) {
            A v = tile->v[r][c];
            if constexpr (P == GramPass::WriteCentered) v = gram_center(v, mean_r[r], mean_c[c], mean_all);
            orow[c] = from_acc<Out>(v);
          }
        }
        if (ti == tj) continue;
        tile->transpose();
        for (int64_t c = 0; c < tile->cols; ++c) {
          Out* orow = o + (c0 + c) * n + r0;
          for (int64_t r = 0; r < tile->rows; ++r) {
            A v = tile->vt[c][r];
            if constexpr (P == GramPass::WriteCentered) v = gram_center(v, mean_c[c], mean_r[r], mean_all);
            orow[r] = from_acc<Out>(v);
          }
        }
      }
    });
  }
}

// ---- median selection ----

constexpr int64_t kBuckets = int64_t(1) << kGramSelectBits;
constexpr int64_t kSelectMinPart = int64_t(1) << 16;  // packed entries per thread, at least
constexpr int64_t kCollectMin = int64_t(1) << 14;     // candidates gathered instead of another pass
constexpr int64_t kKeyBlock = 256;                    // keys computed per vectorized step

// Packed index of (i, i + 1): where row i of the strict upper triangle of n×n starts.
inline int64_t packed_start(int64_t i, int64_t n) { return i * (n - 1) - i * (i - 1) / 2; }

// fn(keys, count, flat index i·n + j of keys[0]) over the keys of the packed entries [p0, p1) in order,
// a block of one row at a time, until fn returns false.
template <typename A, typename F>
void for_each_key(const A* d, int64_t n, int64_t p0, int64_t p1, F&& fn) {
  using K = sae_key_t<A>;
  K keys[kKeyBlock];
  const double b = 2.0 * double(n) - 1.0;  // row of p0 from the quadratic, then exact integer fix-ups
  int64_t i = std::clamp<int64_t>(int64_t((b - std::sqrt(std::max(0.0, b * b - 8.0 * double(p0)))) / 2.0), 0, n - 2);
  while (i > 0 && packed_start(i, n) > p0) --i;
  while (packed_start(i + 1, n) <= p0) ++i;
  for (int64_t p = p0; p < p1; ++i) {
    const int64_t j0 = i + 1 + (p - packed_start(i, n));
    const int64_t count = std::min(n - j0, p1 - p);
    const A* row = d + i * n + j0;
    for (int64_t c0 = 0; c0 < count; c0 += kKeyBlock) {
      const int64_t m = std::min(kKeyBlock, count - c0);
#pragma omp simd
      for (int64_t c = 0; c < m; ++c) keys[c] = sae_order_key(row[c0 + c]);
      if (!fn(static_cast<const K*>(keys), m, i * n + j0 + c0)) return;
    }
    p += count;
  }
}

// The bits of `key` above bit `hi` (none when hi is the key width: nothing is chosen yet).
template <typename K>
inline K key_top(K key, int hi) {
  return hi >= int(8 * sizeof(K)) ? K(0) : K(key >> hi);
}

// Adds to hist[g][digit] (digit: the bits [shift, hi) of the key) for the keys whose bits above `hi`
// equal prefix[g], g < G; G = 0: every key, into hist[0]. Consecutive keys count into kCopies separate
// 32-bit histograms (summed at the end of each slice of kSlice keys, so none overflows): distances
// crowd into one or two digits, and increments of one counter would wait on each other.
template <int G, typename A>
void count_digits(const A* d, int64_t n, int64_t p0, int64_t p1, int hi, int shift, const sae_key_t<A>* prefix,
                  int64_t* hist) {
  using K = sae_key_t<A>;
  constexpr int64_t kCopies = 4, kSlice = int64_t(1) << 30;
  constexpr int64_t kGroups = G == 2 ? 2 : 1;
  const K mask = K(kBuckets - 1);
  std::vector<uint32_t> copies(size_t(kGroups * kCopies * kBuckets));
  for (int64_t s0 = p0; s0 < p1; s0 += kSlice) {
    std::fill(copies.begin(), copies.end(), 0u);
    uint32_t* h0 = copies.data();
    uint32_t* h1 = copies.data() + kCopies * kBuckets;
    for_each_key(d, n, s0, std::min(p1, s0 + kSlice), [&](const K* keys, int64_t m, int64_t) {
      for (int64_t c = 0; c < m; ++c) {
        const K key = keys[c];
        const int64_t bucket = (c & (kCopies - 1)) * kBuckets + int64_t((key >> shift) & mask);
        if constexpr (G == 0) {
          ++h0[bucket];
        } else {
          const K top = key >> hi;  // no branch: about half the keys match, unpredictably
          h0[bucket] += uint32_t(top == prefix[0]);
          if constexpr (G == 2) h1[bucket] += uint32_t(top == prefix[1]);
        }
      }
      return true;
    });
    for (int64_t g = 0; g < kGroups; ++g)
      for (int64_t c = 0; c < kCopies; ++c)
        for (int64_t b = 0; b < kBuckets; ++b) hist[g * kBuckets + b] += copies[size_t((g * kCopies + c) * kBuckets + b)];
  }
}

// The order statistics of one n×n matrix d (see MedianSelectParams).
template <typename A>
void select_matrix(const A* d, int64_t n, const MedianSelectParams& p, A* values, int64_t* positions,
                   int num_threads) {
  using K = sae_key_t<A>;
  constexpr int kBits = 8 * sizeof(K);
  const int64_t total = n * (n - 1) / 2;
  const int64_t parts =
      std::clamp<int64_t>((total + kSelectMinPart - 1) / kSelectMinPart, 1, std::max(1, num_threads));
  const int64_t chunk = (total + parts - 1) / parts;
  auto part_begin = [&](int64_t t) { return std::min(total, t * chunk); };

  // Per rank: the key bits above `hi` chosen so far, the rank among the keys sharing them, their count.
  // One rank is tracked as two equal ones; equal prefixes share one histogram.
  K prefix[2] = {0, 0};
  int64_t rank[2] = {p.ranks[0], p.ranks[p.num_ranks - 1]};
  int64_t count[2] = {total, total};
  int hi = kBits;
  const int64_t collect_max = std::max(kCollectMin, total >> 6);
  auto groups = [&] { return prefix[0] == prefix[1] ? 1 : 2; };
  std::vector<int64_t> hist;
  while (hi > 0 && (groups() == 1 ? count[0] : count[0] + count[1]) > collect_max) {
    const int shift = std::max(hi - kGramSelectBits, 0);
    const int G = hi == kBits ? 0 : groups();
    hist.assign(size_t(parts * 2 * kBuckets), 0);
    parallel_for(parts, num_threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        int64_t* h = hist.data() + t * 2 * kBuckets;
        const int64_t q0 = part_begin(t), q1 = part_begin(t + 1);
        if (G == 0) count_digits<0>(d, n, q0, q1, hi, shift, prefix, h);
        if (G == 1) count_digits<1>(d, n, q0, q1, hi, shift, prefix, h);
        if (G == 2) count_digits<2>(d, n, q0, q1, hi, shift, prefix, h);
      }
    });
    for (int64_t t = 1; t < parts; ++t)
      for (int64_t b = 0; b < 2 * kBuckets; ++b) hist[size_t(b)] += hist[size_t(t * 2 * kBuckets + b)];
    for (int r = 0; r < 2; ++r) {
      const int64_t* h = hist.data() + (G == 2 ? r : 0) * kBuckets;
      int64_t below = 0, b = 0;
      while (below + h[b] < rank[r]) below += h[b++];
      prefix[r] = K(prefix[r] << (hi - shift)) | K(b);
      rank[r] -= below;
      count[r] = h[b];
    }
    hi = shift;
  }

  int64_t pos[2] = {-1, -1};
  if (hi == 0) {  // every key bit chosen (many equal entries): the lowest position holding each key
    for (int r = 0; r < 2; ++r) {
      if (r == 1 && prefix[1] == prefix[0]) {
        pos[1] = pos[0];
        continue;
      }
      std::vector<int64_t> first(size_t(parts), -1);
      parallel_for(parts, num_threads, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          for_each_key(d, n, part_begin(t), part_begin(t + 1), [&](const K* keys, int64_t m, int64_t flat) {
            for (int64_t c = 0; c < m; ++c) {
              if (keys[c] == prefix[r]) {
                first[size_t(t)] = flat + c;
                return false;
              }
            }
            return true;
          });
        }
      });
      pos[r] = *std::find_if(first.begin(), first.end(), [](int64_t f) { return f >= 0; });
    }
  } else {  // few candidates: gather them in position order, then select among them
    std::vector<std::vector<std::pair<K, int64_t>>> found(static_cast<size_t>(parts));
    parallel_for(parts, num_threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        auto& out = found[size_t(t)];
        for_each_key(d, n, part_begin(t), part_begin(t + 1), [&](const K* keys, int64_t m, int64_t flat) {
          for (int64_t c = 0; c < m; ++c) {
            const K top = key_top(keys[c], hi);
            if (top == prefix[0] || top == prefix[1]) out.emplace_back(keys[c], flat + c);
          }
          return true;
        });
      }
    });
    std::vector<std::pair<K, int64_t>> candidates;
    for (const auto& f : found) candidates.insert(candidates.end(), f.begin(), f.end());
    std::vector<K> keys;
    for (int r = 0; r < 2; ++r) {
      keys.clear();
      for (const auto& c : candidates)
        if (key_top(c.first, hi) == prefix[r]) keys.push_back(c.first);
      std::nth_element(keys.begin(), keys.begin() + (rank[r] - 1), keys.end());
      const K key = keys[size_t(rank[r] - 1)];
      pos[r] = std::find_if(candidates.begin(), candidates.end(), [&](const auto& c) { return c.first == key; })->second;
    }
  }
  for (int r = 0; r < p.num_ranks; ++r) {
    positions[r] = pos[r];
    values[r] = d[pos[r]];
  }
}

// ---- inner_products: x xᵀ of small-width float32 matrices ----------------------------------------------
//
// Column strips of kStrip = 2 vectors; in each strip the rows above and in its diagonal block, kPanel rows
// at a time, accumulate a kPanel × kStrip tile in registers over d (one row of xᵀ per step: two vector
// loads, kPanel broadcasts, 2·kPanel FMAs). Then the strip is mirrored into the lower part while it is in
// cache. Entry (i, j) and (j, i) of the diagonal block are the same products summed in the same order, so
// the result is exactly symmetric. The panel height fits the accumulators in the register file.
#if defined(__AVX512F__)
constexpr int kLanes = 16, kPanel = 8;  // 16 of 32 zmm accumulators
#elif defined(__AVX__)
constexpr int kLanes = 8, kPanel = 6;  // 12 of 16 ymm
#else
constexpr int kLanes = 4, kPanel = 6;  // 12 of 16 xmm
#endif
constexpr int64_t kStrip = 2 * kLanes;
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

// out rows [r0, r0 + kPanel) × columns [c0, c0 + min(kStrip, n − c0)); xt: [d, ld] (columns >= n are 0).
inline void inner_panel(const float* x, const float* xt, float* out, int64_t n, int64_t d, int64_t ld,
                        int64_t r0, int64_t c0) {
  Lanes acc[kPanel][2];
  for (int r = 0; r < kPanel; ++r) acc[r][0] = acc[r][1] = Lanes{};
  const float* xr = x + r0 * d;
  for (int64_t k = 0; k < d; ++k) {
    Lanes b0, b1;
    std::memcpy(&b0, xt + k * ld + c0, sizeof(Lanes));
    std::memcpy(&b1, xt + k * ld + c0 + kLanes, sizeof(Lanes));
#pragma GCC unroll 8
    for (int r = 0; r < kPanel; ++r) {
      const float a = xr[r * d + k];
      acc[r][0] += a * b0;
      acc[r][1] += a * b1;
    }
  }
  const size_t cols = size_t(std::min(kStrip, n - c0));
  for (int r = 0; r < kPanel; ++r) std::memcpy(out + (r0 + r) * n + c0, acc[r], cols * sizeof(float));
}

// Strip s of one matrix: its upper rows, then the mirror of the rows above its diagonal block.
void inner_strip(const float* x, const float* xt, float* out, int64_t n, int64_t d, int64_t ld, int64_t s) {
  const int64_t c0 = s * kStrip, c1 = std::min(n, c0 + kStrip);
  // panels end at c1; the last one shifted up to stay inside the matrix (its overlap is recomputed
  // identically), or, for n < kPanel, one row at a time
  if (n >= kPanel) {
    for (int64_t r0 = 0; r0 < c1; r0 += kPanel) inner_panel(x, xt, out, n, d, ld, std::min(r0, c1 - kPanel), c0);
  } else {
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = c0; c < c1; ++c) {
        float sum = 0.f;
        for (int64_t k = 0; k < d; ++k) sum += x[r * d + k] * xt[k * ld + c];
        out[r * n + c] = sum;
      }
  }
  for (int64_t i0 = 0; i0 < c0; i0 += 8) {
    const int64_t i1 = std::min(c0, i0 + 8);
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t i = i0; i < i1; ++i) out[c * n + i] = out[i * n + c];
  }
}

// ---- xtx_sq_norm: ‖xᵀx‖²_F without the product ------------------------------------------------------------
//
// The same register tiles as inner_products, on xᵀ: strip s is columns [c0, c0 + kStrip) of x, and its panels
// are the columns i < c0 + kStrip, kPanel at a time. The rows of x go by blocks of kXtxBlock: the strip's
// columns of a block are packed (whole-vector loads, in L1/L2 while every panel reads them), the panel's
// columns are read from x itself (kPanel broadcasts per row), and each panel's float32 sums of the block are
// added to its float64 tile. Once all rows are in, the tile entries on or above the diagonal are squared
// (weight 2 above: the lower triangle is their mirror). Scratch per strip: the packed block and the tiles,
// O(kXtxBlock·kStrip + d·kStrip), whatever n.
constexpr int64_t kXtxBlock = 512;  // rows of x summed in float32 before a tile's float64 accumulation

// Σ w_ij ((xᵀx)_ij)² over strip s of x [n, d] and the rows i <= j of it.
double xtx_strip(const float* x, int64_t n, int64_t d, int64_t s) {
  const int64_t c0 = s * kStrip, cols = std::min(kStrip, d - c0);
  const int64_t panels = (std::min(d, c0 + kStrip) + kPanel - 1) / kPanel;
  std::vector<float> block(static_cast<size_t>(kXtxBlock * kStrip));     // [rows of the block, kStrip]
  std::vector<double> tiles(static_cast<size_t>(panels * kPanel * kStrip));  // [panel rows, kStrip]
  for (int64_t k0 = 0; k0 < n; k0 += kXtxBlock) {
    const int64_t k1 = std::min(n, k0 + kXtxBlock);
    for (int64_t k = k0; k < k1; ++k) {  // columns >= d are zero
      float* dst = block.data() + (k - k0) * kStrip;
      std::memcpy(dst, x + k * d + c0, size_t(cols) * sizeof(float));
      std::fill(dst + cols, dst + kStrip, 0.f);
    }
    for (int64_t p = 0; p < panels; ++p) {
      const float* a[kPanel];
      for (int r = 0; r < kPanel; ++r) a[r] = x + std::min(p * kPanel + r, d - 1);  // rows past d repeat the last
      Lanes acc[kPanel][2];
      for (int r = 0; r < kPanel; ++r) acc[r][0] = acc[r][1] = Lanes{};
      for (int64_t k = k0; k < k1; ++k) {
        Lanes b0, b1;
        std::memcpy(&b0, block.data() + (k - k0) * kStrip, sizeof(Lanes));
        std::memcpy(&b1, block.data() + (k - k0) * kStrip + kLanes, sizeof(Lanes));
#pragma GCC unroll 8
        for (int r = 0; r < kPanel; ++r) {
          const float v = a[r][k * d];
          acc[r][0] += v * b0;
          acc[r][1] += v * b1;
        }
      }
      double* tile = tiles.data() + p * kPanel * kStrip;
      for (int r = 0; r < kPanel; ++r)
        for (int l = 0; l < kLanes; ++l)
          tile[r * kStrip + l] += double(acc[r][0][l]), tile[r * kStrip + kLanes + l] += double(acc[r][1][l]);
    }
  }
  double sum = 0.0;
  for (int64_t i = 0; i < panels * kPanel; ++i)  // j >= i and j < d: the repeated rows are left out
    for (int64_t c = std::max<int64_t>(0, i - c0); c < cols; ++c)
      sum += (i < c0 + c ? 2.0 : 1.0) * tiles[size_t(i * kStrip + c)] * tiles[size_t(i * kStrip + c)];
  return sum;
}

// The work split of inner_products and xtx_sq_norm: strip(b, packed, s) for the strips s < strips of every
// matrix b < batch, after pack(b, u, packed) of the units u < units of its packed copy (`matrix` floats;
// units are disjoint parts of it; none: nothing packed). A matrix per task when there are at least as many
// matrices as threads (packed just before use, in cache); else all matrices packed first (in parallel by
// units), then a task = strips s and strips − 1 − s of one matrix (equal work: strip s has about s + 1
// panels).
template <typename Pack, typename Strip>
void for_each_strip(int64_t batch, int64_t strips, int64_t matrix, int64_t units, int num_threads, Pack&& pack,
                    Strip&& strip) {
  if (batch >= num_threads) {
    parallel_for(batch, num_threads, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> packed(static_cast<size_t>(matrix));
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t u = 0; u < units; ++u) pack(b, u, packed.data());
        for (int64_t s = 0; s < strips; ++s) strip(b, packed.data(), s);
      }
    });
    return;
  }
  std::vector<float> packed(static_cast<size_t>(batch * matrix));
  parallel_for(batch * units, num_threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) pack(t / units, t % units, packed.data() + t / units * matrix);
  });
  const int64_t pairs = (strips + 1) / 2;
  parallel_for(batch * pairs, num_threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / pairs, s = t % pairs;
      strip(b, packed.data() + b * matrix, s);
      if (strips - 1 - s != s) strip(b, packed.data() + b * matrix, strips - 1 - s);
    }
  });
}

}  // namespace

void median_select(const MedianSelectParams& p, int num_threads) {
  switch_acc(p.dtype, "median_select", [&](auto acc_t) {
    using A = typename decltype(acc_t)::type;
    for (int64_t b = 0; b < p.batch; ++b)
      select_matrix(static_cast<const A*>(p.d) + b * p.n * p.n, p.n, p, static_cast<A*>(p.values) + b * p.num_ranks,
                    p.positions + b * p.num_ranks, num_threads);
  });
}

void gram_epilogue(const GramEpilogueParams& p, int num_threads) {
  if (p.batch == 0 || p.n == 0) return;
  dispatch_gram(p.kind, p.pass, p.acc_dtype, p.out_dtype, [&]<GramKind K, GramPass P, typename A, typename Out>() {
    run<K, P, A, Out>(static_cast<const A*>(p.inner), static_cast<const A*>(p.aux), static_cast<Out*>(p.out),
                      static_cast<const A*>(p.scale), p.row_sums, p.totals, p.batch, p.n, num_threads);
  });
}

void inner_products(const InnerProductsParams& p, int num_threads) {
  if (p.batch == 0 || p.n == 0) return;
  const int64_t strips = (p.n + kStrip - 1) / kStrip;
  const int64_t ld = strips * kStrip;  // xᵀ rows padded with zero columns: whole-vector loads
  auto pack = [&](int64_t b, int64_t, float* xt) {
    const float* x = p.x + b * p.n * p.d;
    for (int64_t k = 0; k < p.d; ++k) {
      float* row = xt + k * ld;
      for (int64_t i = 0; i < p.n; ++i) row[i] = x[i * p.d + k];
      std::fill(row + p.n, row + ld, 0.f);
    }
  };
  for_each_strip(p.batch, strips, p.d * ld, 1, num_threads, pack, [&](int64_t b, const float* xt, int64_t s) {
    inner_strip(p.x + b * p.n * p.d, xt, p.out + b * p.n * p.n, p.n, p.d, ld, s);
  });
}

void xtx_sq_norm(const XtxSqNormParams& p, int num_threads) {
  if (p.batch == 0) return;
  const int64_t strips = (p.d + kStrip - 1) / kStrip;
  std::vector<double> partial(static_cast<size_t>(p.batch * strips), 0.0);  // per strip, summed in order
  for_each_strip(p.batch, strips, 0, 0, num_threads, [](int64_t, int64_t, float*) {},
                 [&](int64_t b, const float*, int64_t s) {
                   partial[size_t(b * strips + s)] = xtx_strip(p.x + b * p.n * p.d, p.n, p.d, s);
                 });
  for (int64_t b = 0; b < p.batch; ++b) {
    double sum = 0.0;
    for (int64_t s = 0; s < strips; ++s) sum += partial[size_t(b * strips + s)];
    p.out[b] = sum;
  }
}

}  // namespace repkern::cpu::REPKERN_ISA_NS
