"""Durable and DurableAggregate: zero the MLP weights with the largest forget-loss gradient.

One gradient of the forget loss is accumulated over the whole forget set (the mean per-sequence loss
of every batch, summed over batches; model in eval mode). Then:

* ``durable`` zeroes, in each MLP tensor separately (weights and biases), the ``k = floor(ratio * numel)``
  entries of largest ``|grad|``; a tensor with ``k = 0`` is left alone.
* ``durable_aggregate`` zeroes the ``k = floor(ratio * N)`` entries of largest ``|grad|`` over all MLP
  tensors together (``N`` their total size), so layers with larger gradients lose more.

Selection is by k-th value, never a full sort, and exactly ``k`` entries are chosen: every entry with
``|g|`` above the k-th largest value, then entries equal to it in order of flat index (for the
aggregate, position in the concatenation of the tensors in ``mlp_parameters`` order) until ``k`` are
taken. The aggregate finds the global k-th value by radix select over the tensors one at a time
(``topk.top_k_masks``), so its temporaries scale with the largest MLP tensor, not with all of them.

Each batch is cut to its longest content row and runs with the fused attention on a CPU
(methods/steps.py); ``precision = "bf16"`` runs its GEMMs in bf16 under autocast, while the weights,
the accumulated gradient and the selection stay float32. A non-finite forget loss raises
FloatingPointError (checked every batch on a CPU, every 50 on a GPU, and before any selection).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ...integrations.adapters import mlp_parameters
from ...integrations.mixed_precision import check_precision
from ...ops.masked_subnet import check_ratio, num_dropped
from ..registry import UnlearnInputs, register
from ..steps import LossWatch, RowGroups, group_losses
from .topk import top_k_masks


@dataclass
class DurableConfig:
    ratio: float = 0.01        # fraction of MLP entries zeroed (per tensor, or over all for the aggregate)
    batch_size: int = 64
    loss_on_pad: bool = False
    seed: int = 0              # unused: the method is deterministic; kept for a uniform interface
    precision: str = "fp32"    # fp32 | bf16 (bf16 GEMMs; float32 weights, gradient and selection)
    progress: bool = False

    def __post_init__(self):
        check_precision(self.precision)


def top_k_mask(key: Tensor, k: int) -> Tensor:
    """Boolean mask (shape of ``key``) of the ``k`` largest entries of ``key``, ties by flat index.

    ``key`` must be non-negative (an absolute value). Uses ``kthvalue``, not a sort.
    """
    flat = key.reshape(-1)
    n = flat.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if torch.isnan(flat).any():
        raise ValueError("gradient contains NaN; the selection is undefined (did the loss diverge?)")
    if k == 0:
        return torch.zeros_like(key, dtype=torch.bool)
    # the k-th largest of key is minus the k-th smallest of -key
    value = -torch.kthvalue(-flat, k).values
    above = flat > value
    need = k - above.sum()                       # how many entries equal to value are still needed
    ties = torch.nonzero(flat == value).reshape(-1)   # in flat order
    above[ties[: int(need)]] = True
    return above.view(key.shape)


def forget_gradient(model, inputs: UnlearnInputs, batch_size: int, loss_on_pad: bool,
                    progress: bool = False, precision: str = "fp32",
                    ) -> tuple[list[tuple[str, torch.nn.Parameter]], list[Tensor], int]:
    """float32 gradient of the forget loss w.r.t. every MLP parameter, and the number of batches.

    The loss is the mean per-sequence CE of each batch, summed over batches. ``.grad`` is never
    touched (``torch.autograd.grad``); requires_grad flags and the train/eval mode are restored.
    ``precision``: of the forward/backward GEMMs (``bf16`` under autocast; the parameters stay float32,
    so their gradients are float32 tensors).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_precision(precision)
    params = mlp_parameters(model)
    device = next(model.parameters()).device
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    grads = [torch.zeros_like(p, dtype=torch.float32) for _, p in params]
    n = inputs.forget_ids.shape[0]
    batches = range(0, n, batch_size)
    rows = RowGroups([(inputs.forget_ids, inputs.forget_pad)], loss_on_pad, device)
    watch = LossWatch(device, what="forget loss", unit="batch", hint="")
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
        for b, i in enumerate(tqdm(batches, desc="durable gradient", disable=not progress)):
            batch = rows.batch([torch.arange(i, min(n, i + batch_size))])
            loss = group_losses(model, batch, loss_on_pad, precision)[0]
            watch.add(b, loss)
            gs = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
            for acc, g in zip(grads, gs, strict=True):
                if g is not None:
                    acc.add_(g.float())
        watch.check(len(batches) - 1)
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    return params, grads, len(batches)


@torch.no_grad()
def _zero_(params, masks) -> int:
    zeroed = 0
    for (_, p), m in zip(params, masks, strict=True):
        if m is not None:
            p.masked_fill_(m, 0)
            zeroed += int(m.sum())
    return zeroed


def _finish(model, info: dict) -> dict:
    for p in model.parameters():
        p.grad = None
    return info


@register("durable", DurableConfig, "weight", aliases=("durable",))
def run_durable(model, inputs: UnlearnInputs, cfg: DurableConfig) -> dict:
    check_ratio(cfg.ratio)
    t0 = time.perf_counter()
    params, grads, passes = forget_gradient(model, inputs, cfg.batch_size, cfg.loss_on_pad, cfg.progress,
                                            cfg.precision)
    masks = []
    for g in grads:
        k = num_dropped(g.numel(), cfg.ratio)
        masks.append(top_k_mask(g.abs(), k) if k else None)
    zeroed = _zero_(params, masks)
    return _finish(model, {"time_edit_s": time.perf_counter() - t0, "zeroed": zeroed, "grad_passes": passes})


@register("durable_aggregate", DurableConfig, "weight", aliases=("durable_agg",))
def run_durable_aggregate(model, inputs: UnlearnInputs, cfg: DurableConfig) -> dict:
    check_ratio(cfg.ratio)
    t0 = time.perf_counter()
    params, grads, passes = forget_gradient(model, inputs, cfg.batch_size, cfg.loss_on_pad, cfg.progress,
                                            cfg.precision)
    for g in grads:       # our own float32 accumulators: |grad| in place, no copy
        g.abs_()
    k = num_dropped(sum(g.numel() for g in grads), cfg.ratio)
    masks = top_k_masks(grads, k)     # radix select over the tensors in turn, never a concatenation
    del grads
    zeroed = _zero_(params, masks)
    return _finish(model, {"time_edit_s": time.perf_counter() - t0, "zeroed": zeroed, "grad_passes": passes})
