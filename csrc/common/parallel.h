// CPU threading: a blocking parallel-for over [0, n) on `num_threads` threads
// (the caller passes torch.get_num_threads(), so user settings are honoured).
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace repkern {

// Calls fn(begin, end) on contiguous chunks; chunks are handed to threads in
// order, so the split depends only on n and num_threads.
template <typename F>
void parallel_for(int64_t n, int num_threads, int64_t min_chunk, F&& fn) {
  if (n <= 0) return;
  const int64_t max_threads = std::max<int64_t>(1, (n + min_chunk - 1) / std::max<int64_t>(1, min_chunk));
  const int threads = int(std::min<int64_t>(std::max(1, num_threads), max_threads));
  if (threads == 1) {
    fn(int64_t(0), n);
    return;
  }
  std::vector<std::thread> pool;
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
  pool.reserve(size_t(threads - 1));
  for (int t = 1; t < threads; ++t) pool.emplace_back(run, t);
  run(0);
  for (auto& th : pool) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace repkern
