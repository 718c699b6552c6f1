"""Fused linear + cross-entropy: the training loss of an LM head without the ``[N, V]`` logits.

For hidden states ``h[..., d]``, the head ``W[V, d]`` (+ ``bias[V]``) and targets ``y[...]``:

    z[i, v]  = round_to_input_dtype( fp32(h[i] . W[v]) + fp32(bias[v]) )
    lse[i]   = logsumexp_v z[i, v]                                        (float32 from here on)
    loss[i]  = (1 - eps) * (lse[i] - z[i, y[i]]) + eps * (lse[i] - mean_v z[i, v])
             = 0 where y[i] == ignore_index

which is ``F.cross_entropy(F.linear(h, W, bias).float().view(-1, V), y.view(-1), ignore_index=...,
reduction=..., label_smoothing=eps)`` with the logits of a half-precision head (fp32 accumulation, one
rounding). ``reduction="mean"`` divides by the number of non-ignored targets (NaN when there is none, as
``F.cross_entropy`` gives; the gradients are then 0), ``"sum"`` adds, ``"none"`` returns float32 ``y.shape``.

The gradient of the logits is ``dz[i, v] = s[i] * (softmax(z[i])[v] - eps / V - (1 - eps) [v == y[i]])``
with ``s[i]`` the row's share of the upstream gradient (0 for ignored rows); the gradients of ``h``, ``W``
and ``bias`` follow by two products with ``dz``, rounded to their dtypes (half-precision ``dz`` is rounded
to the input dtype before the products, as the plain path's cast does).

How the work is laid out (every backend):

* Rows are processed in chunks of ``chunk_rows`` rows x the whole vocabulary, so the extra memory is the
  chunk's logits (``chunk_rows * V`` floats), never ``N * V``.
* For ``reduction="mean"``/``"sum"`` the gradients are computed in the forward (the upstream gradient is
  a scalar, applied in backward by one multiply), so the logits are made once per training step; for
  ``"none"`` the forward keeps the row logsumexps and the backward recomputes the logits.
* The weight gradient of a float32 head is accumulated chunk by chunk into the float32 result. A half-
  precision one is computed instead in the backward, in a pass over vocabulary slices, each slice's
  gradient in one product over all rows with the upstream gradient inside its one rounding (like the
  plain path's), which costs one more product of the logits but no float32 ``[V, d]`` buffer and no
  precision lost to per-chunk rounding. (A half-precision hidden-state gradient made in the forward is
  rounded once more when a mean/sum loss is scaled by an upstream gradient other than a power of two.)
* A ``-inf`` bias suppresses ids: their logits add nothing to the logsumexp and get zero gradient
  (with label smoothing the loss is then ``inf``, as ``F.cross_entropy``'s mean over all logits is).

Backends (``registry.select``): ``cpp`` (CPU; csrc/cpu/linear_cross_entropy.cpp: ATen GEMMs on the chunks
and a fused, vectorised softmax-gradient between them; ``torch.ops.tinymem.linear_ce_fwd/_bwd``),
``triton`` (CUDA: torch's GEMMs on the chunks and a Triton kernel for the elementwise step in place,
kernels/linear_cross_entropy.py) and ``torch`` (the same algorithm in PyTorch ops; the reference).

Bad inputs raise one-line errors before any work: shapes, dtypes, devices, targets outside ``[0, V)``
other than ``ignore_index``, and NaN/inf in ``hidden`` or ``weight`` (``validate=False`` skips these two
data checks). They cost one host synchronisation and are skipped while ``torch.compile`` traces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import registry
from .checks import check_bias, check_values

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
# float32 logits per row chunk; 64 MiB keeps a chunk in the few-hundred-row range at V ~ 50k, where the
# GEMMs already run at full speed and the chunk is a small fraction of the [N, V] the plain path makes
CHUNK_BYTES = 64 << 20

# op names the registry and `tinymem info` know (OP_FAMILIES["linear_cross_entropy"])
OPS = ("fused_linear_cross_entropy",)
_EXT_OPS = ("linear_ce_fwd", "linear_ce_bwd")
# how registry.select dispatches this family
DISPATCH = {"backends": ("torch", "cpp", "triton"), "ext_ops": _EXT_OPS}


def default_chunk_rows(n_rows: int, vocab: int) -> int:
    """Rows per chunk: as many as fit ``CHUNK_BYTES`` of float32 logits (at least 1, at most all)."""
    return max(1, min(max(n_rows, 1), CHUNK_BYTES // (4 * max(vocab, 1))))


def _vocab_slice(n_rows: int, vocab: int) -> int:
    """Vocabulary columns per slice of the half-precision weight-gradient pass (all rows at once)."""
    return max(64, min(vocab, CHUNK_BYTES // (4 * max(n_rows, 1))))


# --- validation -------------------------------------------------------------------------------


def _check(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or not (
            0.0 <= float(label_smoothing) <= 1.0):
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if hidden.dim() < 1:
        raise ValueError("hidden must be [..., d], got a 0-dim tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight (the lm_head) must be [V, d], got shape {tuple(weight.shape)}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight is {weight.dtype} but hidden is {hidden.dtype}; cast them to one dtype")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden has d={hidden.shape[-1]} features but weight {tuple(weight.shape)} "
                         f"expects d={weight.shape[1]}")
    if weight.shape[0] == 0:
        raise ValueError("weight has V=0 rows: there is no class to predict")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets must have hidden's leading shape {list(hidden.shape[:-1])}, got "
                         f"{list(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integer class ids (int64), got {targets.dtype}")
    for name, t in (("weight", weight), ("targets", targets)):
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    check_bias(bias, weight, hidden)


# --- torch reference --------------------------------------------------------------------------


def _row_scale(valid: Tensor, reduction: int) -> Tensor:
    """Each row's share of a unit upstream gradient: 1/n (mean) or 1 (sum) where not ignored, else 0."""
    scale = valid.float()
    if reduction == REDUCTIONS["mean"]:
        scale = scale / valid.sum().clamp(min=1)
    return scale


