"""Triton backend of the fused linear + cross-entropy; semantics in
``tinymem_fast/ops/linear_cross_entropy.py``.

The products stay cuBLAS's (torch matmuls on chunks of rows, in the input dtype, as a half-precision
``lm_head`` computes them); the kernel here is the elementwise part between them. One program owns one row
of a chunk of logits and walks it in ``BLOCK``-column tiles: in the forward an online max / sum of exps
(and plain sum, for label smoothing) gives the row's logsumexp and loss; then, when a gradient is asked
for, a second walk writes ``scale * (softmax - eps/V - (1-eps) onehot)`` over the logits in place, in
their dtype (a half-precision chunk is never widened into a float32 copy). With the logsumexp known
(backward, vocabulary slices) only the second walk runs.

The entry points are the custom ops ``torch.ops.tinymem_triton.linear_ce_rows_fwd`` / ``_grad`` (see
kernels/__init__.py);
tensors are contiguous on one device (CUDA, or CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch, triton_op

_BLOCK = 1024
_WARPS = 4


def _device_guard(t: Tensor):
    # Triton launches on the current CUDA device, not the tensor's
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def _ce_rows_kernel(z_ptr, y_ptr, scale_ptr, lse_ptr, loss_ptr, cols, v0, vocab, ignore_index, eps,
                    FORWARD: tl.constexpr, GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * cols
    y = tl.load(y_ptr + row)
    sc = tl.load(scale_ptr + row)
    local = y - v0
    hit = (y != ignore_index) & (local >= 0) & (local < cols)
    offs0 = tl.arange(0, BLOCK)
    if FORWARD:
        m = float("-inf")
        s = 0.0
        tot = 0.0
        for c0 in range(0, cols, BLOCK):
            offs = c0 + offs0
            inb = offs < cols
            x = tl.load(base + offs, mask=inb, other=float("-inf")).to(tl.float32)
            new_m = tl.maximum(m, tl.max(x, 0))
            # a row (so far) of -inf only: shift by 0, so exp(-inf - -inf) never makes a NaN
            shift = tl.where(new_m == float("-inf"), 0.0, new_m)
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), 0)
            tot += tl.sum(tl.where(inb, x, 0.0), 0)
            m = new_m
        lse = m + tl.log(s)
        tl.store(lse_ptr + row, lse)
        zy = tl.load(base + tl.where(hit, local, 0)).to(tl.float32)
        loss = (1.0 - eps) * (lse - zy)
        if eps != 0.0:  # 0 * (lse - mean) would make a -inf logit's infinite mean a NaN
            loss += eps * (lse - tot / vocab)
        tl.store(loss_ptr + row, tl.where(y != ignore_index, loss, 0.0))
    else:
        lse = tl.load(lse_ptr + row)
    if GRAD:
        off = sc * eps / vocab
        for c0 in range(0, cols, BLOCK):
            offs = c0 + offs0
            inb = offs < cols
            x = tl.load(base + offs, mask=inb, other=0.0).to(tl.float32)
            dz = tl.exp(x - lse) * sc - off
            dz = tl.where(hit & (offs == local), dz - (1.0 - eps) * sc, dz)
            dz = tl.where(sc == 0.0, 0.0, dz)  # ignored rows: 0, whatever their logits
            tl.store(base + offs, dz.to(z_ptr.dtype.element_ty), mask=inb)


def _launch(z, y, scale, lse, loss, eps, vocab, v0, ignore_index, forward, grad):
    rows, cols = z.shape
    if rows == 0:
        return
    with _device_guard(z):
        launch(_ce_rows_kernel, (rows,))(z, y, scale, lse, loss, cols, v0, vocab, ignore_index, float(eps),
                                         FORWARD=forward, GRAD=grad, BLOCK=_BLOCK, num_warps=_WARPS)


@triton_op("linear_ce_rows_fwd", mutates_args=("z", "lse", "loss"))
def ce_rows_fwd(z: Tensor, y: Tensor, scale: Tensor, lse: Tensor, loss: Tensor, eps: float, vocab: int,
                ignore_index: int, grad: bool) -> None:
    """Whole rows of logits ``z[R, V]`` (any float dtype), targets ``y[R]`` int64, per-row gradient scales
    ``scale[R]`` float32: fill ``lse[R]`` and ``loss[R]`` (float32); with ``grad`` ``z`` becomes the
    logits' gradient in place."""
    _launch(z, y, scale, lse, loss, eps, vocab, 0, ignore_index, True, grad)


@triton_op("linear_ce_rows_grad", mutates_args=("z",))
def ce_rows_grad(z: Tensor, y: Tensor, scale: Tensor, lse: Tensor, eps: float, vocab: int, v0: int,
                 ignore_index: int) -> None:
    """Rows of logits ``z[R, C]`` of columns ``v0..v0+C`` whose row logsumexps ``lse[R]`` are known
    (backward, vocabulary slices): ``z`` becomes the logits' gradient in place."""
    _launch(z, y, scale, lse, lse, eps, vocab, v0, ignore_index, False, True)
