"""Subnet and BalancedSubnet: learn a supermask over every MLP matrix with frozen weights, then fold it.

Subnet ascends the forget loss. BalancedSubnet minimises ``-(1 - a) * L_forget + a * L_retain`` with
forget and retain rows drawn separately in every step, so no batch can miss either set (the reference
shuffles both into one loader; on TinyMem most of its batches then hold no forget row and average an
empty set into NaN).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ...integrations.adapters import SubnetWrapping
from ...ops.masked_subnet import SubnetSGD, check_ratio
from ...tinymem.training import token_loss
from ..registry import UnlearnInputs, register
from ..sampling import Cycler

log = logging.getLogger(__name__)


@dataclass
class SubnetConfig:
    ratio: float = 0.05          # fraction of each MLP matrix dropped
    epochs: int = 1
    lr: float = 0.1              # SGD on the scores
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    score_init: str = "kaiming"  # kaiming (paper) | magnitude
    max_steps: int | None = None
    loss_on_pad: bool = False
    seed: int = 0
    backend: str | None = None
    progress: bool = False


@dataclass
class BalancedSubnetConfig(SubnetConfig):
    loss_weight: float = 0.9     # alpha, the retain weight
    forget_batch_size: int | None = None   # default batch_size // 2
    retain_batch_size: int | None = None   # default batch_size // 2


def _mean_loss(model, ids, pad, loss_on_pad):
    seq, _ = token_loss(model, ids, pad, loss_on_pad)
    return seq.mean()


def _run(model, inputs: UnlearnInputs, cfg: SubnetConfig, balanced: bool) -> dict:
    check_ratio(cfg.ratio)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout in the edited model; gradients still flow to the scores
    wrap = SubnetWrapping(model, cfg.ratio, score_init=cfg.score_init, seed=cfg.seed, backend=cfg.backend)
    opt = SubnetSGD(wrap.scores(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    backend=cfg.backend)
    nf = inputs.forget_ids.shape[0]
    if balanced:
        nr = inputs.retain_ids.shape[0]
        if nr == 0:
            raise ValueError("BalancedSubnet needs a non-empty retain set")
        fb = cfg.forget_batch_size or max(1, cfg.batch_size // 2)
        rb = cfg.retain_batch_size or max(1, cfg.batch_size // 2)
        per_epoch = math.ceil((nf + nr) / cfg.batch_size)
        fcyc = Cycler(nf, torch.Generator().manual_seed(cfg.seed))
        rcyc = Cycler(nr, torch.Generator().manual_seed(cfg.seed + 1))
        alpha = cfg.loss_weight
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"loss_weight must be in [0, 1], got {alpha}")
    else:
        per_epoch = math.ceil(nf / cfg.batch_size)
    steps = per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    t0 = time.perf_counter()
    last = {}
    desc = "balanced_subnet" if balanced else "subnet"
    for step in tqdm(range(steps), desc=desc, disable=not cfg.progress):
        if balanced:
            fi, ri = fcyc.take(fb), rcyc.take(rb)
            lf = _mean_loss(model, inputs.forget_ids[fi].to(device), inputs.forget_pad[fi].to(device),
                            cfg.loss_on_pad)
            lr_ = _mean_loss(model, inputs.retain_ids[ri].to(device), inputs.retain_pad[ri].to(device),
                             cfg.loss_on_pad)
            loss = -(1.0 - alpha) * lf + alpha * lr_
            last = {"forget_loss": lf.item(), "retain_loss": lr_.item()}
        else:
            b = step % per_epoch
            sl = slice(b * cfg.batch_size, (b + 1) * cfg.batch_size)
            lf = _mean_loss(model, inputs.forget_ids[sl].to(device), inputs.forget_pad[sl].to(device),
                            cfg.loss_on_pad)
            loss = -lf
            last = {"forget_loss": lf.item()}
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    wrap.fold()
    model.train(was_training)
    for p in model.parameters():
        p.requires_grad_(True)
    return {"steps": steps, "time_edit_s": time.perf_counter() - t0, **last}


@register("subnet", SubnetConfig, "weight", aliases=("random",))
def run_subnet(model, inputs: UnlearnInputs, cfg: SubnetConfig) -> dict:
    return _run(model, inputs, cfg, balanced=False)


@register("balanced_subnet", BalancedSubnetConfig, "weight", aliases=("random_greedy",))
def run_balanced_subnet(model, inputs: UnlearnInputs, cfg: BalancedSubnetConfig) -> dict:
    return _run(model, inputs, cfg, balanced=True)
