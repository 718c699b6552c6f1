// CPU kernels of the masked-subnet op family (OpenMP via at::parallel_for).
#pragma once
#include <ATen/ATen.h>
#include <tuple>

namespace tinymem::cpu {

std::tuple<at::Tensor, at::Tensor> subnet_threshold(const at::Tensor& scores, int64_t k);
at::Tensor subnet_masked_weight(const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& value,
                                const at::Tensor& cut);
at::Tensor subnet_ste_grad(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& scores);
void subnet_sgd_step_(at::Tensor& scores, const at::Tensor& grad, at::Tensor& momentum_buffer, double lr,
                      double momentum, double weight_decay, bool maximize);

}  // namespace tinymem::cpu
