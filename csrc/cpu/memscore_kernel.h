// Raw-pointer interface between the torch glue of the CPU memscore op (memscore.cpp) and its per-ISA
// bodies (memscore_body.inc, compiled once per instruction set). No torch types here.
#pragma once
#include <cstdint>

namespace tinymem::cpu::memscore_detail {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// One scoring call over M flat rows. See tinymem_fast/ops/memscore.py for the semantics.
struct Problem {
  const void* hidden;   // [M, d] in `dtype` (fp16/bf16 as raw 16-bit words)
  const void* weight;   // [V, d] in `dtype`
  const float* bias32;  // [V] bias converted to float32, or nullptr
  const int64_t* targets;  // [M] ids in [0, V), or nullptr (argmax only)
  int dtype;
  int64_t M, d, V;
  bool need_nll, early_exit;
  int64_t chunk;  // vocab columns per tile; 0 = default
  // outputs (any may be nullptr)
  uint8_t* match;   // [M] argmax == target
  float* nll;       // [M]
  int64_t* argmax;  // [M]
};

}  // namespace tinymem::cpu::memscore_detail
