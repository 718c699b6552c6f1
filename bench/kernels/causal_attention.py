"""Fused causal attention, forward + backward, at training shapes: our CPU kernel against
``F.scaled_dot_product_attention(is_causal=True)`` on the same tensors and dtype.

Inputs are laid out the way Hugging Face attention modules hand them over: [B, S, H, D] projections
viewed as [B, H, S, D] (non-contiguous), at the quick presets' size (batch 64, 4 heads, 71 tokens after the
shift, head dim 32). With bfloat16 inputs both compute in float32 inside (ours converts on load); the
gradient flows back to the bf16 leaves either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.harness import Row, measure, with_ratios
from tinymem_fast.ops import causal_attention
from tinymem_fast.ops.attention import causal_attention_available

SDPA = "F.scaled_dot_product_attention(is_causal=True)"


def _hf_views(b: int, s: int, h: int, d: int, dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        x = torch.randn(b, s, h * d, generator=g).to(device=device, dtype=dtype).requires_grad_()
        out.append(x)
    views = [x.view(b, s, h, d).transpose(1, 2) for x in out]
    return out, views


def _fwd_bwd(fn, leaves, views, grad):
    def step():
        for x in leaves:
            x.grad = None
        fn(*views).backward(grad)

    return step


def run(device: str = "cpu", repeats: int = 5) -> list[Row]:
    if device != "cpu":
        return []  # a CPU kernel: on GPUs SDPA dispatches to flash attention, nothing of ours to time
    if not causal_attention_available():
        print("  causal_attention: the compiled extension is not loaded; nothing to time")
        return []
    b, s, h, d = 64, 71, 4, 32
    rows = []
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        case = f"causal attention fwd+bwd, {b} x {h} heads x {s} x {d} (HF views), {tag}"
        leaves, views = _hf_views(b, s, h, d, dtype, device)
        grad = torch.randn(b, h, s, d, generator=torch.Generator().manual_seed(1)).to(dtype)
        # the two must agree before their times mean anything
        ref = F.scaled_dot_product_attention(*[v.float() for v in views], is_causal=True)
        got = causal_attention(*views).float()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        assert torch.allclose(got, ref, atol=tol, rtol=tol), float((got - ref).abs().max())
        for name, fn in ((SDPA, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
                         ("tinymem causal_attention (cpp)", causal_attention)):
            step = _fwd_bwd(fn, leaves, views, grad)
            t = measure(step, device=device, warmup=2, repeats=max(10, 4 * repeats))
            rows.append(Row("causal_attention", case, name, *t))
        with_ratios(rows, SDPA, case)
    return rows
