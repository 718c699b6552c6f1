"""bf16 mixed precision for training: matmuls in bfloat16, weights, optimizer state and loss in float32.

On a CPU with AVX512-BF16 (or AMX) oneDNN runs bf16 GEMMs at about twice the float32 rate, but
PyTorch's CPU flash-attention backward in bf16 is several times slower than in float32 (measured: 24 ms
vs 4 ms per layer on the quick math preset's 64 x 71 x 4 heads x 32). So on the CPU the attention of a
Hugging Face model runs in float32 inside the autocast region: :data:`FP32_ATTENTION` is an attention
function registered with transformers' ``AttentionInterface`` that upcasts q/k/v, calls the stock SDPA
attention with autocast off and casts the output back. On GPUs the bf16 SDPA kernels are the fast ones
and nothing is swapped.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

PRECISIONS = ("fp32", "bf16")
FP32_ATTENTION = "tinymem_sdpa_fp32"
_registered = False


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def sdpa_fp32(module, query, key, value, attention_mask, **kwargs):
        # q may arrive as float32 already (rotary embeddings run in float32) and would still be cast
        # down by autocast inside SDPA, so autocast is always switched off here.
        with torch.autocast(query.device.type, enabled=False):
            mask = attention_mask
            if mask is not None and mask.is_floating_point():
                mask = mask.float()
            out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask,
                                                  **kwargs)
        return out.to(query.dtype), weights

    AttentionInterface.register(FP32_ATTENTION, sdpa_fp32)
    _registered = True


@contextmanager
def autocast(model, precision: str, device_type: str):
    """Run the forward pass under ``precision``. The model's attention implementation is swapped only
    for the duration (and only on the CPU, only from ``sdpa``), so a saved config never names it."""
    check_precision(precision)
    if precision == "fp32":
        yield
        return
    config = getattr(model, "config", None)
    swap = device_type == "cpu" and getattr(config, "_attn_implementation", None) == "sdpa"
    if swap:
        _register()
        config._attn_implementation = FP32_ATTENTION
    try:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
    finally:
        if swap:
            config._attn_implementation = "sdpa"
