// Which copy of the CPU kernels runs (isa.h). Compiled once, with the compiler's default target, so that
// it runs on every CPU the module can be loaded on.
#include "cpu/isa.h"

#include <cstdlib>
#include <iterator>
#include <stdexcept>
#include <string>

namespace repkern::cpu {
namespace {

#if defined(REPKERN_CPU_NATIVE)
constexpr Isa kCompiled[] = {Isa::Native};
#elif defined(REPKERN_CPU_X86_LEVELS)
constexpr Isa kCompiled[] = {Isa::Baseline, Isa::Avx2, Isa::Avx512};
#else
constexpr Isa kCompiled[] = {Isa::Baseline};
#endif

bool cpu_runs(Isa isa) {
#if defined(REPKERN_CPU_X86_LEVELS)
  // libgcc / compiler-rt check the CPUID bits and that the OS saves the AVX / AVX-512 registers.
  __builtin_cpu_init();
  switch (isa) {
    case Isa::Baseline:
      return __builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("ssse3");
    case Isa::Avx2:
      return cpu_runs(Isa::Baseline) && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
    case Isa::Avx512:
      return cpu_runs(Isa::Avx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vl");
    case Isa::Native: return false;
  }
  return false;
#else
  // One copy: the baseline of a non-x86 target, or the build machine's own (REPKERN_CPU_ARCH).
  return isa == kCompiled[0];
#endif
}

int index_of(Isa isa) {
  for (size_t i = 0; i < std::size(kCompiled); ++i)
    if (kCompiled[i] == isa) return int(i);
  return -1;
}

template <typename Levels>
std::string names_of(const Levels& levels) {
  std::string names;
  for (Isa isa : levels) names += std::string(names.empty() ? "" : ", ") + isa_name(isa);
  return names.empty() ? "none" : names;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Baseline: return "baseline";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    case Isa::Native: return "native";
  }
  return "?";
}

std::vector<Isa> compiled_isas() { return {std::begin(kCompiled), std::end(kCompiled)}; }

std::vector<Isa> supported_isas() {
  static const std::vector<Isa> supported = [] {
    std::vector<Isa> levels;
    for (Isa isa : kCompiled)
      if (cpu_runs(isa)) levels.push_back(isa);
    return levels;
  }();
  return supported;
}

Isa selected_isa() { return kCompiled[selected_isa_index()]; }

int selected_isa_index() {
  const char* env = std::getenv("REPKERN_CPU_ISA");
  const std::vector<Isa> supported = supported_isas();
  if (env == nullptr || *env == '\0') {
    if (supported.empty())
      throw std::invalid_argument(std::string("this CPU cannot run the CPU kernels of this build (levels: ") +
                                  names_of(kCompiled) + "; the baseline needs SSE4.2 and POPCNT)");
    return index_of(supported.back());
  }
  const std::string want(env);
  for (Isa isa : {Isa::Baseline, Isa::Avx2, Isa::Avx512, Isa::Native}) {
    if (want != isa_name(isa)) continue;
    const int index = index_of(isa);
    if (index < 0)
      throw std::invalid_argument("REPKERN_CPU_ISA=" + want + ": this build has the levels " + names_of(kCompiled) +
                                  (isa == Isa::Native ? " (native: only in builds with REPKERN_CPU_ARCH set)"
                                                      : " (x86-64 builds without REPKERN_CPU_ARCH have them all)"));
    for (Isa s : supported)
      if (s == isa) return index;
    throw std::invalid_argument("REPKERN_CPU_ISA=" + want +
                                ": this CPU does not support it (supported: " + names_of(supported) + ")");
  }
  throw std::invalid_argument("REPKERN_CPU_ISA must be one of baseline, avx2, avx512, native (or unset), got '" + want +
                              "'");
}

const char* cpu_build_arch() { return REPKERN_CPU_BUILD_ARCH; }

}  // namespace repkern::cpu