def _ce_rows_torch(z: Tensor, y: Tensor, scale: Tensor, lse: Tensor, loss: Tensor, eps: float, vocab: int,
                   v0: int, ignore_index: int, forward: bool, grad: bool) -> Tensor | None:
    """The elementwise step between the products, on logits ``z[R, C]`` of columns ``v0..v0+C``: with
    ``forward`` fill ``lse`` and ``loss`` (whole rows); with ``grad`` return the logits' gradient in
    ``z``'s dtype (the same contract as the Triton kernel's ``linear_ce_rows``, which works in place)."""
    zf = z.float()
    cols = zf.shape[1]
    if forward:
        lse.copy_(torch.logsumexp(zf, 1))
        zy = zf.gather(1, (y - v0).clamp(0, cols - 1)[:, None])[:, 0]
        row = (1.0 - eps) * (lse - zy)
        if eps:  # skipped at 0: 0 * (lse - mean) would make a -inf logit's infinite mean a NaN
            row = row + eps * (lse - zf.mean(1))
        loss.copy_(torch.where(y != ignore_index, row, 0.0))
    if not grad:
        return None
    zf.sub_(lse[:, None]).exp_()
    if eps:
        zf.sub_(eps / vocab)
    hit = (y != ignore_index) & (y >= v0) & (y < v0 + cols)
    zf.scatter_add_(1, (y - v0).clamp(0, cols - 1)[:, None], (-(1.0 - eps) * hit.float())[:, None])
    # scale 0 (an ignored row) zeroes the row; where, not a product, so an inf logit there cannot make NaN
    zf = torch.where(scale[:, None] != 0, zf * scale[:, None], 0.0)
    return zf.to(z.dtype)


def _ce_rows_triton(z, y, scale, lse, loss, eps, vocab, v0, ignore_index, forward, grad):
    from tinymem_fast.kernels import linear_cross_entropy as tk

    if forward:
        tk.ce_rows_fwd(z, y, scale, lse, loss, eps, vocab, ignore_index, grad)
    else:
        tk.ce_rows_grad(z, y, scale, lse, eps, vocab, v0, ignore_index)
    return z if grad else None


_CE_ROWS = {"torch": _ce_rows_torch, "triton": _ce_rows_triton}


