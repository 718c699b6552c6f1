"""Triton backend of the masked-subnet (supermask) ops; semantics in ``tinymem_fast/ops/masked_subnet.py``.

``threshold`` is an exact radix select over the bit patterns of ``|s|`` (no sort): a few histogram passes
fix the k-th smallest key digit by digit, then one counting pass and a one-block scan locate the tie that
is the ``cut``. Everything between kernels stays on the device, so the GPU path never waits on the host.
``masked_weight``, ``ste_grad`` and ``sgd_step`` are single elementwise passes; the keep mask is recomputed
from ``(value, cut)`` wherever it is needed instead of being stored.

Every function takes contiguous tensors on one device (CUDA, or CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch, triton_op

# (shift, bits) of each radix digit of the 31-bit key, most significant first. Depending on the Triton
# version tl.histogram lowers to per-warp ballots (cost grows as bins * log2(bins)) or to shared-memory
# atomics; 8-bit digits are cheap under both. Wider digits would save a pass over the scores at the
# price of a slower one; tune here (any split covering bits 0..30 is correct).
_DIGITS = ((24, 7), (16, 8), (8, 8), (0, 8))
_HIST_BLOCK = 4096
_HIST_WARPS = 8
# programs per SM of the persistent histogram kernel: each flushes its private histogram with one
# atomic per bin, so fewer, longer-lived programs keep the global atomics negligible
_HIST_PROGRAMS_PER_SM = 4
_TIE_BLOCK = 4096
_EW_BLOCK = 1024
_EW_WARPS = 4


# --- helpers ----------------------------------------------------------------------------------


@triton.jit
def _abs_key(x):
    # bits of |x| as float32: for non-negative floats the int32 order is the float order, and clearing
    # the sign bit maps -0.0 onto 0.0 as abs() does. fp16/bf16 upcast exactly, so ranks are unchanged.
    # NaN maps above +inf.
    return x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF


def _device_guard(t: torch.Tensor):
    # Triton launches on the current CUDA device, not the tensor's
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _hist_programs(n: int, device: torch.device) -> int:
    tiles = triton.cdiv(n, _HIST_BLOCK)
    if device.type != "cuda":
        return min(tiles, 4)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return min(tiles, _HIST_PROGRAMS_PER_SM * _sm_count(index))


def _flat(name: str, t: torch.Tensor, n: int) -> torch.Tensor:
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} elements, expected {n}")
    return t.contiguous().view(-1)


# --- threshold: radix select ------------------------------------------------------------------


@triton.jit
def _radix_hist_kernel(s_ptr, state_ptr, hist_ptr, n, SHIFT: tl.constexpr, BITS: tl.constexpr,
                       NUM_BINS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    # only keys that agree with the digits chosen by earlier passes are counted
    hi = tl.load(state_ptr).to(tl.int32) >> (SHIFT + BITS)
    bins = tl.arange(0, NUM_BINS)
    acc = tl.zeros([NUM_BINS], dtype=tl.int32)
    misses = tl.zeros([BLOCK], dtype=tl.int32)
    # persistent loop: the private histogram is flushed once per program, not once per tile; the int64
    # start makes the loop variable int64, so offsets cannot wrap on huge tensors
    for start in range(pid.to(tl.int64) * BLOCK, n, nprog * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < n
        key = _abs_key(tl.load(s_ptr + offs, mask=valid, other=0.0))
        hit = valid & ((key >> (SHIFT + BITS)) == hi)
        # tl.histogram only gained a mask in Triton 3.3: park the misses in bin 0 and take them out below
        acc += tl.histogram(tl.where(hit, (key >> SHIFT) & (NUM_BINS - 1), 0), NUM_BINS)
        misses += tl.where(hit, 0, 1)
    acc -= tl.where(bins == 0, tl.sum(misses, axis=0), 0)
    tl.atomic_add(hist_ptr + bins, acc.to(tl.int64))


@triton.jit
def _radix_select_kernel(hist_ptr, state_ptr, value_ptr, SHIFT: tl.constexpr, NUM_BINS: tl.constexpr,
                         LAST: tl.constexpr):
    # state = [key prefix found so far, 1-based rank of the target among keys with that prefix].
    # It is read and rewritten in place: all reads come first, and the launch uses a single warp, so no
    # thread can read a value another thread has already updated.
    bins = tl.arange(0, NUM_BINS)
    h = tl.load(hist_ptr + bins)
    prefix = tl.load(state_ptr)
    rank = tl.load(state_ptr + 1)
    # the target's digit is the first bin whose running count reaches the rank
    digit = tl.sum((tl.cumsum(h, axis=0) < rank).to(tl.int64), axis=0)
    below = tl.sum(tl.where(bins < digit, h, 0), axis=0)
    prefix = prefix | (digit << SHIFT)
    tl.store(state_ptr, prefix)
    # after the last digit this is `need`: how many entries equal to value are dropped
    tl.store(state_ptr + 1, rank - below)
    if LAST:
        tl.store(value_ptr, prefix.to(tl.int32).to(tl.float32, bitcast=True))


@triton.jit
def _tie_count_kernel(s_ptr, state_ptr, counts_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    vkey = tl.load(state_ptr).to(tl.int32)
    key = _abs_key(tl.load(s_ptr + offs, mask=valid, other=0.0))
    tl.store(counts_ptr + pid, tl.sum((valid & (key == vkey)).to(tl.int32), axis=0))


@triton.jit
def _tie_cut_kernel(s_ptr, state_ptr, counts_ptr, cum_ptr, block_ptr, cut_ptr, n, BLOCK: tl.constexpr):
    # one program scans the block holding the need-th tie; the block index was found on the device
    b = tl.load(block_ptr)
    need = tl.load(state_ptr + 1) - (tl.load(cum_ptr + b) - tl.load(counts_ptr + b))
    offs = b * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    vkey = tl.load(state_ptr).to(tl.int32)
    key = _abs_key(tl.load(s_ptr + offs, mask=valid, other=0.0))
    tie = valid & (key == vkey)
    hit = tie & (tl.cumsum(tie.to(tl.int32), axis=0) == need)
    tl.store(cut_ptr, tl.sum(tl.where(hit, offs + 1, 0), axis=0))


@triton_op("subnet_threshold")
def threshold(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(value, cut)`` dropping the ``k`` smallest ``|scores|`` (ties by flat index); equals
    ``threshold_torch``.

    NaN scores are undefined here: they rank above +inf instead of raising, because checking for them
    would need a host sync.
    """
    n = scores.numel()
    if n == 0:
        raise ValueError("scores is empty")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, {n}], got {k!r}")
    dev = scores.device
    if k == 0:
        return (torch.zeros((), dtype=torch.float32, device=dev),
                torch.zeros((), dtype=torch.int64, device=dev))
    s = scores.detach().contiguous().view(-1)
    with _device_guard(s):
        state = torch.zeros(2, dtype=torch.int64, device=dev)
        # fill_ launches a kernel; building the tensor from a Python list would be a host-to-device copy,
        # which waits for the stream
        state[1:].fill_(k)
        hist = torch.zeros(len(_DIGITS), 1 << max(b for _, b in _DIGITS), dtype=torch.int64, device=dev)
        value = torch.empty((), dtype=torch.float32, device=dev)
        programs = _hist_programs(n, dev)
        for p, (shift, bits) in enumerate(_DIGITS):
            launch(_radix_hist_kernel, (programs,))(s, state, hist[p], n, SHIFT=shift, BITS=bits,
                                                    NUM_BINS=1 << bits, BLOCK=_HIST_BLOCK,
                                                    num_warps=_HIST_WARPS)
            launch(_radix_select_kernel, (1,))(hist[p], state, value, SHIFT=shift, NUM_BINS=1 << bits,
                                               LAST=p == len(_DIGITS) - 1, num_warps=1)
        blocks = triton.cdiv(n, _TIE_BLOCK)
        counts = torch.empty(blocks, dtype=torch.int32, device=dev)
        launch(_tie_count_kernel, (blocks,))(s, state, counts, n, BLOCK=_TIE_BLOCK)
        cum = torch.cumsum(counts, 0, dtype=torch.int64)
        block = torch.searchsorted(cum, state[1:])
        cut = torch.empty((), dtype=torch.int64, device=dev)
        launch(_tie_cut_kernel, (1,))(s, state, counts, cum, block, cut, n, BLOCK=_TIE_BLOCK)
    return value, cut


