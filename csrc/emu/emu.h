// CUDA execution-model emulator: lets g++ compile the project's .cu kernel
// sources unchanged and run them on the CPU (module repkern._emu), so that CI
// without a GPU still executes every kernel. See docs/design.md (the emulator).
//
// Model:
//  * blocks run one after another (order set by the schedule); the threads of a
//    block are fibers on the calling OS thread. A fiber runs until it reaches a
//    rendezvous (__syncthreads, __syncwarp, warp shuffles/votes) or returns.
//  * schedules (env REPKERN_EMU_SCHEDULE, read at every launch):
//      forward | reverse | random[:seed]
//    set the order in which runnable fibers (and blocks) are resumed, because a
//    missing barrier often passes in one order and fails in another.
//  * static __shared__ variables are function-local statics: shared by the
//    threads of the running block, persisting between blocks (not poisoned: GCC
//    gives template statics their own COMDAT sections, so they cannot be found).
//    Dynamic shared memory is poisoned with 0xFF bytes (NaN / -1) before each block.
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
#define __shared__ static
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

struct Fiber {
  uint3 thread_idx{};
  int linear = 0, warp = 0, lane = 0;
  Wait wait = Wait::Runnable;
  const char* file = "";
  int line = 0;
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

inline void wait_at(Wait kind, const char* file, int line) {
  Fiber& f = current();
  f.wait = kind;
  f.file = file;
  f.line = line;
  yield_to_scheduler();
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

// Releases every warp collective whose named lanes have all arrived at the same
// collective with the same mask. With `report`, throws for the first one that
// can never complete.
inline bool resolve_collectives(std::vector<Fiber>& fibers, bool report) {
  bool released = false;
  const int n = int(fibers.size());
  for (int i = 0; i < n; ++i) {
    Fiber& f = fibers[size_t(i)];
    if (f.wait != Wait::Warp) continue;
    const int warp_base = f.warp * kWarpSize;
    bool complete = true;
    std::string why;
    for (int l = 0; l < kWarpSize && complete; ++l) {
      if (!(f.mask >> l & 1u)) continue;
      const int t = warp_base + l;
      if (t >= n) {
        complete = false;
        why = "lane " + std::to_string(l) + " does not exist (the block has " + std::to_string(n) + " threads)";
        break;
      }
      const Fiber& g = fibers[size_t(t)];
      if (g.wait == Wait::Warp && g.coll == f.coll && g.mask == f.mask && g.bytes == f.bytes) continue;
      complete = false;
      why = "lane " + std::to_string(l) + " " + describe_lane(g);
    }
    if (complete) {
      complete_collective(fibers, warp_base, f);
      released = true;
    } else if (report) {
      std::ostringstream os;
      os << coll_name(f.coll) << " at " << where(f.file, f.line) << " in " << block_name() << ", warp " << f.warp
         << ": mask " << hex(f.mask) << " names lanes that are absent or elsewhere: " << why;
      throw EmuError(os.str());
    }
  }
  return released;
}

// Releases __syncthreads when every live thread has arrived at the same one.
inline bool resolve_barrier(std::vector<Fiber>& fibers, bool report) {
  const Fiber* first = nullptr;
  const Fiber* exited = nullptr;
  const Fiber* elsewhere = nullptr;
  for (const Fiber& f : fibers) {
    if (f.wait == Wait::Barrier) {
      if (first == nullptr) {
        first = &f;
      } else if (f.line != first->line || std::strcmp(f.file, first->file) != 0) {
        elsewhere = &f;
      }
    } else if (f.wait == Wait::Done) {
      exited = exited ? exited : &f;
    } else {
      if (!report) return false;
      elsewhere = elsewhere ? elsewhere : &f;
    }
  }
  if (first == nullptr) return false;
  if (exited == nullptr && elsewhere == nullptr) {
    for (Fiber& f : fibers) f.wait = Wait::Runnable;
    return true;
  }
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

inline void run_block(const Schedule& sch, std::mt19937_64& rng) {
  State& s = state();
  const size_t nthreads = size_t(s.block_dim.x) * s.block_dim.y * s.block_dim.z;
  s.fibers.assign(nthreads, Fiber{});
  for (size_t t = 0; t < nthreads; ++t) {
    Fiber& f = s.fibers[t];
    f.linear = int(t);
    f.warp = int(t) / kWarpSize;
    f.lane = int(t) % kWarpSize;
    f.thread_idx.x = unsigned(t % s.block_dim.x);
    f.thread_idx.y = unsigned((t / s.block_dim.x) % s.block_dim.y);
    f.thread_idx.z = unsigned(t / (size_t(s.block_dim.x) * s.block_dim.y));
  }
  if (s.dynamic_smem != nullptr) std::memset(s.dynamic_smem, 0xFF, s.dynamic_smem_storage.size() - 16);
  std::vector<size_t> order;
  for (;;) {
    bool ran = false;
    order_indices(order, nthreads, sch, rng);
    for (size_t i : order) {
      Fiber& f = s.fibers[i];
      if (f.wait != Wait::Runnable) continue;
      resume(f, s.stacks[i]);
      ran = true;
      if (!f.error.empty()) throw EmuError(f.error);
    }
    bool all_done = true;
    for (const Fiber& f : s.fibers) all_done = all_done && f.wait == Wait::Done;
    if (all_done) return;
    bool released = resolve_collectives(s.fibers, false);
    released = resolve_barrier(s.fibers, false) || released;
    if (!ran && !released) {
      // Stuck: name the first rendezvous that can never complete.
      resolve_collectives(s.fibers, true);
      resolve_barrier(s.fibers, true);
      throw EmuError("emulator: block " + block_name() + " cannot make progress");
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

namespace detail {

inline void sync_threads(const char* file, int line) { wait_at(Wait::Barrier, file, line); }

inline void check_mask(const char* what, const char* file, int line, unsigned mask) {
  Fiber& f = current();
  if (!(mask >> f.lane & 1u)) {
    fiber_fail(std::string(what) + " at " + where(file, line) + ": " + thread_name(f) + " (lane " +
               std::to_string(f.lane) + ") calls it with mask " + hex(mask) + ", which does not include itself");
  }
}

template <typename T>
inline T warp_collective(const char* file, int line, Coll coll, unsigned mask, T value, int arg, int width) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16, "unsupported shuffle type");
  Fiber& f = current();
  check_mask(coll_name(coll), file, line, mask);
  if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0)
    fiber_fail(std::string(coll_name(coll)) + " at " + where(file, line) + ": width " + std::to_string(width) +
               " is not a power of two in [1, 32]");
  f.coll = coll;
  f.mask = mask;
  f.arg = arg;
  f.width = width;
  f.bytes = sizeof(T);
  std::memset(f.in, 0, sizeof(f.in));
  std::memcpy(f.in, &value, sizeof(T));
  wait_at(Wait::Warp, file, line);
  T result;
  std::memcpy(&result, f.out, sizeof(T));
  return result;
}

inline void sync_warp(const char* file, int line, unsigned mask = 0xffffffffu) {
  warp_collective<int>(file, line, Coll::SyncWarp, mask, 0, 0, kWarpSize);
}

inline unsigned char* dynamic_smem() { return state().dynamic_smem; }

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

#define __syncthreads() ::repkern_emu::detail::sync_threads(__FILE__, __LINE__)
#define __syncwarp(...) ::repkern_emu::detail::sync_warp(__FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_sync(mask, var, src, ...)                                                                   \
  ::repkern_emu::detail::shfl(__FILE__, __LINE__, ::repkern_emu::detail::Coll::ShflIdx, mask, var, src, \
                              ##__VA_ARGS__)
#define __shfl_up_sync(mask, var, delta, ...)                                                             \
  ::repkern_emu::detail::shfl(__FILE__, __LINE__, ::repkern_emu::detail::Coll::ShflUp, mask, var, delta, \
                              ##__VA_ARGS__)
#define __shfl_down_sync(mask, var, delta, ...)                                                             \
  ::repkern_emu::detail::shfl(__FILE__, __LINE__, ::repkern_emu::detail::Coll::ShflDown, mask, var, delta, \
                              ##__VA_ARGS__)
#define __shfl_xor_sync(mask, var, lane_mask, ...)                                                             \
  ::repkern_emu::detail::shfl(__FILE__, __LINE__, ::repkern_emu::detail::Coll::ShflXor, mask, var, lane_mask, \
                              ##__VA_ARGS__)
#define __ballot_sync(mask, pred) \
  ::repkern_emu::detail::vote<unsigned>(__FILE__, __LINE__, ::repkern_emu::detail::Coll::Ballot, mask, pred)
#define __any_sync(mask, pred) \
  ::repkern_emu::detail::vote<int>(__FILE__, __LINE__, ::repkern_emu::detail::Coll::Any, mask, pred)
#define __all_sync(mask, pred) \
  ::repkern_emu::detail::vote<int>(__FILE__, __LINE__, ::repkern_emu::detail::Coll::All, mask, pred)

namespace repkern_emu {
namespace detail {
template <typename T>
inline T shfl(const char* file, int line, Coll coll, unsigned mask, T var, int arg, int width = kWarpSize) {
  return warp_collective<T>(file, line, coll, mask, var, arg, width);
}
template <typename R>
inline R vote(const char* file, int line, Coll coll, unsigned mask, int pred) {
  const int r = warp_collective<int>(file, line, coll, mask, pred != 0 ? 1 : 0, 0, kWarpSize);
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
