// CPU kernels of the fused linear + cross-entropy op (semantics: tinymem_fast/ops/linear_cross_entropy.py).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace tinymem::cpu {

// hidden [N, d], weight [V, d] (one float dtype), bias [V] or none, targets [N] int64.
// reduction: 0 none, 1 mean, 2 sum. Returns (loss: float32 [N] for none, else 0-dim; lse float32 [N];
// grad_hidden, grad_weight (float32 heads only), grad_bias float32 [V]: the gradients of a unit upstream
// gradient for mean/sum, as asked by need_*, empty tensors otherwise).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, int64_t ignore_index, double label_smoothing, int64_t reduction, bool need_hidden,
    bool need_weight, bool need_bias, int64_t chunk_rows);

// Gradients for the upstream gradient `grad` (float32 [N] for reduction none, 0-dim otherwise), the logits
// recomputed from the forward's lse. Returns (grad_hidden, grad_weight, grad_bias float32), empty where not
// asked for.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_bwd(
    const at::Tensor& grad, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse,
    int64_t ignore_index, double label_smoothing, int64_t reduction, bool need_hidden, bool need_weight,
    bool need_bias, int64_t chunk_rows);

}  // namespace tinymem::cpu
