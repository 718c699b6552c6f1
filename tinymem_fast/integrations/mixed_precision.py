"""bf16 mixed precision for training: matmuls in bfloat16, weights, optimizer state and loss in float32.

On a CPU with AVX512-BF16 (or AMX) oneDNN runs bf16 GEMMs at about twice the float32 rate, but
PyTorch's CPU attention in bf16 is about 4x slower than in float32 (33 vs 8.7 ms forward + backward per
layer on the quick math preset's 64 x 4 heads x 71 x 32). So on the CPU a Hugging Face model's attention
is swapped, inside the autocast region only, for :data:`TRAIN_ATTENTION`, registered with transformers'
``AttentionInterface``: our fused causal kernel (:mod:`tinymem_fast.ops.attention`, float32 arithmetic on
bf16 inputs, 3.2 ms) when the call is plain causal self-attention, else the stock SDPA attention in
float32 with autocast off. On GPUs the bf16 SDPA kernels are the fast ones and nothing is swapped.
Training in ``fp32`` keeps the stock model untouched: it is the reference numerics.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

import torch

PRECISIONS = ("fp32", "bf16")
TRAIN_ATTENTION = "tinymem_train_attention"
_registered = False
_warned_slow_bf16 = False


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def _kernel_takes(module, query, key, value, attention_mask, dropout, kwargs) -> bool:
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    return (attention_mask is None and causal and dropout == 0.0 and query.device.type == "cpu"
            and query.shape[1] == key.shape[1] and query.shape[2] == key.shape[2]
            and kwargs.get("softcap") is None and kwargs.get("sliding_window") is None
            and kwargs.get("position_bias") is None and not kwargs.get("output_attentions", False))


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    from ..ops.attention import causal_attention, causal_attention_available

    def train_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        # q may arrive as float32 already (rotary embeddings run in float32) and would still be cast
        # down by autocast inside SDPA, so autocast is always switched off here.
        with torch.autocast(query.device.type, enabled=False):
            if (os.environ.get("TINYMEM_BACKEND", "").lower() != "torch" and causal_attention_available()
                    and _kernel_takes(module, query, key, value, attention_mask, dropout, kwargs)):
                dtype = query.dtype if query.dtype == key.dtype == value.dtype else torch.float32
                out = causal_attention(query.to(dtype), key.to(dtype), value.to(dtype), scale=scaling)
                return out.transpose(1, 2).to(query.dtype), None
            mask = attention_mask
            if mask is not None and mask.is_floating_point():
                mask = mask.float()
            out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask,
                                                  dropout=dropout, scaling=scaling, **kwargs)
        return out.to(query.dtype), weights

    AttentionInterface.register(TRAIN_ATTENTION, train_attention)
    # Without a mask function of its own transformers would build no mask at all for this name (it
    # assumes an external backend), silently dropping padding masks; SDPA's is the right one.
    ALL_MASK_ATTENTION_FUNCTIONS.register(TRAIN_ATTENTION, sdpa_mask)
    _registered = True


def _warn_if_no_fast_bf16() -> None:
    global _warned_slow_bf16
    if _warned_slow_bf16:
        return
    _warned_slow_bf16 = True
    try:
        fast = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        fast = False
    if not fast:
        warnings.warn("tinymem_fast: this CPU has no native bf16 matrix instructions (AVX512-BF16 / AMX); "
                      "train.precision=bf16 will likely be slower than fp32 here", RuntimeWarning,
                      stacklevel=3)


@contextmanager
def autocast(model, precision: str, device_type: str):
    """Run the forward pass under ``precision``. The model's attention implementation is swapped only
    for the duration (and only on the CPU, only from ``sdpa``), so a saved config never names it."""
    check_precision(precision)
    if precision == "fp32":
        yield
        return
    if device_type == "cpu":
        _warn_if_no_fast_bf16()
    config = getattr(model, "config", None)
    swap = device_type == "cpu" and getattr(config, "_attn_implementation", None) == "sdpa"
    if swap:
        _register()
        config._attn_implementation = TRAIN_ATTENTION
    try:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
    finally:
        if swap:
            config._attn_implementation = "sdpa"
