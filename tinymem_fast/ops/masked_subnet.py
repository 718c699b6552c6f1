"""Masked subnet (supermask) ops: the engine of Subnet and BalancedSubnet unlearning.

A frozen weight ``W`` gets a trainable score tensor ``S`` of the same shape. The layer computes with
``W * M`` where ``M`` drops the ``k = floor(ratio * numel)`` entries of smallest ``|S|``. Ties are broken
by flat index, so exactly ``k`` entries are dropped and every backend drops the same ones:

    entry i is dropped  <=>  |S_i| < value  or  (|S_i| == value and i < cut)

``(value, cut)`` is a :class:`SubnetThreshold`, found by k-th-value selection (never a full sort) once
per change of ``S`` and applied inside the kernels, so the mask itself is never stored.

Backward is the straight-through estimator: ``dS = (dL/dW_eff * W) * sign(S)`` (the mask depends on
``|S|``, hence the sign). :class:`SubnetSGD` updates scores with SGD + momentum + weight decay in one
fused pass. :meth:`MaskedSubnet.fold` writes ``W * M`` back into the plain layer.

Weights may be laid out ``[out, in]`` (``nn.Linear``, ``layout="linear"``) or ``[in, out]`` (GPT-2's
``Conv1D``, ``layout="conv1d"``); the elementwise kernels are layout-agnostic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

import torch
from torch import Tensor, nn

from . import registry

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LAYOUTS = ("linear", "conv1d")


@dataclass(frozen=True)
class SubnetThreshold:
    """Which entries of a score tensor are dropped (see the module docstring).

    ``value`` is a 0-dim float32 tensor and ``cut`` a 0-dim int64 tensor, both on the scores' device so
    GPU code never waits on the host; ``k`` is the number of dropped entries.
    """

    value: Tensor
    cut: Tensor
    k: int


# --- validation -------------------------------------------------------------------------------


def check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a float in (0, 1), got {type(ratio).__name__}")
    r = float(ratio)
    if not (0.0 < r < 1.0) or math.isnan(r):
        hint = f" (a percentage? use {r / 100:g})" if 1.0 <= r <= 100.0 else ""
        raise ValueError(f"ratio must be a fraction in the open interval (0, 1), got {ratio!r}{hint}")
    return r


def num_dropped(numel: int, ratio: float) -> int:
    """``floor(ratio * numel)``, computed on the ratio's decimal form so 0.3 * 10 gives 3, not 2."""
    return int(Decimal(repr(check_ratio(ratio))) * numel)


def _check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32/float16/bfloat16), got {t.dtype}")


def _check_same_shape(**tensors: Tensor) -> None:
    (n0, t0), *rest = tensors.items()
    for name, t in rest:
        if t.shape != t0.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {n0} has shape {tuple(t0.shape)}; "
                             "they must match")
        if t.device != t0.device:
            raise ValueError(f"{name} is on {t.device} but {n0} is on {t0.device}")


# --- torch reference --------------------------------------------------------------------------


def _abs_key(scores: Tensor) -> Tensor:
    # float32 holds every fp16/bf16 value exactly, so comparisons are unchanged by the upcast
    return scores.detach().reshape(-1).float().abs()


