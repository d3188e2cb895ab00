// CUDA execution-model emulator: lets g++ compile the project's .cu kernel
// sources unchanged and run them on the CPU (module repkern._emu), so that CI
// without a GPU still executes every kernel. See docs/design.md (the emulator).
//
// Model:
//  * blocks run one after another (order set by the schedule); the threads of a
//    block are fibers on the calling OS thread. A fiber runs until it reaches a
//    rendezvous (__syncthreads, __syncwarp, warp shuffles/votes) or returns; then
//    the first runnable fiber in schedule order runs. A warp collective completes
//    as soon as its last lane arrives, so the warp goes on at once: between two
//    barriers the warps run one after another, lowest first (forward) or highest
//    first (reverse). A fast warp therefore reaches the next loop iteration (and
//    overwrites shared scratch) before a slow one has read it, which a missing
//    barrier must not allow.
//  * schedules (env REPKERN_EMU_SCHEDULE, read at every launch):
//      forward | reverse | random[:seed]
//    set the order in which runnable fibers (and blocks) are resumed, because a
//    missing barrier often passes in one order and fails in another (random picks
//    a random runnable fiber at every switch).
//  * shared memory is poisoned with 0xFF bytes (NaN / -1) before each block, the
//    static arrays as well as the dynamic buffer, so that a read before the write
//    (a missing barrier) sees garbage instead of the previous block's values.
//    Static shared arrays MUST be declared with RK_SHARED(type, name, dims)
//    (common/macros.h): each call site (and each template instantiation) is a
//    static array plus a region record; the first thread of a block that passes
//    the declaration poisons it (every thread passes the declaration before it
//    can touch the array). The plain `__shared__` keyword is a compile error here
//    (GCC places template statics in their own COMDAT sections, so a bare static
//    could never be found and poisoned).
//  * coverage: every pass of a barrier or warp collective is counted per call
//    site (file:line and enclosing function, template arguments included) and
//    launched kernel: coverage() gives, per (kernel, site), the most times one
//    thread of one block passed it; reset_coverage() clears it. Test runs use it
//    to show that every rendezvous ran, and ran twice in one block where it sits
//    in a loop (tests/emu_coverage.py).
//  * errors are reported with file:line as repkern_emu::EmuError:
//      - threads that exit or wait at a different __syncthreads while others of
//        the block wait at one;
//      - warp collectives whose mask names lanes that are absent, exited, or
//        waiting elsewhere; shuffles that read a lane outside the mask;
//      - launch configurations a GPU would refuse.
#pragma once

#if defined(__CUDACC__)
#error "emu.h is for host compilers only"
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <csetjmp>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define REPKERN_EMU_ASAN 1
#endif

// ---------------------------------------------------------------------------
// Qualifiers and built-in types
// ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// Plain `__shared__` cannot be poisoned between blocks: declare with RK_SHARED (common/macros.h).
#define __shared__ \
  _Pragma("GCC error \"use RK_SHARED(type, name, dims) from common/macros.h instead of __shared__ (the emulator poisons it before each block)\"")
#define __align__(n) alignas(n)

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// ---------------------------------------------------------------------------
// Runtime API subset used by launchers
// ---------------------------------------------------------------------------
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "emulated CUDA error";
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

