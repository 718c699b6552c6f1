"""bf16 mixed precision for training: matmuls in bfloat16, weights, optimizer state and loss in float32.

On a CPU with AVX512-BF16 (or AMX) oneDNN runs bf16 GEMMs at about twice the float32 rate, but
PyTorch's CPU attention in bf16 is about 4x slower than in float32 (33 vs 8.7 ms forward + backward per
layer on the quick math preset's 64 x 4 heads x 71 x 32). So on the CPU a Hugging Face model's attention
is swapped, inside the autocast region only, for :data:`TRAIN_ATTENTION`: the ``"tinymem"`` attention of
:mod:`tinymem_fast.integrations.transformers` (:func:`~tinymem_fast.integrations.transformers.
tinymem_attention`), our fused causal kernel (:mod:`tinymem_fast.ops.attention`, float32 arithmetic on
bf16 inputs, 3.2 ms) when the call is plain causal self-attention, else the stock SDPA attention in
float32 with autocast off. A model already set to ``"tinymem"`` needs no swap. On GPUs the bf16 SDPA
kernels are the fast ones and nothing is swapped. Training and the methods' steps swap it in ``fp32``
too (``fused_attention=True``): on a 2-core AMD EPYC a float32 training step of the quick math model
drops from 247 to 205 ms, and the arithmetic is float32 either way (results differ from SDPA's by
rounding only). ``TINYMEM_BACKEND=torch`` keeps transformers' SDPA inside the swap.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch

PRECISIONS = ("fp32", "bf16")
TRAIN_ATTENTION = "tinymem"  # transformers.ATTENTION; that module imports transformers, so not here
_warned_slow_bf16 = False


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def _register() -> None:
    from .transformers import register_attention

    register_attention()


def native_bf16(device_type: str = "cpu") -> bool:
    """Whether bf16 matmuls run faster than float32 here: a CUDA GPU, or a CPU with AVX512-BF16 / AMX."""
    if device_type == "cuda":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device_type: str = "cpu") -> str:
    """``auto`` -> ``bf16`` where :func:`native_bf16`, else ``fp32``; ``fp32`` / ``bf16`` as given."""
    if precision == "auto":
        return "bf16" if native_bf16(device_type) else "fp32"
    check_precision(precision)
    return precision


def _warn_if_no_fast_bf16() -> None:
    global _warned_slow_bf16
    if _warned_slow_bf16:
        return
    _warned_slow_bf16 = True
    if not native_bf16("cpu"):
        warnings.warn("tinymem_fast: this CPU has no native bf16 matrix instructions (AVX512-BF16 / AMX); "
                      "train.precision=bf16 will likely be slower than fp32 here", RuntimeWarning,
                      stacklevel=3)


@contextmanager
def autocast(model, precision: str, device_type: str, fused_attention: bool = False):
    """Run the forward pass under ``precision``. The model's attention implementation is swapped only
    for the duration (and only on the CPU, only from ``sdpa``), so a saved config never names it.
    ``fused_attention``: swap it in float32 too (training and the unlearning methods' steps do)."""
    check_precision(precision)
    bf16 = precision == "bf16"
    if bf16 and device_type == "cpu":
        _warn_if_no_fast_bf16()
    config = getattr(model, "config", None)
    swap = (device_type == "cpu" and (bf16 or fused_attention)
            and getattr(config, "_attn_implementation", None) == "sdpa")
    if swap:
        _register()
        config._attn_implementation = TRAIN_ATTENTION
    try:
        if bf16:
            with torch.autocast(device_type, dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        if swap:
            config._attn_implementation = "sdpa"
