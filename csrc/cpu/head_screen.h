// Greedy-decoding LM head on AVX-512-BF16 CPUs: screen every logit in bf16, then decide the argmax
// exactly in float32 (see head_screen.cpp and tinymem_fast/ops/memscore.py).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace tinymem::cpu {

// The CPU has AVX512F/BW/VL and AVX512_BF16 (the screened op refuses to run otherwise).
bool head_screen_supported();

// Supported, and the ISA level in force (TINYMEM_CPU_ISA) is avx512_bf16: callers pick the screen only then.
bool head_screen_available();

// weight float32 [V, d] -> (packed bfloat16 [ceil(V/16), ceil(d/2), 32], wnorm float32 [V] = ||W[v]||_2
// rounded up). Built once per weight and reused by every lm_head_argmax_screened call.
std::tuple<at::Tensor, at::Tensor> pack_head_bf16(const at::Tensor& weight);

// The same int64 [M] as lm_head_argmax(hidden, weight, bias, 0) for float32 inputs, bit for bit.
at::Tensor lm_head_argmax_screened(const at::Tensor& hidden, const at::Tensor& weight,
                                   const at::Tensor& packed, const at::Tensor& wnorm,
                                   const std::optional<at::Tensor>& bias);

// Counters since load (or the last reset): [calls, rows screened, exact candidate logits, rows that fell
// back to the float32 kernel].
std::vector<int64_t> head_screen_stats(bool reset);

}  // namespace tinymem::cpu