namespace repkern_emu {

class EmuError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The emulated device: small enough that grid-stride loops really loop in tests.
constexpr int kNumSMs = 4;
constexpr int kWarpSize = 32;
constexpr size_t kDefaultDynamicSmem = 48 * 1024;
constexpr size_t kMaxDynamicSmemOptin = 227 * 1024;

namespace detail {

enum class Wait { Runnable, Barrier, Warp, Done };
enum class Coll { SyncWarp, ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All };

inline const char* coll_name(Coll c) {
  switch (c) {
    case Coll::SyncWarp: return "__syncwarp";
    case Coll::ShflIdx: return "__shfl_sync";
    case Coll::ShflUp: return "__shfl_up_sync";
    case Coll::ShflDown: return "__shfl_down_sync";
    case Coll::ShflXor: return "__shfl_xor_sync";
    case Coll::Ballot: return "__ballot_sync";
    case Coll::Any: return "__any_sync";
    case Coll::All: return "__all_sync";
  }
  return "?";
}

// One barrier or warp-collective call site: a static in a lambda at the call (see
// RK_EMU_SITE), so each template instantiation of the enclosing function has its own.
struct SiteRecord;
struct Site {
  const char* file;
  int line;
  const char* function;  // __PRETTY_FUNCTION__ of the lambda: the enclosing function and its template arguments
  uint64_t launch = 0;           // launch whose record `record` is
  SiteRecord* record = nullptr;  // coverage record of (kernel, this site) for that launch
  constexpr Site(const char* f, int l, const char* fn) : file(f), line(l), function(fn) {}
};

// Passes of one site within one kernel (launch name).
struct SiteRecord {
  std::string kernel;
  const Site* site = nullptr;
  const char* what = "";           // __syncthreads or the collective's name
  uint64_t max_passes = 0;         // most passes by one thread of one block, over all blocks and launches
  uint64_t block = 0;              // block serial that `passes` counts
  std::vector<uint32_t> passes;    // per thread of that block
};

// One static shared array (RK_SHARED): poisoned by the first thread of each block that passes the declaration.
struct SharedRegion {
  const char* file;
  int line;
  const char* name;
  uint64_t block = 0;  // block serial it was last poisoned for
  bool registered = false;
  constexpr SharedRegion(const char* f, int l, const char* n) : file(f), line(l), name(n) {}
};

struct Fiber {
  uint3 thread_idx{};
  int linear = 0, warp = 0, lane = 0;
  Wait wait = Wait::Runnable;
  const char* file = "";
  int line = 0;
  Site* site = nullptr;  // rendezvous it waits at
  // Pending warp collective.
  Coll coll = Coll::SyncWarp;
  unsigned mask = 0;
  int arg = 0;
  int width = kWarpSize;
  size_t bytes = 0;
  alignas(16) unsigned char in[16]{};
  alignas(16) unsigned char out[16]{};
  // Execution context.
  bool started = false;
  jmp_buf resume;
  ucontext_t entry;
  void* asan_fake_stack = nullptr;
  std::string error;
};

struct Stack {
  void* base = nullptr;  // mapping start (guard page)
  void* low = nullptr;   // usable stack start
  size_t size = 0;       // usable bytes
};

// Per-OS-thread emulator state. Launches are serialized by a global mutex.
struct State {
  dim3 grid_dim, block_dim;
  uint3 block_idx{};
  std::vector<Fiber> fibers;
  std::vector<Stack> stacks;
  std::vector<unsigned char> dynamic_smem_storage;
  unsigned char* dynamic_smem = nullptr;
  const std::function<void()>* body = nullptr;
  Fiber* current = nullptr;
  jmp_buf scheduler;
  // Scheduler stack as seen by AddressSanitizer.
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
  void* sched_fake_stack = nullptr;
  std::map<const void*, size_t> dynamic_smem_optin;  // per kernel function
  uint64_t launches = 0;
  // Serials (never reset): launch_serial invalidates Site::record caches, block_serial
  // tells SharedRegion and SiteRecord that a new block began.
  uint64_t launch_serial = 0;
  uint64_t block_serial = 0;
  const char* kernel = "";
  std::map<std::pair<std::string, const Site*>, SiteRecord> coverage;
  std::vector<const SharedRegion*> shared_regions;  // every RK_SHARED array seen, in first-use order
};

inline State& state() {
  static State s;
  return s;
}
inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}
inline Fiber& current() { return *state().current; }

inline std::string where(const char* file, int line) {
  std::ostringstream os;
  os << file << ":" << line;
  return os.str();
}
inline std::string thread_name(const Fiber& f) {
  std::ostringstream os;
  os << "thread (" << f.thread_idx.x << "," << f.thread_idx.y << "," << f.thread_idx.z << ")";
  return os.str();
}
inline std::string block_name() {
  const State& s = state();
  std::ostringstream os;
  os << "block (" << s.block_idx.x << "," << s.block_idx.y << "," << s.block_idx.z << ")";
  return os.str();
}
inline std::string hex(unsigned v) {
  std::ostringstream os;
  os << "0x" << std::hex << v;
  return os.str();
}

// ---- context switching -----------------------------------------------------
// A fiber is entered the first time with setcontext (one syscall per fiber);
// every later switch is a _setjmp/_longjmp pair, which costs no syscall.

inline void asan_start_switch(void** fake_stack_save, const void* bottom, size_t size) {
#if defined(REPKERN_EMU_ASAN)
  __sanitizer_start_switch_fiber(fake_stack_save, bottom, size);
#else
  (void)fake_stack_save, (void)bottom, (void)size;
#endif
}
inline void asan_finish_switch(void* fake_stack_save, const void** bottom_old, size_t* size_old) {
#if defined(REPKERN_EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake_stack_save, bottom_old, size_old);
#else
  (void)fake_stack_save, (void)bottom_old, (void)size_old;
#endif
}

[[noreturn]] inline void fiber_exit_to_scheduler() {
  State& s = state();
  asan_start_switch(nullptr, s.sched_stack_bottom, s.sched_stack_size);
  _longjmp(s.scheduler, 1);
}

inline void fiber_entry() {
  State& s = state();
  asan_finish_switch(nullptr, &s.sched_stack_bottom, &s.sched_stack_size);
  (*s.body)();
  s.current->wait = Wait::Done;
  fiber_exit_to_scheduler();
}

// Called inside a fiber: park it until the scheduler resumes it.
inline void yield_to_scheduler() {
  State& s = state();
  Fiber& f = *s.current;
  asan_start_switch(&f.asan_fake_stack, s.sched_stack_bottom, s.sched_stack_size);
  if (_setjmp(f.resume) == 0) _longjmp(s.scheduler, 1);
  asan_finish_switch(f.asan_fake_stack, nullptr, nullptr);
}

// Called inside a fiber on misuse detected at the call: report and never return.
[[noreturn]] inline void fiber_fail(const std::string& message) {
  Fiber& f = current();
  f.error = message;
  f.wait = Wait::Done;
  fiber_exit_to_scheduler();
}

inline void wait_at(Wait kind, Site& site) {
  Fiber& f = current();
  f.wait = kind;
  f.site = &site;
  f.file = site.file;
  f.line = site.line;
  yield_to_scheduler();
}

// Counts one pass of `f` through the rendezvous it waited at (called when it is released).
inline void record_pass(const Fiber& f, const char* what) {
  State& s = state();
  Site& site = *f.site;
  if (site.launch != s.launch_serial || site.record == nullptr) {
    SiteRecord& rec = s.coverage[{std::string(s.kernel), &site}];
    if (rec.site == nullptr) {
      rec.kernel = s.kernel;
      rec.site = &site;
      rec.what = what;
    }
    site.record = &rec;
    site.launch = s.launch_serial;
  }
  SiteRecord& rec = *site.record;
  if (rec.block != s.block_serial) {
    rec.block = s.block_serial;
    rec.passes.assign(s.fibers.size(), 0);
  }
  const uint32_t n = ++rec.passes[size_t(f.linear)];
  if (n > rec.max_passes) rec.max_passes = n;
}

// Called by the scheduler: run fiber `f` until it parks or finishes.
inline void resume(Fiber& f, const Stack& stack) {
  State& s = state();
  s.current = &f;
  if (_setjmp(s.scheduler) == 0) {
    asan_start_switch(&s.sched_fake_stack, stack.low, stack.size);
    if (!f.started) {
      f.started = true;
      getcontext(&f.entry);
      f.entry.uc_stack.ss_sp = stack.low;
      f.entry.uc_stack.ss_size = stack.size;
      f.entry.uc_link = nullptr;
      makecontext(&f.entry, &fiber_entry, 0);
      setcontext(&f.entry);
    }
    _longjmp(f.resume, 1);
  }
  asan_finish_switch(s.sched_fake_stack, nullptr, nullptr);
  s.current = nullptr;
}

inline size_t stack_bytes() {
#if defined(REPKERN_EMU_ASAN)
  return size_t(1) << 20;  // redzones and fake frames
#else
  return size_t(256) << 10;
#endif
}

inline void ensure_stacks(size_t count) {
  State& s = state();
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  while (s.stacks.size() < count) {
    const size_t usable = stack_bytes();
    void* base = mmap(nullptr, usable + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) throw EmuError("emulator: cannot map a fiber stack");
    mprotect(base, page, PROT_NONE);  // guard page: overflow faults instead of corrupting
    Stack st;
    st.base = base;
    st.low = static_cast<char*>(base) + page;
    st.size = usable;
    s.stacks.push_back(st);
  }
}

// ---- schedules ----------------------------------------------------------------

enum class ScheduleKind { Forward, Reverse, Random };
struct Schedule {
  ScheduleKind kind = ScheduleKind::Forward;
  uint64_t seed = 0;
};

inline Schedule schedule_from_env() {
  const char* env = std::getenv("REPKERN_EMU_SCHEDULE");
  Schedule sch;
  if (env == nullptr || *env == '\0') return sch;
  std::string v(env);
  if (v == "forward") return sch;
  if (v == "reverse") {
    sch.kind = ScheduleKind::Reverse;
    return sch;
  }
  if (v.rfind("random", 0) == 0) {
    sch.kind = ScheduleKind::Random;
    if (v.size() > 6) {
      if (v[6] != ':' || v.size() == 7) throw EmuError("REPKERN_EMU_SCHEDULE: expected random:<seed>, got '" + v + "'");
      char* end = nullptr;
      sch.seed = std::strtoull(v.c_str() + 7, &end, 10);
      if (*end != '\0') throw EmuError("REPKERN_EMU_SCHEDULE: bad seed in '" + v + "'");
    }
    return sch;
  }
  throw EmuError("REPKERN_EMU_SCHEDULE must be forward, reverse or random[:seed], got '" + v + "'");
}

inline void order_indices(std::vector<size_t>& idx, size_t n, const Schedule& sch, std::mt19937_64& rng) {
  idx.resize(n);
  for (size_t i = 0; i < n; ++i) idx[i] = i;
  if (sch.kind == ScheduleKind::Reverse) std::reverse(idx.begin(), idx.end());
  if (sch.kind == ScheduleKind::Random) std::shuffle(idx.begin(), idx.end(), rng);
}

// ---- rendezvous resolution ---------------------------------------------------

inline std::string describe_lane(const Fiber& f) {
  switch (f.wait) {
    case Wait::Done: return "has exited";
    case Wait::Barrier: return "waits at __syncthreads (" + where(f.file, f.line) + ")";
    case Wait::Warp:
      return std::string("waits at ") + coll_name(f.coll) + " (" + where(f.file, f.line) + ") with mask " + hex(f.mask);
    case Wait::Runnable: return "is running";
  }
  return "?";
}

// Completes the warp collective of `group` (all named lanes present and matching).
inline void complete_collective(std::vector<Fiber>& fibers, int warp_base, const Fiber& lead) {
  const unsigned mask = lead.mask;
  unsigned ballot = 0;
  bool any = false, all = true;
  for (int l = 0; l < kWarpSize; ++l) {
    if (!(mask >> l & 1u)) continue;
    const Fiber& f = fibers[size_t(warp_base + l)];
    int pred = 0;
    std::memcpy(&pred, f.in, sizeof(int));
    if (pred) ballot |= 1u << l;
    any = any || pred;
    all = all && pred;
  }
  for (int l = 0; l < kWarpSize; ++l) {
    if (!(mask >> l & 1u)) continue;
    Fiber& f = fibers[size_t(warp_base + l)];
    const int seg = f.lane & ~(f.width - 1);
    const int in_seg = f.lane - seg;
    int src = f.lane;
    switch (lead.coll) {
      case Coll::ShflIdx: src = seg + (f.arg & (f.width - 1)); break;
      case Coll::ShflUp: src = in_seg >= f.arg ? f.lane - f.arg : f.lane; break;
      case Coll::ShflDown: src = in_seg + f.arg < f.width ? f.lane + f.arg : f.lane; break;
      case Coll::ShflXor: {
        const int t = f.lane ^ f.arg;
        src = (t >= 0 && t < seg + f.width) ? t : f.lane;  // later groups return own value
        break;
      }
      default: break;
    }
    switch (lead.coll) {
      case Coll::ShflIdx:
      case Coll::ShflUp:
      case Coll::ShflDown:
      case Coll::ShflXor:
        if (src < 0 || src >= kWarpSize || !(mask >> src & 1u)) {
          std::ostringstream os;
          os << coll_name(lead.coll) << " at " << where(f.file, f.line) << ": lane " << f.lane << " of warp "
             << f.warp << " in " << block_name() << " reads lane " << src << ", which is not in mask "
             << hex(mask) << " (undefined on a GPU)";
          throw EmuError(os.str());
        }
        std::memcpy(f.out, fibers[size_t(warp_base + src)].in, f.bytes);
        break;
      case Coll::Ballot: std::memcpy(f.out, &ballot, sizeof(unsigned)); break;
      case Coll::Any: {
        const int r = any ? 1 : 0;
        std::memcpy(f.out, &r, sizeof(int));
        break;
      }
      case Coll::All: {
        const int r = all ? 1 : 0;
        std::memcpy(f.out, &r, sizeof(int));
        break;
      }
      case Coll::SyncWarp: break;
    }
  }
  for (int l = 0; l < kWarpSize; ++l)
    if (mask >> l & 1u) fibers[size_t(warp_base + l)].wait = Wait::Runnable;
}

// Whether the warp collective that `f` waits at can complete: every lane its mask
// names waits at the same kind of collective with the same mask and operand size
// (else `why` says which lane does not).
inline bool collective_ready(const std::vector<Fiber>& fibers, const Fiber& f, std::string* why) {
  const int n = int(fibers.size());
  const int warp_base = f.warp * kWarpSize;
  for (int l = 0; l < kWarpSize; ++l) {
    if (!(f.mask >> l & 1u)) continue;
    const int t = warp_base + l;
    if (t >= n) {
      if (why) *why = "lane " + std::to_string(l) + " does not exist (the block has " + std::to_string(n) + " threads)";
      return false;
    }
    const Fiber& g = fibers[size_t(t)];
    if (g.wait == Wait::Warp && g.coll == f.coll && g.mask == f.mask && g.bytes == f.bytes) continue;
    if (why) *why = "lane " + std::to_string(l) + " " + describe_lane(g);
    return false;
  }
  return true;
}

// Throws for the first warp collective that can never complete (called when the block is stuck).
inline void report_stuck_collectives(const std::vector<Fiber>& fibers) {
  for (const Fiber& f : fibers) {
    if (f.wait != Wait::Warp) continue;
    std::string why;
    if (collective_ready(fibers, f, &why)) continue;
    std::ostringstream os;
    os << coll_name(f.coll) << " at " << where(f.file, f.line) << " in " << block_name() << ", warp " << f.warp
       << ": mask " << hex(f.mask) << " names lanes that are absent or elsewhere: " << why;
    throw EmuError(os.str());
  }
}

// Whether every thread waits at the same __syncthreads; with `report`, throws when
// some wait at one while others exited or wait elsewhere.
inline bool barrier_ready(const std::vector<Fiber>& fibers, bool report) {
  const Fiber* first = nullptr;
  const Fiber* exited = nullptr;
  const Fiber* elsewhere = nullptr;
  for (const Fiber& f : fibers) {
    if (f.wait == Wait::Barrier) {
      if (first == nullptr) {
        first = &f;
      } else if (f.line != first->line || std::strcmp(f.file, first->file) != 0) {
        elsewhere = elsewhere ? elsewhere : &f;
      }
    } else if (f.wait == Wait::Done) {
      exited = exited ? exited : &f;
    } else {
      elsewhere = elsewhere ? elsewhere : &f;
    }
  }
  if (first == nullptr) return false;
  if (exited == nullptr && elsewhere == nullptr) return true;
  if (!report) return false;
  std::ostringstream os;
  os << "__syncthreads at " << where(first->file, first->line) << " in " << block_name() << ": "
     << thread_name(*first) << " waits there, but ";
  if (elsewhere != nullptr) {
    os << thread_name(*elsewhere) << " " << describe_lane(*elsewhere) << " (a barrier in divergent code)";
  } else {
    os << thread_name(*exited) << " has exited (threads must not exit or branch away while others wait)";
  }
  throw EmuError(os.str());
}

// Runnable fibers as a bit set, picked in schedule order.
class ReadySet {
 public:
  explicit ReadySet(size_t n) : words_((n + 63) / 64, 0) {}
  void set(size_t i) { words_[i / 64] |= uint64_t(1) << (i % 64); }
  void clear(size_t i) { words_[i / 64] &= ~(uint64_t(1) << (i % 64)); }
  // Lowest (forward), highest (reverse) or a random runnable fiber; -1 if none.
  long pick(const Schedule& sch, std::mt19937_64& rng) const {
    if (sch.kind == ScheduleKind::Forward) {
      for (size_t w = 0; w < words_.size(); ++w)
        if (words_[w]) return long(w * 64 + size_t(__builtin_ctzll(words_[w])));
      return -1;
    }
    if (sch.kind == ScheduleKind::Reverse) {
      for (size_t w = words_.size(); w-- > 0;)
        if (words_[w]) return long(w * 64 + 63 - size_t(__builtin_clzll(words_[w])));
      return -1;
    }
    size_t count = 0;
    for (uint64_t word : words_) count += size_t(__builtin_popcountll(word));
    if (count == 0) return -1;
    size_t k = size_t(rng() % count);
    for (size_t w = 0; w < words_.size(); ++w) {
      uint64_t word = words_[w];
      const size_t c = size_t(__builtin_popcountll(word));
      if (k >= c) {
        k -= c;
        continue;
      }
      for (; k > 0; --k) word &= word - 1;  // drop the k lowest set bits
      return long(w * 64 + size_t(__builtin_ctzll(word)));
    }
    return -1;
  }

