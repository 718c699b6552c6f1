"""Fused causal self-attention for training small models on the CPU.

:func:`causal_attention` computes ``F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)``
for ``q, k, v`` of shape ``[B, H, S, D]`` and is differentiable in all three. On CPU tensors it runs the
compiled kernel (``torch.ops.tinymem.causal_attention_fwd`` / ``causal_attention_bwd``,
csrc/cpu/causal_attention.cpp) when the extension has it: one thread per (batch, head), every product
and the softmax in float32 (bfloat16 inputs are widened on load), and a flash-attention backward that
recomputes the probabilities from the forward's row logsumexp. At small-model shapes (S ~ 100, D ~ 32)
that is several times faster than PyTorch's CPU attention, most of all for bfloat16. Everything else
(other devices, dtypes other than float32 / bfloat16, mismatched shapes, ``D > MAX_HEAD_DIM``, no
compiled extension) takes ``F.scaled_dot_product_attention`` itself, the reference.

Inputs may have any strides; rows of ``D`` elements are read in place when ``stride(-1) == 1`` (Hugging
Face's ``[B, S, H, D] -> [B, H, S, D]`` transposed views are read without a copy). The output -- and each
gradient -- is a ``[B, H, S, D]`` tensor whose memory is ``[B, S, H, D]``-contiguous when its input is
sequence-major (``stride(1) < stride(2)``, as those views are) and ``[B, H, S, D]``-contiguous otherwise,
so the usual ``out.transpose(1, 2).reshape(B, S, H * D)`` afterwards is free.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the inputs are cast to bfloat16 first, as autocast
does for ``F.scaled_dot_product_attention``: the output is bfloat16 and gradients flow back to the
float32 tensors through the casts. Backend choice follows :mod:`tinymem_fast.ops.registry`: ``backend=``
(``"cpp"`` or ``"torch"``), else ``TINYMEM_BACKEND``, else the kernel when it can run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import registry

KERNEL_DTYPES = (torch.float32, torch.bfloat16)
MAX_HEAD_DIM = 256  # kMaxHeadDim in csrc/cpu/causal_attention.cpp

# op names the registry and `tinymem info` know
OPS = ("causal_attention",)
_EXT_OPS = ("causal_attention_fwd", "causal_attention_bwd")
# how registry.select dispatches this family: a CPU kernel, else SDPA
DISPATCH = {"backends": ("torch", "cpp"), "ext_ops": _EXT_OPS}



@torch.compiler.assume_constant_result  # traced once: the extension does not come and go
def causal_attention_available() -> bool:
    """The compiled kernel can run here: the extension is loaded and has the attention ops."""
    return registry.ext() is not None and all(registry.ext_has(op) for op in _EXT_OPS)


# --- the compiled ops -------------------------------------------------------------------------


def _result_like(t: Tensor, dtype: torch.dtype) -> Tensor:
    """An empty result laid out as the kernel lays it out for input ``t`` (see the module docstring)."""
    b, h, s, d = t.shape
    if t.stride(1) < t.stride(2):
        return t.new_empty((b, s, h, d), dtype=dtype).permute(0, 2, 1, 3)
    return t.new_empty((b, h, s, d), dtype=dtype)


def _fwd_fake(q, k, v, scale):
    return _result_like(q, q.dtype), q.new_empty(q.shape[:3], dtype=torch.float32)


def _bwd_fake(dout, q, k, v, out, lse, scale):
    return _result_like(q, q.dtype), _result_like(k, k.dtype), _result_like(v, v.dtype)


registry.register_fakes({"causal_attention_fwd": _fwd_fake, "causal_attention_bwd": _bwd_fake})


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _backward(ctx, dout: Tensor, _dlse):
    # lse is an output for the backward's sake only; nothing downstream differentiates it
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.tinymem.causal_attention_bwd(dout, q, k, v, out, lse, ctx.scale)
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None)


registry.register_autograd({"causal_attention_fwd": (_backward, _setup_context)})


# --- dispatch ---------------------------------------------------------------------------------

def _kernel_takes(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return (q.dim() == 4 and q.shape == k.shape == v.shape and q.dtype in KERNEL_DTYPES
            and k.dtype == q.dtype and v.dtype == q.dtype and 0 < q.shape[-1] <= MAX_HEAD_DIM
            and k.device == q.device and v.device == q.device)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, *,
                     backend: str | None = None) -> Tensor:
    """``softmax(scale * q k^T + causal mask) v`` for ``[B, H, S, D]`` inputs (see the module docstring).

    ``scale`` defaults to ``1 / sqrt(D)``. With ``backend="cpp"`` unsupported inputs raise instead of
    falling back to ``F.scaled_dot_product_attention``.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    b = registry.select("causal_attention", q.device, backend, **DISPATCH, suits=_kernel_takes(q, k, v))
    if b == "cpp" and torch.is_autocast_enabled("cpu"):
        # what autocast does to F.scaled_dot_product_attention's float32 inputs on the CPU
        dt = torch.get_autocast_dtype("cpu")
        q, k, v = (t.to(dt) if t.dtype == torch.float32 else t for t in (q, k, v))
    if b == "torch":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return torch.ops.tinymem.causal_attention_fwd(q, k, v, float(scale))[0]