def threshold_torch(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    key = _abs_key(scores)
    if not torch.compiler.is_compiling() and torch.isnan(key).any():
        raise ValueError("scores contain NaN; the mask is undefined (did the loss diverge?)")
    if k == 0:
        return key.new_zeros(()), torch.zeros((), dtype=torch.int64, device=key.device)
    value = torch.kthvalue(key, k).values
    need = k - (key < value).sum()
    # the cut is one past the need-th tie: found on the device (no host round trip, no data-dependent
    # shape, so it also traces under torch.compile)
    ties_seen = torch.cumsum(key == value, 0)
    return value, torch.searchsorted(ties_seen, need.reshape(1)).reshape(()) + 1


def keep_mask_torch(scores: Tensor, value: Tensor, cut: Tensor) -> Tensor:
    key = _abs_key(scores)
    # ties before the cut are dropped, the rest kept
    late_tie = (key == value) & (torch.arange(key.numel(), device=key.device) >= cut)
    return ((key > value) | late_tie).view(scores.shape)


def masked_weight_torch(weight: Tensor, scores: Tensor, value: Tensor, cut: Tensor) -> Tensor:
    return weight * keep_mask_torch(scores, value, cut).to(weight.dtype)


def ste_grad_torch(grad: Tensor, weight: Tensor, scores: Tensor) -> Tensor:
    return (grad.float() * weight.float() * torch.sign(scores.float())).to(scores.dtype)


def sgd_step_torch(scores: Tensor, grad: Tensor, buf: Tensor, lr: float, momentum: float,
                   weight_decay: float, maximize: bool) -> None:
    s = scores.detach().float()
    g = grad.float()
    if maximize:
        g = -g
    g = g + weight_decay * s
    buf.mul_(momentum).add_(g)
    scores.detach().copy_(s - lr * buf)


# --- dispatch ---------------------------------------------------------------------------------


def _triton():
    from tinymem_fast.kernels import masked_subnet as tk

    return tk


def subnet_threshold(scores: Tensor, ratio: float, *, backend: str | None = None) -> SubnetThreshold:
    """Threshold that drops the ``floor(ratio * numel)`` smallest-``|scores|`` entries (ties by index)."""
    _check_float("scores", scores)
    if scores.numel() == 0:
        raise ValueError("scores is empty")
    return _threshold(scores, num_dropped(scores.numel(), ratio), backend)


def _threshold(scores: Tensor, k: int, backend: str | None) -> SubnetThreshold:
    b = registry.select("subnet_threshold", scores.device, backend, **DISPATCH)
    if b == "torch":
        value, cut = threshold_torch(scores, k)
    elif b == "triton":
        value, cut = _triton().threshold(scores.detach().contiguous(), k)
    else:
        value, cut = torch.ops.tinymem.subnet_threshold(scores.detach().contiguous(), k)
    return SubnetThreshold(value=value, cut=cut, k=k)


def subnet_keep_mask(scores: Tensor, threshold: SubnetThreshold) -> Tensor:
    """Boolean mask, True where the weight is kept (for analysis and tests; the kernels never store it)."""
    return keep_mask_torch(scores, threshold.value, threshold.cut)


def masked_weight(weight: Tensor, scores: Tensor, threshold: SubnetThreshold, *,
                  backend: str | None = None) -> Tensor:
    """``weight * mask`` in the weight's dtype, the mask applied on the fly from ``scores``."""
    _check_float("weight", weight)
    _check_float("scores", scores)
    _check_same_shape(weight=weight, scores=scores)
    b = registry.select("masked_weight", weight.device, backend, **DISPATCH)
    w, s = weight.detach().contiguous(), scores.detach().contiguous()
    if b == "torch":
        return masked_weight_torch(w, s, threshold.value, threshold.cut)
    if b == "triton":
        return _triton().masked_weight(w, s, threshold.value, threshold.cut)
    return torch.ops.tinymem.subnet_masked_weight(w, s, threshold.value, threshold.cut)


def ste_score_grad(grad: Tensor, weight: Tensor, scores: Tensor, *, backend: str | None = None) -> Tensor:
    """Straight-through score gradient ``grad * weight * sign(scores)``, in the scores' dtype."""
    _check_same_shape(grad=grad, weight=weight, scores=scores)
    b = registry.select("ste_score_grad", grad.device, backend, **DISPATCH)
    g, w, s = grad.contiguous(), weight.detach().contiguous(), scores.detach().contiguous()
    if b == "torch":
        return ste_grad_torch(g, w, s)
    if b == "triton":
        return _triton().ste_grad(g, w, s)
    return torch.ops.tinymem.subnet_ste_grad(g, w, s)


def subnet_sgd_step_(scores: Tensor, grad: Tensor, momentum_buffer: Tensor, *, lr: float,
                     momentum: float = 0.9, weight_decay: float = 5e-4, maximize: bool = False,
                     backend: str | None = None) -> None:
    """One SGD step on ``scores`` in place, same rule as ``torch.optim.SGD`` (dampening 0, no Nesterov).

    ``momentum_buffer`` is float32, starts at zero and is updated in place; one pass over memory.
    """
    _check_float("scores", scores)
    _check_same_shape(scores=scores, grad=grad, momentum_buffer=momentum_buffer)
    if momentum_buffer.dtype != torch.float32:
        raise TypeError(f"momentum_buffer must be float32, got {momentum_buffer.dtype}")
    if not (scores.is_contiguous() and momentum_buffer.is_contiguous()):
        raise ValueError("scores and momentum_buffer must be contiguous (they are updated in place)")
    b = registry.select("subnet_sgd_step", scores.device, backend, **DISPATCH)
    g = grad.contiguous()
    if b == "torch":
        sgd_step_torch(scores, g, momentum_buffer, lr, momentum, weight_decay, maximize)
    else:
        if b == "triton":
            _triton().sgd_step(scores.detach(), g, momentum_buffer, lr, momentum, weight_decay, maximize)
        else:
            torch.ops.tinymem.subnet_sgd_step_(scores.detach(), g, momentum_buffer, float(lr),
                                               float(momentum), float(weight_decay), bool(maximize))
        # kernels write memory behind autograd's back; bumping the version keeps caches keyed on it honest
        torch.autograd.graph.increment_version(scores)


# --- shapes of the compiled ops, for torch.compile (registered at import) ----------------------------


def _threshold_fake(scores, k):
    return scores.new_empty((), dtype=torch.float32), scores.new_empty((), dtype=torch.int64)


def _masked_weight_fake(weight, scores, value, cut):
    return torch.empty_like(weight)


def _ste_grad_fake(grad, weight, scores):
    return torch.empty_like(scores)


def _sgd_step_fake(scores, grad, momentum_buffer, lr, momentum, weight_decay, maximize):
    return None


# how registry.select dispatches this family (every call passes it)
DISPATCH = {"backends": registry.BACKENDS,
            "ext_ops": ("subnet_threshold", "subnet_masked_weight", "subnet_ste_grad", "subnet_sgd_step_")}

registry.register_fakes({"subnet_threshold": _threshold_fake, "subnet_masked_weight": _masked_weight_fake,
                         "subnet_ste_grad": _ste_grad_fake, "subnet_sgd_step_": _sgd_step_fake})


# --- autograd ---------------------------------------------------------------------------------


# W*M is kept for backward up to this many entries (16 MiB in float32): on small layers rebuilding it is a
# pass over memory as costly as the layer's GEMMs; on large ones keeping it would double weight memory
KEEP_MASKED_WEIGHT_MAX = 1 << 22


class _MaskedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scores, value, cut, bias, layout, backend):
        thr = SubnetThreshold(value, cut, -1)
        w_eff = masked_weight(weight, scores, thr, backend=backend)
        dev = x.device.type
        # Under autocast, cast here, once, what autocast would cast inside the GEMM, and keep the cast
        # input for backward: a float32 input saved and cast again there is a second pass over it.
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else w_eff.dtype
        x_c, w_c = x.to(cdt), w_eff.to(cdt)
        b_c = bias.to(cdt) if bias is not None else None
        # the bias rides in the GEMM (addmm), not a second pass over the output
        if layout == "linear":
            y = torch.nn.functional.linear(x_c, w_c, b_c)
        elif b_c is not None:
            y = torch.addmm(b_c, x_c.reshape(-1, x.shape[-1]), w_c).view(*x.shape[:-1], w_c.shape[1])
        else:
            y = x_c @ w_c
        keep = w_eff.numel() <= KEEP_MASKED_WEIGHT_MAX
        ctx.save_for_backward(x_c, weight, scores, value, cut, w_c if keep else None)
        ctx.layout, ctx.backend, ctx.has_bias = layout, backend, bias is not None
        ctx.compute_dtype, ctx.x_dtype = cdt, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x_c, weight, scores, value, cut, w_c = ctx.saved_tensors
        layout, backend, cdt = ctx.layout, ctx.backend, ctx.compute_dtype
        thr = SubnetThreshold(value, cut, -1)
        need_x, need_w, need_s = ctx.needs_input_grad[:3]
        dx = dw = ds = db = None
        dyc = dy.to(cdt)
        if need_x:
            if w_c is None:
                w_c = masked_weight(weight, scores, thr, backend=backend).to(cdt)
            dx = (dyc @ (w_c if layout == "linear" else w_c.t())).to(ctx.x_dtype)
        if need_w or need_s:
            dy2, x2 = dyc.reshape(-1, dy.shape[-1]), x_c.reshape(-1, x_c.shape[-1])
            g = dy2.t() @ x2 if layout == "linear" else x2.t() @ dy2
            g = g.to(weight.dtype)  # dL/dW_eff in the weight's precision (float32 under bf16 autocast)
            if need_s:
                ds = ste_score_grad(g, weight, scores, backend=backend)
            if need_w:
                dw = masked_weight(g, scores, thr, backend=backend)
        if ctx.has_bias and ctx.needs_input_grad[5]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, ds, None, None, db, None, None