# --- masked weight ----------------------------------------------------------------------------


@triton.jit
def _masked_weight_kernel(w_ptr, s_ptr, value_ptr, cut_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    # comparing bit keys, not floats, keeps this consistent with threshold's ordering for any input
    vkey = _abs_key(tl.load(value_ptr))
    cut = tl.load(cut_ptr)
    key = _abs_key(tl.load(s_ptr + offs, mask=valid, other=0.0))
    keep = (key > vkey) | ((key == vkey) & (offs >= cut))
    w = tl.load(w_ptr + offs, mask=valid, other=0.0)
    # a multiply, not a select, so inf/NaN weights propagate exactly as in the torch reference
    tl.store(out_ptr + offs, w * keep.to(w.dtype), mask=valid)


@triton_op("subnet_masked_weight")
def masked_weight(weight: Tensor, scores: Tensor, value: Tensor, cut: Tensor) -> Tensor:
    """``weight * keep_mask`` in ``weight``'s dtype, the mask computed on the fly from ``scores``."""
    n = weight.numel()
    w = _flat("weight", weight.detach(), n)
    s = _flat("scores", scores.detach(), n)
    out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    if n == 0:
        return out
    with _device_guard(w):
        launch(_masked_weight_kernel, (triton.cdiv(n, _EW_BLOCK),))(w, s, value, cut, out, n,
                                                                    BLOCK=_EW_BLOCK, num_warps=_EW_WARPS)
    return out


# --- straight-through score gradient ----------------------------------------------------------


@triton.jit
def _ste_grad_kernel(g_ptr, w_ptr, s_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    # torch.sign: 0 for +-0 and for NaN; multiplied (not selected) so 0 * inf gives NaN like torch
    sign = tl.where(s > 0, 1.0, tl.where(s < 0, -1.0, 0.0))
    tl.store(out_ptr + offs, ((g * w) * sign).to(out_ptr.dtype.element_ty), mask=valid)


@triton_op("subnet_ste_grad")
def ste_grad(grad: Tensor, weight: Tensor, scores: Tensor) -> Tensor:
    """``(grad * weight) * sign(scores)`` computed in float32, returned in ``scores``' dtype."""
    n = scores.numel()
    g = _flat("grad", grad.detach(), n)
    w = _flat("weight", weight.detach(), n)
    s = _flat("scores", scores.detach(), n)
    out = torch.empty(scores.shape, dtype=scores.dtype, device=scores.device)
    if n == 0:
        return out
    with _device_guard(s):
        launch(_ste_grad_kernel, (triton.cdiv(n, _EW_BLOCK),))(g, w, s, out, n, BLOCK=_EW_BLOCK,
                                                               num_warps=_EW_WARPS)
    return out


# --- fused SGD step ---------------------------------------------------------------------------


@triton.jit
def _sgd_step_kernel(s_ptr, g_ptr, buf_ptr, n, lr, momentum, weight_decay, MAXIMIZE: tl.constexpr,
                     BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    s = tl.load(s_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    buf = tl.load(buf_ptr + offs, mask=valid, other=0.0)
    if MAXIMIZE:
        g = -g
    g = g + weight_decay * s
    buf = momentum * buf + g
    s = s - lr * buf
    tl.store(buf_ptr + offs, buf, mask=valid)
    tl.store(s_ptr + offs, s.to(s_ptr.dtype.element_ty), mask=valid)


@triton_op("subnet_sgd_step_", mutates_args=("scores", "buf"), opaque=True)
def sgd_step(scores: Tensor, grad: Tensor, buf: Tensor, lr: float, momentum: float, weight_decay: float,
             maximize: bool) -> None:
    """In place: ``buf = momentum * buf + (+-grad + weight_decay * s)``; ``s -= lr * buf``."""
    n = scores.numel()
    if not (scores.is_contiguous() and buf.is_contiguous()):
        raise ValueError("scores and buf must be contiguous (they are updated in place)")
    if buf.dtype != torch.float32:
        raise TypeError(f"buf must be float32, got {buf.dtype}")
    g = _flat("grad", grad.detach(), n)
    if buf.numel() != n:
        raise ValueError(f"buf has {buf.numel()} elements, expected {n}")
    if n == 0:
        return
    with _device_guard(scores):
        # no FMA contraction: each product is rounded on its own, as in the separate mul/add kernels of
        # sgd_step_torch, so both round the same way (bit-identical under the interpreter)
        _sgd_step_kernel[(triton.cdiv(n, _EW_BLOCK),)](scores.detach(), g, buf, n, float(lr), float(momentum),
                                                       float(weight_decay), MAXIMIZE=bool(maximize),
                                                       BLOCK=_EW_BLOCK, num_warps=_EW_WARPS,
                                                       enable_fp_fusion=False)
