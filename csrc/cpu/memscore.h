// CPU kernels of the memscore op family (fused lm_head + argmax/NLL; see tinymem_fast/ops/memscore.py).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace tinymem::cpu {

// hidden [M, d], weight [V, d] (same float dtype, contiguous), bias [V] or none, targets [M] int64.
// Returns (match bool [M], nll float32 [M]; zeros when need_nll is false).
std::tuple<at::Tensor, at::Tensor> memscore(const at::Tensor& hidden, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                                            bool need_nll, bool early_exit, int64_t chunk_size);

// argmax over V of the rounded logits of hidden [N, d]: int64 [N].
at::Tensor lm_head_argmax(const at::Tensor& hidden, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, int64_t chunk_size);

}  // namespace tinymem::cpu
