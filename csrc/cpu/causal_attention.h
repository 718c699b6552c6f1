// Fused causal self-attention for CPU training (forward and backward; see causal_attention.cpp and
// tinymem_fast/ops/attention.py).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace tinymem::cpu {

// q, k, v: [B, H, S, D] float32 or bfloat16 (one dtype), any strides. Returns (out [B, H, S, D] in q's
// dtype, lse float32 [B, H, S] contiguous: the natural-log logsumexp of each row of scale * q k^T over
// keys 0..s). out's memory is [B, S, H, D]-contiguous when q is sequence-major (q.stride(1) < q.stride(2),
// e.g. Hugging Face's transposed views), else [B, H, S, D]-contiguous.
std::tuple<at::Tensor, at::Tensor> causal_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, double scale);

// Gradients of causal_attention_fwd's out: (dq, dk, dv) in the dtype of q, k, v; each laid out by the rule
// above applied to its own input. dout and out may each be float32 or bfloat16.
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale);

}  // namespace tinymem::cpu