 private:
  std::vector<uint64_t> words_;
};

inline void run_block(const Schedule& sch, std::mt19937_64& rng) {
  State& s = state();
  ++s.block_serial;
  const size_t nthreads = size_t(s.block_dim.x) * s.block_dim.y * s.block_dim.z;
  s.fibers.assign(nthreads, Fiber{});
  ReadySet ready(nthreads);
  for (size_t t = 0; t < nthreads; ++t) {
    Fiber& f = s.fibers[t];
    f.linear = int(t);
    f.warp = int(t) / kWarpSize;
    f.lane = int(t) % kWarpSize;
    f.thread_idx.x = unsigned(t % s.block_dim.x);
    f.thread_idx.y = unsigned((t / s.block_dim.x) % s.block_dim.y);
    f.thread_idx.z = unsigned(t / (size_t(s.block_dim.x) * s.block_dim.y));
    ready.set(t);
  }
  if (s.dynamic_smem != nullptr) std::memset(s.dynamic_smem, 0xFF, s.dynamic_smem_storage.size() - 16);
  size_t at_barrier = 0, done = 0;
  std::vector<int> warp_waiting((nthreads + kWarpSize - 1) / kWarpSize, 0);  // lanes parked at a collective
  for (;;) {
    const long next = ready.pick(sch, rng);
    if (next < 0) {
      if (done == nthreads) return;
      if (at_barrier == nthreads && barrier_ready(s.fibers, false)) {
        for (size_t t = 0; t < nthreads; ++t) {
          Fiber& f = s.fibers[t];
          record_pass(f, "__syncthreads");
          f.wait = Wait::Runnable;
          ready.set(t);
        }
        at_barrier = 0;
        continue;
      }
      // Stuck: name the first rendezvous that can never complete.
      report_stuck_collectives(s.fibers);
      barrier_ready(s.fibers, true);
      throw EmuError("emulator: block " + block_name() + " cannot make progress");
    }
    Fiber& f = s.fibers[size_t(next)];
    ready.clear(size_t(next));
    resume(f, s.stacks[size_t(next)]);
    if (!f.error.empty()) throw EmuError(f.error);
    if (f.wait == Wait::Done) {
      ++done;
    } else if (f.wait == Wait::Barrier) {
      ++at_barrier;
    } else if (f.wait == Wait::Warp && ++warp_waiting[size_t(f.warp)] >= __builtin_popcount(f.mask) &&
               collective_ready(s.fibers, f, nullptr)) {
      // The last lane arrived: complete now, so the warp runs on before other warps start.
      complete_collective(s.fibers, f.warp * kWarpSize, f);
      for (int l = 0; l < kWarpSize; ++l) {
        if (!(f.mask >> l & 1u)) continue;
        const size_t t = size_t(f.warp * kWarpSize + l);
        record_pass(s.fibers[t], coll_name(f.coll));
        ready.set(t);
        --warp_waiting[size_t(f.warp)];
      }
    }
  }
}

inline void check_launch(const char* name, dim3 grid, dim3 block, size_t smem, const void* func) {
  std::ostringstream os;
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64)
    os << "block (" << block.x << "," << block.y << "," << block.z << ") is not a valid block size";
  else if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    os << "grid (" << grid.x << "," << grid.y << "," << grid.z << ") is not a valid grid size";
  else {
    auto it = state().dynamic_smem_optin.find(func);
    const size_t limit = it == state().dynamic_smem_optin.end() ? kDefaultDynamicSmem : it->second;
    if (smem > limit)
      os << "dynamic shared memory " << smem << " B exceeds " << limit
         << " B (raise cudaFuncAttributeMaxDynamicSharedMemorySize first)";
  }
  if (!os.str().empty()) throw EmuError(std::string("launch of ") + name + ": " + os.str());
}

}  // namespace detail