def _rows_pass(h, w, b, y, scale, eps, ignore_index, lse, chunk, need_h, need_w, need_b, ce_rows):
    """One pass over row chunks: -> (lse, loss per row, grad_h, grad_w (float32 heads), grad_b float32).
    ``lse`` given (backward) skips the loss; the gradients asked for are computed with ``scale``."""
    n_rows, vocab = h.shape[0], w.shape[0]
    half = h.dtype != torch.float32
    forward = lse is None
    grads = need_h or (need_w and not half) or need_b
    if not (forward or grads):
        return lse, None, None, None, None
    if forward:
        lse = torch.empty(n_rows, dtype=torch.float32, device=h.device)
    loss = torch.zeros(n_rows if forward else 0, dtype=torch.float32, device=h.device)
    gh = torch.empty_like(h) if need_h else None
    gw = torch.zeros_like(w) if need_w and not half else None
    gb = torch.zeros(vocab, dtype=torch.float32, device=h.device) if need_b else None
    for r0 in range(0, n_rows, chunk):
        r1 = min(n_rows, r0 + chunk)
        hc = h[r0:r1]
        dz = ce_rows(F.linear(hc, w, b), y[r0:r1], scale[r0:r1], lse[r0:r1],
                     loss[r0:r1] if forward else loss, eps, vocab, 0, ignore_index, forward, grads)
        if not grads:
            continue
        if need_b:
            gb += dz.sum(0, dtype=torch.float32)
        if need_h:
            torch.mm(dz, w, out=gh[r0:r1])
        if gw is not None:
            gw.addmm_(dz.t(), hc)
    return lse, loss, gh, gw, gb


def _vocab_pass(h, w, b, y, scale, eps, ignore_index, lse, ce_rows) -> Tensor:
    """Weight gradient of a half-precision head: per vocabulary slice, one product over all rows."""
    n_rows, vocab = h.shape[0], w.shape[0]
    gw = torch.empty_like(w)
    step = _vocab_slice(n_rows, vocab)
    no_loss = lse.new_empty(0)
    for v0 in range(0, vocab, step):
        v1 = min(vocab, v0 + step)
        z = F.linear(h, w[v0:v1], b[v0:v1] if b is not None else None)
        dz = ce_rows(z, y, scale, lse, no_loss, eps, vocab, v0, ignore_index, False, True)
        torch.mm(dz.t(), h, out=gw[v0:v1])
    return gw


def _empty(like: Tensor, dtype=None) -> Tensor:
    return like.new_empty(0, dtype=dtype or like.dtype)


@torch.no_grad()
def linear_ce_fwd_torch(h: Tensor, w: Tensor, b: Tensor | None, y: Tensor, ignore_index: int, eps: float,
                        reduction: int, need_h: bool, need_w: bool, need_b: bool, chunk_rows: int,
                        backend: str = "torch"):
    """Reference of ``tinymem::linear_ce_fwd`` on flat rows: -> (loss, lse, grad_h, grad_w, grad_b).

    ``loss``: float32 ``[N]`` (none) or 0-dim; ``lse``: float32 ``[N]``. For mean/sum the gradients
    asked for are those of a unit upstream gradient -- except a half-precision head's weight gradient,
    which :func:`linear_ce_bwd_torch` computes once the upstream gradient is known -- with ``grad_b`` in
    float32; gradients not computed are empty tensors. ``backend="triton"``: the same, with the
    elementwise step in the Triton kernel (the products are torch's either way).
    """
    n_rows = h.shape[0]
    chunk = chunk_rows or default_chunk_rows(n_rows, w.shape[0])
    need_b = need_b and b is not None
    if reduction == REDUCTIONS["none"]:
        need_h = need_w = need_b = False
    valid = y != ignore_index
    scale = _row_scale(valid, reduction)
    lse, loss, gh, gw, gb = _rows_pass(h, w, b, y, scale, eps, ignore_index, None, chunk, need_h, need_w,
                                       need_b, _CE_ROWS[backend])
    if reduction == REDUCTIONS["mean"]:
        loss = loss.sum() / valid.sum()  # 0/0 = NaN with nothing counted, as F.cross_entropy
    elif reduction == REDUCTIONS["sum"]:
        loss = loss.sum()
    return (loss, lse, gh if gh is not None else _empty(h), gw if gw is not None else _empty(w),
            gb if gb is not None else _empty(h, torch.float32))


