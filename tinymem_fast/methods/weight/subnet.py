"""Subnet and BalancedSubnet: learn a supermask over every MLP matrix with frozen weights, then fold it.

Subnet ascends the forget loss. BalancedSubnet minimises ``-(1 - a) * L_forget + a * L_retain`` with
forget and retain rows drawn separately in every step, so no batch can miss either set (the reference
shuffles both into one loader; on TinyMem most of its batches then hold no forget row and average an
empty set into NaN). Both sets' rows share one forward pass per step (methods/steps.py), so a step costs
about one training step of the same batch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ...integrations.adapters import SubnetWrapping
from ...integrations.mixed_precision import check_precision
from ...ops.masked_subnet import SubnetSGD, check_ratio
from ..registry import UnlearnInputs, register
from ..sampling import Cycler
from ..steps import LossWatch, RowGroups, group_losses

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
    precision: str = "fp32"      # fp32 | bf16 (bf16 GEMMs, float32 scores and optimizer)
    progress: bool = False


@dataclass
class BalancedSubnetConfig(SubnetConfig):
    loss_weight: float = 0.9     # alpha, the retain weight
    forget_batch_size: int | None = None   # default batch_size // 2
    retain_batch_size: int | None = None   # default batch_size // 2


def _run(model, inputs: UnlearnInputs, cfg: SubnetConfig, balanced: bool) -> dict:
    check_ratio(cfg.ratio)
    check_precision(cfg.precision)
    device = next(model.parameters()).device
    nf = inputs.forget_ids.shape[0]
    sets = [(inputs.forget_ids, inputs.forget_pad)]
    if balanced:
        nr = inputs.retain_ids.shape[0]
        if nr == 0:
            raise ValueError("BalancedSubnet needs a non-empty retain set")
        alpha = cfg.loss_weight
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"loss_weight must be in [0, 1], got {alpha}")
        fb = cfg.forget_batch_size or max(1, cfg.batch_size // 2)
        rb = cfg.retain_batch_size or max(1, cfg.batch_size // 2)
        per_epoch = math.ceil((nf + nr) / cfg.batch_size)
        fcyc = Cycler(nf, torch.Generator().manual_seed(cfg.seed))
        rcyc = Cycler(nr, torch.Generator().manual_seed(cfg.seed + 1))
        sets.append((inputs.retain_ids, inputs.retain_pad))
    else:
        per_epoch = math.ceil(nf / cfg.batch_size)
    steps = per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    rows = RowGroups(sets, cfg.loss_on_pad, device)  # host inputs (the experiments') go to the model
    was_training = model.training
    model.eval()  # no dropout in the edited model; gradients still flow to the scores
    wrap = SubnetWrapping(model, cfg.ratio, score_init=cfg.score_init, seed=cfg.seed, backend=cfg.backend)
    opt = SubnetSGD(wrap.scores(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    backend=cfg.backend)
    watch = LossWatch(device)
    t0 = time.perf_counter()
    try:
        for step in tqdm(range(steps), desc="balanced_subnet" if balanced else "subnet",
                         disable=not cfg.progress):
            if balanced:
                # forget and retain rows in one forward pass, their losses split afterwards
                batch = rows.batch([fcyc.take(fb), rcyc.take(rb)])
                lf, lr_ = group_losses(model, batch, cfg.loss_on_pad, cfg.precision)
                loss = -(1.0 - alpha) * lf + alpha * lr_
                logged = {"forget_loss": lf, "retain_loss": lr_}
            else:
                b = step % per_epoch
                pick = torch.arange(b * cfg.batch_size, min(nf, (b + 1) * cfg.batch_size))
                lf = group_losses(model, rows.batch([pick]), cfg.loss_on_pad, cfg.precision)[0]
                loss = -lf
                logged = {"forget_loss": lf}
            watch.add(step, loss, **logged)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        watch.check(steps - 1)
    except BaseException:
        wrap.restore()  # scores are lost, the weights were never touched
        model.train(was_training)
        for p in model.parameters():
            p.requires_grad_(True)
        raise
    wrap.fold()
    model.train(was_training)
    for p in model.parameters():
        p.requires_grad_(True)
    return {"steps": steps, "time_edit_s": time.perf_counter() - t0, **watch.floats()}


@register("subnet", SubnetConfig, "weight", aliases=("random",))
def run_subnet(model, inputs: UnlearnInputs, cfg: SubnetConfig) -> dict:
    return _run(model, inputs, cfg, balanced=False)


@register("balanced_subnet", BalancedSubnetConfig, "weight", aliases=("random_greedy",))
def run_balanced_subnet(model, inputs: UnlearnInputs, cfg: BalancedSubnetConfig) -> dict:
    return _run(model, inputs, cfg, balanced=True)