// Runs `body` as a kernel over grid × block. Throws EmuError on misuse.
inline void launch(const char* name, const void* func, dim3 grid, dim3 block, size_t dynamic_smem,
                   const std::function<void()>& body) {
  using namespace detail;
  std::lock_guard<std::mutex> lock(launch_mutex());
  check_launch(name, grid, block, dynamic_smem, func);
  State& s = state();
  const Schedule sch = schedule_from_env();
  std::mt19937_64 rng(sch.seed * 0x9E3779B97F4A7C15ull + s.launches);
  ++s.launches;
  ++s.launch_serial;
  s.kernel = name;
  s.grid_dim = grid;
  s.block_dim = block;
  s.body = &body;
  s.dynamic_smem_storage.assign(dynamic_smem + 16, 0);
  const uintptr_t raw = reinterpret_cast<uintptr_t>(s.dynamic_smem_storage.data());
  s.dynamic_smem = dynamic_smem ? reinterpret_cast<unsigned char*>((raw + 15) & ~uintptr_t(15)) : nullptr;
  ensure_stacks(size_t(block.x) * block.y * block.z);
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<size_t> blocks;
  order_indices(blocks, size_t(nblocks), sch, rng);
  try {
    for (size_t b : blocks) {
      s.block_idx.x = unsigned(b % grid.x);
      s.block_idx.y = unsigned((b / grid.x) % grid.y);
      s.block_idx.z = unsigned(b / (uint64_t(grid.x) * grid.y));
      run_block(sch, rng);
    }
  } catch (const EmuError& e) {
    s.body = nullptr;
    throw EmuError(std::string("kernel ") + name + ": " + e.what());
  }
  s.body = nullptr;
}

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes).
inline void set_max_dynamic_smem(const void* func, size_t bytes) {
  if (bytes > kMaxDynamicSmemOptin) throw EmuError("dynamic shared memory opt-in above the device limit");
  std::lock_guard<std::mutex> lock(detail::launch_mutex());
  detail::state().dynamic_smem_optin[func] = bytes;
}