def masked_linear(x: Tensor, weight: Tensor, scores: Tensor, threshold: SubnetThreshold,
                  bias: Tensor | None = None, *, layout: str = "linear",
                  backend: str | None = None) -> Tensor:
    """``x @ (W*M)^T + b`` (``linear``, W ``[out, in]``) or ``x @ (W*M) + b`` (``conv1d``, W ``[in, out]``)
    with the straight-through gradient for ``scores``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    in_features = weight.shape[1] if layout == "linear" else weight.shape[0]
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features but the {layout}-layout weight "
                         f"{tuple(weight.shape)} expects {in_features}")
    return _MaskedLinearFn.apply(x, weight, scores, threshold.value, threshold.cut, bias, layout, backend)


# --- module and optimizer ---------------------------------------------------------------------


def layout_of(module: nn.Module) -> str:
    """``linear`` for ``nn.Linear``; ``conv1d`` for Hugging Face GPT-2 ``Conv1D`` (weight ``[in, out]``)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "conv1d"
    raise TypeError(f"cannot mask a {type(module).__name__}: expected nn.Linear or transformers Conv1D")


class MaskedSubnet(nn.Module):
    """Wraps a Linear / Conv1D layer: frozen weight, trainable ``scores``, straight-through masking.

    The threshold is recomputed only when ``scores`` changed since the last forward (tracked by the
    tensor's version counter), i.e. once per optimizer step.
    """

    def __init__(self, base: nn.Module, ratio: float, *, score_init: str = "kaiming",
                 generator: torch.Generator | None = None, backend: str | None = None):
        super().__init__()
        self.layout = layout_of(base)
        self.ratio = check_ratio(ratio)
        self.backend = backend
        self.base = base
        base.weight.requires_grad_(False)
        if getattr(base, "bias", None) is not None:
            base.bias.requires_grad_(False)
        w = base.weight.detach()
        if score_init == "kaiming":
            # kaiming_uniform(a=sqrt(5)) over the true fan-in, whatever the storage layout
            fan_in = w.shape[1] if self.layout == "linear" else w.shape[0]
            bound = 1.0 / math.sqrt(fan_in)
            s = torch.empty(w.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        elif score_init == "magnitude":
            s = w.float().abs().cpu()
        else:
            raise ValueError(f"score_init must be 'kaiming' or 'magnitude', got {score_init!r}")
        self.scores = nn.Parameter(s.to(w.device))
        self.k = num_dropped(self.scores.numel(), self.ratio)
        self._cache: tuple[int, SubnetThreshold] | None = None

    def threshold(self) -> SubnetThreshold:
        if torch.compiler.is_compiling():
            # a compiled graph cannot key a cache on the version counter: the selection is in the graph,
            # once per forward (one forward per optimizer step when training)
            return _threshold(self.scores, self.k, self.backend)
        version = self.scores._version
        if self._cache is None or self._cache[0] != version:
            self._cache = (version, subnet_threshold(self.scores, self.ratio, backend=self.backend))
        return self._cache[1]

    def forward(self, x: Tensor) -> Tensor:
        return masked_linear(x, self.base.weight, self.scores, self.threshold(), self.base.bias,
                             layout=self.layout, backend=self.backend)

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """Write ``W * M`` into the wrapped layer and return it (the scores are no longer needed)."""
        w = self.base.weight
        w.copy_(masked_weight(w, self.scores, self.threshold(), backend=self.backend))
        return self.base

    def extra_repr(self) -> str:
        return f"layout={self.layout}, ratio={self.ratio:g}, shape={tuple(self.scores.shape)}"


class SubnetSGD(torch.optim.Optimizer):
    """SGD with momentum and weight decay on score tensors, one fused pass per tensor per step.

    Same update as ``torch.optim.SGD(momentum=m, weight_decay=wd, dampening=0, nesterov=False)``;
    momentum buffers are float32 whatever the score dtype.
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                 maximize: bool = False, backend: str | None = None):
        if lr <= 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"need lr > 0, momentum >= 0, weight_decay >= 0; got {lr}, {momentum}, "
                             f"{weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      maximize=maximize, backend=backend))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                subnet_sgd_step_(p, p.grad, state["momentum_buffer"], lr=group["lr"],
                                 momentum=group["momentum"], weight_decay=group["weight_decay"],
                                 maximize=group["maximize"], backend=group["backend"])
        return loss
