// CPU threading: a blocking parallel-for over [0, n) on `num_threads` threads
// (the caller passes torch.get_num_threads(), so user settings are honoured).
//
// With OpenMP the chunks run on OpenMP threads. torch is imported first and its libgomp.so.1 is the
// one this library binds to, so the chunks run on torch's own intra-op threads: threads of a separate
// pool would compete for the cores with torch's workers, which spin for milliseconds after each torch
// op (measured: sparsity_stats 16384×2048 at 2 threads took 2× as long right after a few torch ops).
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#else
#include <thread>
#endif

namespace repkern {

// Calls fn(begin, end) on contiguous chunks, one per thread; the split depends only on n and
// num_threads (not on how many threads the runtime grants), so results repeat exactly.
template <typename F>
void parallel_for(int64_t n, int num_threads, int64_t min_chunk, F&& fn) {
  if (n <= 0) return;
  const int64_t max_threads = std::max<int64_t>(1, (n + min_chunk - 1) / std::max<int64_t>(1, min_chunk));
  const int threads = int(std::min<int64_t>(std::max(1, num_threads), max_threads));
  if (threads == 1) {
    fn(int64_t(0), n);
    return;
  }
  std::vector<std::exception_ptr> errors(static_cast<size_t>(threads));
  const int64_t chunk = (n + threads - 1) / threads;
  auto run = [&](int t) {
    const int64_t begin = t * chunk;
    const int64_t end = std::min(n, begin + chunk);
    if (begin >= end) return;
    try {
      fn(begin, end);
    } catch (...) {
      errors[size_t(t)] = std::current_exception();
    }
  };
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  {
    // A smaller team (nested call, thread limit) runs several chunks per thread.
    for (int t = omp_get_thread_num(); t < threads; t += omp_get_num_threads()) run(t);
  }
#else
  std::vector<std::thread> pool;
  pool.reserve(size_t(threads - 1));
  for (int t = 1; t < threads; ++t) pool.emplace_back(run, t);
  run(0);
  for (auto& th : pool) th.join();
#endif
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace repkern