// Coverage of the barriers and warp collectives since the last reset: one entry per
// (kernel launch name, call site instantiation).
struct CoverageEntry {
  std::string kernel;      // launch name, e.g. "sparsity_ordered"
  std::string file;        // __FILE__ of the call
  int line = 0;
  std::string what;        // "__syncthreads", "__shfl_sync", ...
  std::string function;    // enclosing function with template arguments (GCC's __PRETTY_FUNCTION__)
  uint64_t max_passes = 0; // most times one thread of one block passed it
};

inline std::vector<CoverageEntry> coverage() {
  std::lock_guard<std::mutex> lock(detail::launch_mutex());
  std::vector<CoverageEntry> out;
  for (const auto& [key, rec] : detail::state().coverage) {
    CoverageEntry e;
    e.kernel = rec.kernel;
    e.file = rec.site->file;
    e.line = rec.site->line;
    e.what = rec.what;
    e.function = rec.site->function;
    e.max_passes = rec.max_passes;
    out.push_back(std::move(e));
  }
  return out;
}

inline void reset_coverage() {
  std::lock_guard<std::mutex> lock(detail::launch_mutex());
  detail::State& s = detail::state();
  s.coverage.clear();
  ++s.launch_serial;  // drops every Site's cached record
}

// The RK_SHARED arrays the emulator has poisoned so far: (file, line, name).
struct SharedRegionInfo {
  std::string file;
  int line = 0;
  std::string name;
};
inline std::vector<SharedRegionInfo> shared_regions() {
  std::lock_guard<std::mutex> lock(detail::launch_mutex());
  std::vector<SharedRegionInfo> out;
  for (const detail::SharedRegion* r : detail::state().shared_regions) out.push_back({r->file, r->line, r->name});
  return out;
}

