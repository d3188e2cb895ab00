// Instruction-set levels of the CPU kernels.
//
// A portable build compiles every csrc/cpu/<op>.cpp once per level, each copy in its own namespace
// repkern::cpu::<level> (CMake defines REPKERN_ISA_NS), and picks one copy at run time:
//   baseline  -march=x86-64-v2 (SSE4.2): any x86-64 CPU of the last 15 years; the only level elsewhere
//   avx2      -march=x86-64-v3 (AVX2, FMA, BMI2, F16C)
//   avx512    -march=x86-64-v4 (AVX-512 F/BW/CD/DQ/VL)
// REPKERN_CPU_ARCH=<arch> at build time compiles one copy with -march=<arch> instead, named `native`
// (it runs where the build machine's CPU runs: no dispatch, no portability).
//
// The environment variable REPKERN_CPU_ISA (baseline | avx2 | avx512 | native; unset or empty: the best
// level this CPU runs) forces a level. It is read at every kernel call, as REPKERN_BACKEND is, so tests
// can switch levels; a level that is unknown, not compiled or not supported by this CPU is an error naming
// the variable.
//
// Each level's objects are linked into one relocatable object whose symbols outside repkern::cpu::<level>
// are made local (CMakeLists.txt): template and inline functions from shared headers and the standard
// library are compiled once per level, and the linker must not pick, say, the AVX-512 copy of
// std::vector's growth path for the baseline kernels.
#pragma once

#include <string>
#include <vector>

namespace repkern::cpu {

enum class Isa : int { Baseline = 0, Avx2 = 1, Avx512 = 2, Native = 3 };

const char* isa_name(Isa isa);
// Levels in this build, lowest first.
std::vector<Isa> compiled_isas();
// Compiled levels this CPU can run (its instructions and the operating system's register state).
std::vector<Isa> supported_isas();
// REPKERN_CPU_ISA, or the best supported level; throws std::invalid_argument naming the variable.
Isa selected_isa();
// What the build compiled the levels for: "x86-64-v2" (the portable baseline), or REPKERN_CPU_ARCH.
const char* cpu_build_arch();

// Position of the selected level in compiled_isas(): the index into a kernel's per-level copies.
int selected_isa_index();

}  // namespace repkern::cpu

// Declares a kernel's copies, one per compiled level: REPKERN_CPU_ISA_NAMESPACES(void f(int);).
#if defined(REPKERN_CPU_NATIVE)
#define REPKERN_CPU_ISA_NAMESPACES(...) \
  namespace native {                    \
  __VA_ARGS__                           \
  }
#define REPKERN_CPU_ISA_COPIES(name) &native::name
#elif defined(REPKERN_CPU_X86_LEVELS)
#define REPKERN_CPU_ISA_NAMESPACES(...) \
  namespace baseline {                  \
  __VA_ARGS__                           \
  }                                     \
  namespace avx2 {                      \
  __VA_ARGS__                           \
  }                                     \
  namespace avx512 {                    \
  __VA_ARGS__                           \
  }
#define REPKERN_CPU_ISA_COPIES(name) &baseline::name, &avx2::name, &avx512::name
#else
#define REPKERN_CPU_ISA_NAMESPACES(...) \
  namespace baseline {                  \
  __VA_ARGS__                           \
  }
#define REPKERN_CPU_ISA_COPIES(name) &baseline::name
#endif

namespace repkern::cpu {
template <typename F, typename... More>
F isa_copy(F first, More... more) {
  const F copies[] = {first, more...};
  return copies[selected_isa_index()];
}
}  // namespace repkern::cpu

// Declares CPU kernel `name` (launcher signature: const Params&, thread count): one copy per compiled
// level, and repkern::cpu::name, which runs the selected level's copy.
#define REPKERN_CPU_KERNEL(name, Params)                                    \
  REPKERN_CPU_ISA_NAMESPACES(void name(const Params& p, int num_threads);)  \
  inline void name(const Params& p, int num_threads) {                      \
    ::repkern::cpu::isa_copy(REPKERN_CPU_ISA_COPIES(name))(p, num_threads); \
  }
