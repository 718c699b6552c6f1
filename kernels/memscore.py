"""Triton backend of the memscore ops; semantics in ``tinymem_fast/ops/memscore.py``.

One program scores a block of ``BLOCK_M`` tokens over one slice of the vocabulary: it walks the slice in
``BLOCK_N``-column tiles, builds each tile of logits with ``tl.dot`` over ``BLOCK_K``-wide slices of the
hidden size (float32 accumulation; fp32 inputs use IEEE products, never TF32), adds the bias, rounds to
the input dtype, and folds the tile into running per-token state: max, lowest-index argmax, online sum of
exps, target logit. The ``[M, V]`` logits never exist. When there are too few token blocks to fill the
GPU (greedy decoding scores one position per row) the vocabulary is split across ``SPLIT`` programs per
block, and their partial states are merged afterwards (max, then lowest index among equal maxima, then
rescaled sums).

Early exit (need_nll=False): ``target_upper_bound`` gives, per token, a float that no tiled computation of
the target logit can exceed (a separate dot product plus a bound on float32 accumulation-order error,
then rounded like the logits). A token is a certain miss once a tile holds a logit above that bound, or
equal to it at a lower index than the target; its program stops when every token of its block is one.
Tokens that are not pruned get the full argmax, so results equal the unpruned kernel's exactly.

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

_BIG = tl.constexpr(2**31 - 1)


def _device_guard(t: torch.Tensor):
    # Triton launches on the current CUDA device, not the tensor's
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@triton.jit
def _memscore_kernel(h_ptr, w_ptr, b_ptr, y_ptr, thi_ptr,
                     best_ptr, arg_ptr, sum_ptr, tgt_ptr, dead_ptr,
                     M, V, D, v_per_split,
                     HAS_BIAS: tl.constexpr, HAS_TARGETS: tl.constexpr, NEED_NLL: tl.constexpr,
                     EARLY_EXIT: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(V, v_lo + v_per_split)

    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    arg = tl.zeros((BLOCK_M,), tl.int32) + v_lo
    sums = tl.zeros((BLOCK_M,), tl.float32)
    tgt = tl.zeros((BLOCK_M,), tl.float32)
    dead = rows >= M  # padding rows never keep a block alive
    y = tl.zeros((BLOCK_M,), tl.int32)
    if HAS_TARGETS:
        y = tl.load(y_ptr + rows, mask=rmask, other=0).to(tl.int32)
    thi = tl.zeros((BLOCK_M,), tl.float32)
    if EARLY_EXIT:
        thi = tl.load(thi_ptr + rows, mask=rmask, other=0.0)

    n0 = v_lo
    go = n0 < v_hi
    while go:
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < v_hi
        cols64 = cols.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < D
            a = tl.load(h_ptr + rows64[:, None] * D + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                        other=0.0)
            bt = tl.load(w_ptr + cols64[None, :] * D + ks[:, None], mask=kmask[:, None] & cmask[None, :],
                         other=0.0)
            if IEEE:
                acc = tl.dot(a, bt, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, bt, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        # one rounding to the input dtype, as a half-precision lm_head does
        x = acc.to(h_ptr.dtype.element_ty).to(tl.float32)
        x = tl.where(cmask[None, :], x, float("-inf"))
        cmax = tl.max(x, axis=1)
        cidx = tl.min(tl.where(x == cmax[:, None], cols[None, :], _BIG), axis=1)
        arg = tl.where(cmax > best, cidx, arg)  # strictly greater: earlier tiles hold lower indices
        if NEED_NLL:
            # while every logit seen is -inf (suppressed ids) the sum stays 0: exp(-inf - -inf) is NaN
            new = tl.maximum(best, cmax)
            new = tl.where(new == float("-inf"), 0.0, new)
            sums = sums * tl.exp(best - new) + tl.sum(tl.exp(x - new[:, None]), axis=1)
            if HAS_TARGETS:
                tgt += tl.sum(tl.where(cols[None, :] == y[:, None], x, 0.0), axis=1)
        best = tl.maximum(best, cmax)
        n0 += BLOCK_N
        if EARLY_EXIT:
            dead = dead | (cmax > thi) | ((cmax >= thi) & (cidx < y))
            go = (n0 < v_hi) & (tl.sum((~dead).to(tl.int32), axis=0) > 0)
        else:
            go = n0 < v_hi

    out = pid_s * M + rows
    tl.store(best_ptr + out, best, mask=rmask)
    tl.store(arg_ptr + out, arg, mask=rmask)
    if NEED_NLL:
        tl.store(sum_ptr + out, sums, mask=rmask)
        if HAS_TARGETS:
            tl.store(tgt_ptr + out, tgt, mask=rmask)
    if EARLY_EXIT:
        tl.store(dead_ptr + out, dead.to(tl.int8), mask=rmask)


def _config(h: torch.Tensor, chunk: int) -> dict:
    if h.is_cuda:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32 if h.dtype == torch.float32 else 64, num_warps=8,
                   num_stages=3)
    else:  # interpreter: few, large numpy ops
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64)
    if chunk:
        cfg["BLOCK_N"] = max(16, min(256, triton.next_power_of_2(chunk)))
    return cfg


def _split(m_blocks: int, vocab: int, block_n: int, device: torch.device) -> int:
    tiles = triton.cdiv(vocab, block_n)
    if device.type != "cuda":
        return min(tiles, 2 if m_blocks == 1 else 1)
    want = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(tiles, triton.cdiv(want, m_blocks)))


def target_upper_bound(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                       y: torch.Tensor) -> torch.Tensor:
    """Per token, a float32 no tiled computation of the rounded target logit can exceed.

    The float32 dot product computed here and the tiled one each differ from the exact value by at most
    ``d * 2^-24 * sum|h_k w_k|`` (any summation order, with or without FMA); twice that bound twice over,
    plus relative slack for the bias add, covers both and the roundings of this sum. Rounding to the
    input dtype is monotone, so the rounded bound bounds the rounded logit.
    """
    hf = h.float()
    wy = w.index_select(0, y).float()
    dot = (hf * wy).sum(-1)
    absdot = (hf.abs() * wy.abs()).sum(-1)
    val = dot if b is None else dot + b.float().index_select(0, y)
    babs = 0.0 if b is None else b.float().index_select(0, y).abs()
    margin = (4.0 * h.shape[1] * 2.0 ** -24) * absdot + 2.0 ** -20 * (dot.abs() + babs) + 1e-30
    return (val + margin).to(h.dtype).float()


def _run(h, w, b, y, need_nll: bool, early_exit: bool, chunk: int, split: int = 0):
    m, d = h.shape
    vocab = w.shape[0]
    cfg = _config(h, chunk)
    m_blocks = triton.cdiv(m, cfg["BLOCK_M"])
    s = split or _split(m_blocks, vocab, cfg["BLOCK_N"], h.device)
    v_per_split = triton.cdiv(triton.cdiv(vocab, s), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    s = triton.cdiv(vocab, v_per_split)
    dev = h.device
    best = torch.empty(s, m, dtype=torch.float32, device=dev)
    arg = torch.empty(s, m, dtype=torch.int32, device=dev)
    sums = torch.empty(s, m, dtype=torch.float32, device=dev) if need_nll else best
    has_t = y is not None
    tgt = torch.empty(s, m, dtype=torch.float32, device=dev) if (need_nll and has_t) else best
    dead = torch.empty(s, m, dtype=torch.int8, device=dev) if early_exit else arg
    thi = target_upper_bound(h, w, b, y) if early_exit else best
    with _device_guard(h):
        launch(_memscore_kernel, (m_blocks, s))(
            h, w, b if b is not None else h, y if has_t else arg, thi,
            best, arg, sums, tgt, dead, m, vocab, d, v_per_split,
            HAS_BIAS=b is not None, HAS_TARGETS=has_t, NEED_NLL=need_nll, EARLY_EXIT=early_exit,
            IEEE=h.dtype == torch.float32, **cfg)
    # merge the vocabulary slices: max, lowest index among equal maxima, rescaled sums of exps
    top = best.max(0).values
    # (clamped: a NaN row matches nothing above and must still yield a valid id)
    arg64 = torch.where(best == top, arg.long(), vocab).min(0).values.clamp_max(vocab - 1)
    out = {"arg": arg64}
    if need_nll:
        # a slice whose logits are all -inf has sum 0 and adds nothing (0 * exp(-inf - top) = 0)
        tot = (sums * torch.exp(best - top)).sum(0)
        out["nll"] = top + torch.log(tot) - tgt.sum(0) if has_t else None
    if early_exit:
        out["dead"] = dead.bool().any(0)
    return out


@triton_op("memscore")
def memscore(h: Tensor, w: Tensor, b: Tensor | None, y: Tensor, need_nll: bool, early_exit: bool,
             chunk: int = 0, split: int = 0) -> tuple[Tensor, Tensor]:
    """Flat rows: h [M,d], w [V,d], b [V] or None, y [M] int64 -> (match bool [M], nll float32 [M]).
    ``split``: vocabulary slices per token block (0 = chosen by the GPU's size)."""
    r = _run(h, w, b, y, need_nll, early_exit, chunk, split)
    match = r["arg"] == y
    if early_exit:
        match &= ~r["dead"]
    nll = r["nll"] if need_nll else torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
    return match, nll


@triton_op("lm_head_argmax")
def lm_head_argmax(h: Tensor, w: Tensor, b: Tensor | None, chunk: int = 0, split: int = 0) -> Tensor:
    """h [N,d] -> int64 [N], argmax over V of the rounded logits (lowest index on ties)."""
    return _run(h, w, b, None, False, False, chunk, split)["arg"]