namespace detail {

inline void sync_threads(Site& site) { wait_at(Wait::Barrier, site); }

inline void check_mask(const char* what, const Site& site, unsigned mask) {
  Fiber& f = current();
  if (!(mask >> f.lane & 1u)) {
    fiber_fail(std::string(what) + " at " + where(site.file, site.line) + ": " + thread_name(f) + " (lane " +
               std::to_string(f.lane) + ") calls it with mask " + hex(mask) + ", which does not include itself");
  }
}

template <typename T>
inline T warp_collective(Site& site, Coll coll, unsigned mask, T value, int arg, int width) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16, "unsupported shuffle type");
  Fiber& f = current();
  check_mask(coll_name(coll), site, mask);
  if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0)
    fiber_fail(std::string(coll_name(coll)) + " at " + where(site.file, site.line) + ": width " +
               std::to_string(width) + " is not a power of two in [1, 32]");
  f.coll = coll;
  f.mask = mask;
  f.arg = arg;
  f.width = width;
  f.bytes = sizeof(T);
  std::memset(f.in, 0, sizeof(f.in));
  std::memcpy(f.in, &value, sizeof(T));
  wait_at(Wait::Warp, site);
  T result;
  std::memcpy(&result, f.out, sizeof(T));
  return result;
}

inline void sync_warp(Site& site, unsigned mask = 0xffffffffu) {
  warp_collective<int>(site, Coll::SyncWarp, mask, 0, 0, kWarpSize);
}