@torch.no_grad()
def linear_ce_bwd_torch(grad: Tensor, h: Tensor, w: Tensor, b: Tensor | None, y: Tensor, lse: Tensor,
                        ignore_index: int, eps: float, reduction: int, need_h: bool, need_w: bool,
                        need_b: bool, chunk_rows: int, backend: str = "torch"):
    """Reference of ``tinymem::linear_ce_bwd``: the gradients for the upstream gradient ``grad`` (``[N]``
    for reduction "none", 0-dim otherwise), the logits recomputed from the forward's ``lse``.
    -> (grad_h, grad_w, grad_b float32), empty where not asked for."""
    chunk = chunk_rows or default_chunk_rows(h.shape[0], w.shape[0])
    need_b = need_b and b is not None
    valid = y != ignore_index
    scale = _row_scale(valid, reduction) * grad.float()
    ce_rows = _CE_ROWS[backend]
    _, _, gh, gw, gb = _rows_pass(h, w, b, y, scale, eps, ignore_index, lse, chunk, need_h, need_w, need_b,
                                  ce_rows)
    if need_w and gw is None:
        gw = _vocab_pass(h, w, b, y, scale, eps, ignore_index, lse, ce_rows)
    return (gh if gh is not None else _empty(h), gw if gw is not None else _empty(w),
            gb if gb is not None else _empty(h, torch.float32))


# --- the compiled ops -------------------------------------------------------------------------


def _fwd_fake(h, w, b, y, ignore_index, eps, reduction, need_h, need_w, need_b, chunk_rows):
    n_rows, grads = h.shape[0], reduction != REDUCTIONS["none"]
    loss = h.new_empty(() if grads else (n_rows,), dtype=torch.float32)
    lse = h.new_empty(n_rows, dtype=torch.float32)
    gh = torch.empty_like(h) if grads and need_h else _empty(h)
    gw = torch.empty_like(w) if grads and need_w and w.dtype == torch.float32 else _empty(w)
    gb = h.new_empty(w.shape[0] if grads and need_b and b is not None else 0, dtype=torch.float32)
    return loss, lse, gh, gw, gb


def _bwd_fake(grad, h, w, b, y, lse, ignore_index, eps, reduction, need_h, need_w, need_b, chunk_rows):
    return (torch.empty_like(h) if need_h else _empty(h), torch.empty_like(w) if need_w else _empty(w),
            h.new_empty(w.shape[0] if need_b and b is not None else 0, dtype=torch.float32))


registry.register_fakes({"linear_ce_fwd": _fwd_fake, "linear_ce_bwd": _bwd_fake})


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch._guards.detect_fake_mode() is not None


def _keep(ctx, saved, made) -> None:
    """What the backward needs. In eager mode the gradients the forward made are kept on ``ctx``, not
    saved: the backward takes them off it and scales them in place, so autograd receives the only
    reference and stores it as ``.grad`` without a copy (a saved tensor would keep a second reference,
    forcing a [V, d] clone); a second backward through the graph (``retain_graph``) finds them gone and
    recomputes. A traced graph (torch.compile) must save them, and scales them out of place."""
    if _tracing():
        ctx.save_for_backward(*saved, *made)
        ctx.made = None
    else:
        ctx.save_for_backward(*saved)
        ctx.made = list(made)


