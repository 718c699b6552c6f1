// CUDA implementations of the masked-subnet ops (schemas: csrc/registration.cpp; semantics:
// tinymem_fast/ops/masked_subnet.py). Tensor checks, allocation, device guard and stream live here; the
// kernels (masked_subnet.cu) see raw pointers only.
//
// Every tensor argument must be contiguous (the Python layer passes .contiguous() tensors; flat
// indices are those of the row-major order). Nothing here synchronises with the host.
#ifdef TINYMEM_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "masked_subnet_kernels.h"

namespace tinymem {
namespace cuda_impl {
namespace {

using gpu::FloatType;

FloatType float_type(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return FloatType::kFloat32;
    case at::kHalf: return FloatType::kFloat16;
    case at::kBFloat16: return FloatType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "tinymem::", op, ": ", name, " must be float32, float16 or bfloat16 on CUDA, got ",
              t.scalar_type());
  return FloatType::kFloat32;  // not reached
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), "tinymem::", op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.is_cuda(), "tinymem::", op, ": ", name, " must be a CUDA tensor, got a tensor on device ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), "tinymem::", op, ": ", name, " must be contiguous");
}

// `t` on the same device and with the same shape as `ref`
void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                const char* op) {
  check_cuda(t, op, name);
  TORCH_CHECK(t.device() == ref.device(), "tinymem::", op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
  TORCH_CHECK(t.sizes() == ref.sizes(), "tinymem::", op, ": ", name, " has shape ", t.sizes(), " but ",
              ref_name, " has shape ", ref.sizes(), "; they must match");
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "tinymem::", op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> subnet_threshold(const at::Tensor& scores, int64_t k) {
  constexpr const char* op = "subnet_threshold";
  check_cuda(scores, op, "scores");
  const FloatType st = float_type(scores, op, "scores");
  const int64_t n = scores.numel();
  TORCH_CHECK(n > 0, "tinymem::", op, ": scores is empty");
  TORCH_CHECK(k >= 0 && k < n, "tinymem::", op, ": k must satisfy 0 <= k < numel = ", n, ", got ", k);

  c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor value = at::empty({}, scores.options().dtype(at::kFloat));
  at::Tensor cut = at::empty({}, scores.options().dtype(at::kLong));
  if (k == 0) {  // nothing dropped: the (0, 0) threshold keeps everything
    value.zero_();
    cut.zero_();
    return {value, cut};
  }
  at::Tensor workspace =
      at::empty({gpu::subnet_threshold_workspace_bytes(n)}, scores.options().dtype(at::kByte));
  check_launch(gpu::subnet_threshold_launch(scores.data_ptr(), st, n, k, workspace.data_ptr(),
                                            value.data_ptr<float>(), cut.data_ptr<int64_t>(),
                                            c10::cuda::getCurrentCUDAStream().stream()),
               op);
  // the workspace is freed when this returns: the caching allocator hands it out again only to work
  // ordered after the kernels above on this stream
  return {value, cut};
}

at::Tensor subnet_masked_weight(const at::Tensor& weight, const at::Tensor& scores,
                                const at::Tensor& value, const at::Tensor& cut) {
  constexpr const char* op = "subnet_masked_weight";
  check_cuda(weight, op, "weight");
  const FloatType wt = float_type(weight, op, "weight");
  check_like(scores, "scores", weight, "weight", op);
  const FloatType st = float_type(scores, op, "scores");
  check_cuda(value, op, "value");
  check_cuda(cut, op, "cut");
  TORCH_CHECK(value.device() == weight.device() && cut.device() == weight.device(), "tinymem::", op,
              ": value and cut must be on the weight's device ", weight.device(), ", got ", value.device(),
              " and ", cut.device());
  TORCH_CHECK(value.scalar_type() == at::kFloat && value.numel() == 1, "tinymem::", op,
              ": value must be a one-element float32 tensor, got ", value.scalar_type(), " with ",
              value.numel(), " elements");
  TORCH_CHECK(cut.scalar_type() == at::kLong && cut.numel() == 1, "tinymem::", op,
              ": cut must be a one-element int64 tensor, got ", cut.scalar_type(), " with ", cut.numel(),
              " elements");

  c10::cuda::CUDAGuard guard(weight.device());
  at::Tensor out = at::empty(weight.sizes(), weight.options());
  const int64_t n = weight.numel();
  if (n == 0) return out;
  check_launch(gpu::subnet_masked_weight_launch(weight.data_ptr(), wt, scores.data_ptr(), st,
                                                value.data_ptr<float>(), cut.data_ptr<int64_t>(),
                                                out.data_ptr(), n, c10::cuda::getCurrentCUDAStream().stream()),
               op);
  return out;
}

at::Tensor subnet_ste_grad(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& scores) {
  constexpr const char* op = "subnet_ste_grad";
  check_cuda(grad, op, "grad");
  const FloatType gt = float_type(grad, op, "grad");
  check_like(weight, "weight", grad, "grad", op);
  const FloatType wt = float_type(weight, op, "weight");
  check_like(scores, "scores", grad, "grad", op);
  const FloatType st = float_type(scores, op, "scores");

  c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor out = at::empty(scores.sizes(), scores.options());
  const int64_t n = scores.numel();
  if (n == 0) return out;
  check_launch(gpu::subnet_ste_grad_launch(grad.data_ptr(), gt, weight.data_ptr(), wt, scores.data_ptr(), st,
                                           out.data_ptr(), n, c10::cuda::getCurrentCUDAStream().stream()),
               op);
  return out;
}

// mutable arguments as at::Tensor&: every backend's kernel of an op must have the same C++ signature
void subnet_sgd_step_(at::Tensor& scores, const at::Tensor& grad, at::Tensor& momentum_buffer, double lr,
                      double momentum, double weight_decay, bool maximize) {
  constexpr const char* op = "subnet_sgd_step_";
  check_cuda(scores, op, "scores");
  const FloatType st = float_type(scores, op, "scores");
  check_like(grad, "grad", scores, "scores", op);
  const FloatType gt = float_type(grad, op, "grad");
  check_like(momentum_buffer, "momentum_buffer", scores, "scores", op);
  TORCH_CHECK(momentum_buffer.scalar_type() == at::kFloat, "tinymem::", op,
              ": momentum_buffer must be float32, got ", momentum_buffer.scalar_type());

  c10::cuda::CUDAGuard guard(scores.device());
  const int64_t n = scores.numel();
  if (n == 0) return;
  check_launch(gpu::subnet_sgd_step_launch(scores.data_ptr(), st, grad.data_ptr(), gt,
                                           momentum_buffer.data_ptr<float>(), n, static_cast<float>(lr),
                                           static_cast<float>(momentum), static_cast<float>(weight_decay),
                                           maximize, c10::cuda::getCurrentCUDAStream().stream()),
               op);
}

}  // namespace
}  // namespace cuda_impl
}  // namespace tinymem

TORCH_LIBRARY_IMPL(tinymem, CUDA, m) {
  m.impl("subnet_threshold", &tinymem::cuda_impl::subnet_threshold);
  m.impl("subnet_masked_weight", &tinymem::cuda_impl::subnet_masked_weight);
  m.impl("subnet_ste_grad", &tinymem::cuda_impl::subnet_ste_grad);
  m.impl("subnet_sgd_step_", &tinymem::cuda_impl::subnet_sgd_step_);
}

#endif  // TINYMEM_WITH_CUDA
