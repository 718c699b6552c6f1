// Run-time choice of the CPU kernels' instruction-set engine. The extension is built for a baseline
// x86-64, so memscore.cpp and causal_attention.cpp compile their engines three times (AVX-512, AVX2+FMA,
// portable) and head_screen.cpp adds an AVX512-BF16 screen; all dispatch on one level, chosen here.
//
// TINYMEM_CPU_ISA=generic|avx2|avx512|avx512_bf16 asks for a level; a request above what this CPU has is
// capped at the CPU's best (so one setting works across a mixed fleet; `tinymem info` shows the cap).
// Tests run every kernel under each level the machine has, so a developer on one CPU exercises the
// engines another CPU would pick.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string>

namespace tinymem::cpu::cpu_isa {

enum Level : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

inline const char* name(int level) {
  switch (level) {
    case kAvx512Bf16: return "avx512_bf16";
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "generic";
  }
}

// kAvx512 = AVX-512 F, BW, DQ, VL; kAvx2 = AVX2+FMA (every such CPU also has F16C)
inline int best() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const int level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
      return __builtin_cpu_supports("avx512bf16") ? int(kAvx512Bf16) : int(kAvx512);
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return int(kAvx2);
    return int(kGeneric);
  }();
  return level;
#else
  return kGeneric;
#endif
}

// The level TINYMEM_CPU_ISA asks for (-1 when unset); an unknown name is an error.
inline int requested() {
  const char* env = std::getenv("TINYMEM_CPU_ISA");
  if (env == nullptr || *env == '\0') return -1;
  const std::string want(env);
  for (int level = kGeneric; level <= kAvx512Bf16; ++level)
    if (want == name(level)) return level;
  TORCH_CHECK(false, "TINYMEM_CPU_ISA must be generic, avx2, avx512 or avx512_bf16, got '", want, "'");
  return -1;
}

// Read on every call (a getenv), so tests and users can switch levels inside one process.
inline int chosen() {
  const int want = requested();
  return want < 0 ? best() : std::min(want, best());
}

}  // namespace tinymem::cpu::cpu_isa
