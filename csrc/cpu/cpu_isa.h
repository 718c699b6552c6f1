// Run-time choice of the CPU kernels' instruction-set engine. The extension is built for a baseline
// x86-64, so memscore.cpp and causal_attention.cpp compile their engines three times (AVX-512, AVX2+FMA,
// portable) and dispatch on this level; TINYMEM_CPU_ISA=avx512|avx2|generic forces a lower one (tests).
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace tinymem::cpu::cpu_isa {

// 2 = AVX-512 (F, BW, DQ, VL), 1 = AVX2+FMA (every such CPU also has F16C), 0 = portable
inline int best() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const int level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
      return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
  }();
  return level;
#else
  return 0;
#endif
}

inline int chosen() {
  const int top = best();
  const char* env = std::getenv("TINYMEM_CPU_ISA");
  if (env == nullptr || *env == '\0') return top;
  const std::string want(env);
  const int level = want == "avx512" ? 2 : want == "avx2" ? 1 : want == "generic" ? 0 : -1;
  TORCH_CHECK(level >= 0, "TINYMEM_CPU_ISA must be avx512, avx2 or generic, got '", want, "'");
  TORCH_CHECK(level <= top, "TINYMEM_CPU_ISA=", want, " but this CPU does not support it");
  return level;
}

}  // namespace tinymem::cpu::cpu_isa