inline unsigned char* dynamic_smem() { return state().dynamic_smem; }

// RK_SHARED: poisons the array when the first thread of a block passes its declaration.
inline void touch_shared(SharedRegion& region, void* p, size_t bytes) {
  State& s = state();
  if (region.block == s.block_serial) return;
  region.block = s.block_serial;
  if (!region.registered) {
    region.registered = true;
    s.shared_regions.push_back(&region);
  }
  std::memset(p, 0xFF, bytes);
}

}  // namespace detail
}  // namespace repkern_emu

// ---------------------------------------------------------------------------
// Built-in variables and intrinsics
// ---------------------------------------------------------------------------
#define threadIdx (static_cast<const uint3&>(::repkern_emu::detail::current().thread_idx))
#define blockIdx (static_cast<const uint3&>(::repkern_emu::detail::state().block_idx))
#define blockDim (static_cast<const dim3&>(::repkern_emu::detail::state().block_dim))
#define gridDim (static_cast<const dim3&>(::repkern_emu::detail::state().grid_dim))
#define warpSize 32

// The call site of a rendezvous: a static Site in a lambda, i.e. one per source
// location and per instantiation of the enclosing template (coverage, messages).
#define RK_EMU_SITE()                                                                            \
  ([]() -> ::repkern_emu::detail::Site& {                                                        \
    static ::repkern_emu::detail::Site rk_emu_site_{__FILE__, __LINE__, __PRETTY_FUNCTION__}; \
    return rk_emu_site_;                                                                         \
  }())