def _grads(ctx, grad: Tensor, bwd):
    """The backward of every backend: the input gradients for the upstream ``grad``. Gradients the forward
    made (mean/sum) are scaled; the others are computed by ``bwd`` from the row logsumexps (all of them
    for "none"; a half-precision weight's; any the forward was not asked for or already handed out)."""
    h, w, b, y, lse, *saved_made = ctx.saved_tensors
    made, ctx.made = ctx.made, None
    in_place = made is not None
    if saved_made:
        made = saved_made
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and b is not None
    if made is None or ctx.args[2] == REDUCTIONS["none"]:
        made = [None] * 3
        grad = grad.contiguous()
    sizes = (h.numel(), w.numel(), w.shape[0])
    have = [g is not None and g.numel() == n and g.numel() > 0 for g, n in zip(made, sizes, strict=True)]
    todo = [want and not ok for want, ok in zip((need_h, need_w, need_b), have, strict=True)]
    got = (None,) * 3
    if any(todo):
        with torch.no_grad():  # the gradients are not differentiable again (no double backward)
            got = bwd(grad, h, w, b, y, lse, *ctx.args, *todo, ctx.chunk_rows)
    out = [None if not want else new if redo else g.mul_(grad) if in_place else g * grad
           for want, redo, g, new in zip((need_h, need_w, need_b), todo, made, got, strict=True)]
    if out[2] is not None:
        out[2] = out[2].to(b.dtype)
    return out


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Autograd of the torch and triton backends (the compiled op has its formula registered on the op)."""

    @staticmethod
    def forward(ctx, h, w, b, y, ignore_index, eps, reduction, need_h, need_w, need_b, chunk_rows, backend):
        loss, lse, gh, gw, gb = linear_ce_fwd_torch(h, w, b, y, ignore_index, eps, reduction, need_h, need_w,
                                                    need_b, chunk_rows, backend)
        ctx.args, ctx.chunk_rows, ctx.backend = (ignore_index, eps, reduction), chunk_rows, backend
        _keep(ctx, (h, w, b, y, lse), (gh, gw, gb))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        backend = ctx.backend

        def bwd(*args):
            return linear_ce_bwd_torch(*args, backend=backend)

        gh, gw, gb = _grads(ctx, grad, bwd)
        return gh, gw, gb, *([None] * 9)


def _setup_context(ctx, inputs, output):
    h, w, b, y, ignore_index, eps, reduction, _nh, _nw, _nb, chunk_rows = inputs
    _loss, lse, gh, gw, gb = output
    ctx.args, ctx.chunk_rows = (ignore_index, eps, reduction), chunk_rows
    # nothing flows into the other outputs: materialising their (zero) gradients would cost a [V, d]
    ctx.set_materialize_grads(False)
    _keep(ctx, (h, w, b, y, lse), (gh, gw, gb))


def _backward(ctx, grad, *_unused):
    # lse and the forward-made gradients are outputs for the backward's sake; nothing differentiates them
    if grad is None:  # a backward through those outputs alone
        return (None,) * 11
    gh, gw, gb = _grads(ctx, grad, torch.ops.tinymem.linear_ce_bwd)
    return gh, gw, gb, *([None] * 8)


registry.register_autograd({"linear_ce_fwd": (_backward, _setup_context)})


# --- public API -------------------------------------------------------------------------------


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                               ignore_index: int = -100, reduction: str = "mean",
                               label_smoothing: float = 0.0, *, chunk_rows: int | None = None,
                               validate: bool = True, backend: str | None = None) -> Tensor:
    """Cross-entropy of ``targets`` under the logits ``F.linear(hidden, weight, bias)`` without
    materialising them (see the module docstring for the exact semantics).

    hidden ``[..., d]`` and weight ``[V, d]`` (and bias ``[V]``) share one dtype (float32/float16/
    bfloat16); targets ``[...]`` integer in ``[0, V)`` or ``ignore_index``. Returns float32: a scalar for
    ``reduction="mean"``/``"sum"``, ``targets.shape`` for ``"none"`` (0 at ignored positions).
    Differentiable in hidden, weight and bias (gradients in their dtypes). ``chunk_rows``: rows per
    chunk (None = as many as fit ``CHUNK_BYTES`` of logits); ``validate=False`` skips the checks that read
    the data (targets in range, hidden and weight finite: a NaN then propagates to the loss, as in the
    plain path), for callers that guarantee them.
    """
    _check(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing)
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                   or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    if validate and not torch.compiler.is_compiling():
        check_values(hidden, weight, targets, vocab=weight.shape[0], ignore_index=ignore_index)
    b = registry.select("fused_linear_cross_entropy", hidden.device, backend, **DISPATCH)
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    h = h if h.is_contiguous() else h.contiguous()
    y = targets.reshape(-1).long().contiguous()
    w = weight.contiguous()
    bias_c = bias.contiguous() if bias is not None else None
    grad_on = torch.is_grad_enabled()
    need = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad)
    red = REDUCTIONS[reduction]
    args = (h, w, bias_c, y, int(ignore_index), float(label_smoothing), red, *need, int(chunk_rows or 0))
    if b in ("torch", "triton"):
        loss = _ChunkedLinearCrossEntropy.apply(*args, b)
    else:
        loss = torch.ops.tinymem.linear_ce_fwd(*args)[0]
    return loss.view(targets.shape) if red == REDUCTIONS["none"] else loss


class FusedLinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`fused_linear_cross_entropy`: ``forward(hidden, weight, targets, bias=None)``."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 backend: str | None = None):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.backend = label_smoothing, backend

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None) -> Tensor:
        return fused_linear_cross_entropy(hidden, weight, targets, bias, self.ignore_index, self.reduction,
                                          self.label_smoothing, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing:g}")


__all__ = ["FusedLinearCrossEntropyLoss", "fused_linear_cross_entropy"]
