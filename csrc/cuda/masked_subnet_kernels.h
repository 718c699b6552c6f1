// Launchers for the masked-subnet CUDA kernels (csrc/cuda/masked_subnet.cu).
//
// Plain C++: raw device pointers, int64 sizes and a dtype code, so the torch-facing code
// (masked_subnet_cuda.cpp) and the kernels (compiled by nvcc without any torch header) share only this.
// Every launcher enqueues its work on `stream`, never synchronises with the host, and returns the
// first CUDA error it saw (cudaSuccess when all launches were accepted).
//
// Semantics: see tinymem_fast/ops/masked_subnet.py. Flat entry i of a score tensor is dropped iff
//   |s_i| < value  or  (|s_i| == value and i < cut)
// comparisons being made on |s| upcast to float32. NaN scores give undefined results.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace tinymem {
namespace gpu {

// Element type of a tensor argument (the only dtypes these kernels take).
enum class FloatType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Device workspace (bytes) subnet_threshold_launch needs for `n` scores. Any alignment of 256 bytes or
// more is fine (torch allocations are); the launcher initialises it itself.
int64_t subnet_threshold_workspace_bytes(int64_t n);

// Finds (value, cut) dropping exactly k entries, ordered by (|s| ascending, flat index ascending).
// Requires 1 <= k < n (k == 0 is handled by the caller: value 0, cut 0). Writes *value_out (float32)
// and *cut_out (int64) on the device. Radix select on the float32 bit pattern of |s|; no host sync.
cudaError_t subnet_threshold_launch(const void* scores, FloatType scores_type, int64_t n, int64_t k,
                                    void* workspace, float* value_out, int64_t* cut_out,
                                    cudaStream_t stream);

// out = weight * keep_mask(scores; *value, *cut), in weight's dtype. value/cut are device pointers.
cudaError_t subnet_masked_weight_launch(const void* weight, FloatType weight_type, const void* scores,
                                        FloatType scores_type, const float* value, const int64_t* cut,
                                        void* out, int64_t n, cudaStream_t stream);

// out = (float(grad) * float(weight)) * sign(scores), stored in scores' dtype (sign(0) = 0).
cudaError_t subnet_ste_grad_launch(const void* grad, FloatType grad_type, const void* weight,
                                   FloatType weight_type, const void* scores, FloatType scores_type,
                                   void* out, int64_t n, cudaStream_t stream);

// In place, one pass (torch.optim.SGD rule, dampening 0, no Nesterov; buffer float32):
//   g = float(grad), negated if maximize;  g = g + weight_decay * s;
//   buf = momentum * buf + g;  s = s - lr * buf  (stored in scores' dtype).
cudaError_t subnet_sgd_step_launch(void* scores, FloatType scores_type, const void* grad,
                                   FloatType grad_type, float* momentum_buffer, int64_t n, float lr,
                                   float momentum, float weight_decay, bool maximize,
                                   cudaStream_t stream);

}  // namespace gpu
}  // namespace tinymem