#define __syncthreads() ::repkern_emu::detail::sync_threads(RK_EMU_SITE())
#define __syncwarp(...) ::repkern_emu::detail::sync_warp(RK_EMU_SITE(), ##__VA_ARGS__)
#define __shfl_sync(mask, var, src, ...) \
  ::repkern_emu::detail::shfl(RK_EMU_SITE(), ::repkern_emu::detail::Coll::ShflIdx, mask, var, src, ##__VA_ARGS__)
#define __shfl_up_sync(mask, var, delta, ...) \
  ::repkern_emu::detail::shfl(RK_EMU_SITE(), ::repkern_emu::detail::Coll::ShflUp, mask, var, delta, ##__VA_ARGS__)
#define __shfl_down_sync(mask, var, delta, ...)                                                          \
  ::repkern_emu::detail::shfl(RK_EMU_SITE(), ::repkern_emu::detail::Coll::ShflDown, mask, var, delta, \
                              ##__VA_ARGS__)
#define __shfl_xor_sync(mask, var, lane_mask, ...)                                                          \
  ::repkern_emu::detail::shfl(RK_EMU_SITE(), ::repkern_emu::detail::Coll::ShflXor, mask, var, lane_mask, \
                              ##__VA_ARGS__)
#define __ballot_sync(mask, pred) \
  ::repkern_emu::detail::vote<unsigned>(RK_EMU_SITE(), ::repkern_emu::detail::Coll::Ballot, mask, pred)
#define __any_sync(mask, pred) \
  ::repkern_emu::detail::vote<int>(RK_EMU_SITE(), ::repkern_emu::detail::Coll::Any, mask, pred)
#define __all_sync(mask, pred) \
  ::repkern_emu::detail::vote<int>(RK_EMU_SITE(), ::repkern_emu::detail::Coll::All, mask, pred)

namespace repkern_emu {
namespace detail {
template <typename T>
inline T shfl(Site& site, Coll coll, unsigned mask, T var, int arg, int width = kWarpSize) {
  return warp_collective<T>(site, coll, mask, var, arg, width);
}
template <typename R>
inline R vote(Site& site, Coll coll, unsigned mask, int pred) {
  const int r = warp_collective<int>(site, coll, mask, pred != 0 ? 1 : 0, 0, kWarpSize);
  R out;
  std::memcpy(&out, &r, sizeof(R));
  return out;
}
}  // namespace detail
}  // namespace repkern_emu

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
inline int __float_as_int(float x) {
  int u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float __int_as_float(int u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// Atomics. Fibers switch only at rendezvous points, so these never race; they
// go through std::atomic_ref so that sanitizers see them as atomic operations.
template <typename T>
inline T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
template <typename T>
inline T atomicSub(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_sub(value);
}
template <typename T>
inline T atomicExch(T* address, T value) {
  return std::atomic_ref<T>(*address).exchange(value);
}
template <typename T>
inline T atomicCAS(T* address, T compare, T value) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
  return compare;
}
template <typename T>
inline T atomicMax(T* address, T value) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (old < value && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}
template <typename T>
inline T atomicMin(T* address, T value) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (value < old && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}
template <typename T>
inline T atomicOr(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_or(value);
}
template <typename T>
inline T atomicAnd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_and(value);
}

template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize)
    ::repkern_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(func), size_t(value));
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = ::repkern_emu::kNumSMs; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = int(::repkern_emu::kDefaultDynamicSmem); break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = int(::repkern_emu::kMaxDynamicSmemOptin); break;
  }
  return cudaSuccess;
}
