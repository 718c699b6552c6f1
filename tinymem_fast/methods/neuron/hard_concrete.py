"""Hard Concrete: learn an L0-regularised stochastic gate per MLP neuron on the frozen model; the neurons
whose gates stay open while the forget set is still fitted carry the memorized data and are ablated.

Each neuron of each layer gets a log-alpha, initialised at ``logit(hc_init_p)`` plus N(0, 0.01^2) noise.
A training forward samples ``u ~ U(0, 1)``, ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)`` and
multiplies the activation by the stretched, clipped gate ``z = clamp(s * (r - l) + l, 0, 1)``. The loss is
``L_F + l0_lambda * mean sigmoid(log_alpha - beta * log(-l / r))`` (the expected fraction of open gates),
minimised with Adam on log-alpha only. Gradients are zeroed every step (the reference zeroed them once
per epoch, so they accumulated across batches). The stop follows the reference's effective schedule by
default (``stop_rule="reference_epochs"``): the penalty is compared with ``stop_loss`` only in every 10th
epoch, at each batch before its step, and the first batch below it ends that epoch alone (with 20 epochs,
epochs 10 and 20 may be cut short, the other 18 train in full); ``stop_rule="first_step_below"`` ends
training after the first step whose penalty is below ``stop_loss``. Attribution = ``sigmoid(log_alpha)``;
the top ``floor(ratio * I)`` per layer are ablated. ``hc_init_p`` is honoured (the reference ignored its
``mask_p``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ...integrations.adapters import mlp_layers
from ...integrations.mixed_precision import check_precision
from ...ops.masked_subnet import check_ratio
from ..registry import UnlearnInputs, register
from ..steps import to_device
from .ablation import GateFit, ablate_neurons, check_stop_rule, fit_neuron_gates, top_neurons

# the reference compares the penalty with stop_loss only in epochs (i + 1) % 10 == 0
STOP_CHECK_EVERY = 10


@dataclass
class HardConcreteConfig:
    ratio: float = 0.01
    epochs: int = 1
    lr: float = 0.1
    l0_lambda: float = 1000.0
    stop_loss: float = 0.1
    stop_rule: str = "reference_epochs"  # reference_epochs (paper) | first_step_below
    hc_beta: float = 2.0 / 3.0
    hc_l: float = -0.1
    hc_r: float = 1.1
    hc_init_p: float = 0.5
    batch_size: int = 32
    loss_on_pad: bool = False
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 (bf16 GEMMs; float32 gates, gradients and Adam state)
    progress: bool = False

    def __post_init__(self):
        check_stop_rule(self.stop_rule)
        check_precision(self.precision)
        if not 0.0 < self.hc_init_p < 1.0:
            raise ValueError(f"hc_init_p must be in (0, 1), got {self.hc_init_p}")
        if not (self.hc_l < 0.0 < 1.0 < self.hc_r):
            raise ValueError(f"need hc_l < 0 and hc_r > 1 (the stretch interval), "
                             f"got ({self.hc_l}, {self.hc_r})")
        if self.hc_beta <= 0:
            raise ValueError(f"hc_beta must be > 0, got {self.hc_beta}")


def sample_gate(log_alpha: torch.Tensor, cfg: HardConcreteConfig, gen: torch.Generator) -> torch.Tensor:
    """One stretched, clipped Hard Concrete sample per gate (differentiable in ``log_alpha``)."""
    u = torch.rand(log_alpha.shape, generator=gen, device=gen.device)
    u = to_device(u, log_alpha.device)  # a blocking host -> device copy would wait for the queue
    u = u.clamp(1e-6, 1 - 1e-6)  # log(0) would make the sample NaN
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / cfg.hc_beta)
    return (s * (cfg.hc_r - cfg.hc_l) + cfg.hc_l).clamp(0.0, 1.0)


def deterministic_gate(log_alpha: torch.Tensor, cfg: HardConcreteConfig) -> torch.Tensor:
    return (torch.sigmoid(log_alpha) * (cfg.hc_r - cfg.hc_l) + cfg.hc_l).clamp(0.0, 1.0)


def l0_penalty(log_alpha: torch.Tensor, cfg: HardConcreteConfig) -> torch.Tensor:
    """Expected fraction of non-zero gates."""
    return torch.sigmoid(log_alpha - cfg.hc_beta * math.log(-cfg.hc_l / cfg.hc_r)).mean()


def hard_concrete_gates(model, inputs: UnlearnInputs,
                        cfg: HardConcreteConfig) -> tuple[torch.Tensor, GateFit]:
    """Train the gates; returns (sigmoid(log_alpha) ``[n_layer, I]`` on CPU, what the fit did)."""
    device = next(model.parameters()).device
    layers = mlp_layers(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    init = math.log(cfg.hc_init_p / (1 - cfg.hc_init_p))
    log_alpha = (init + 0.01 * torch.randn(len(layers), layers[0].intermediate_size, generator=gen))
    log_alpha = log_alpha.to(device).requires_grad_(True)
    fit = fit_neuron_gates(model, inputs.forget_ids, inputs.forget_pad, log_alpha,
                           lambda: sample_gate(log_alpha, cfg, gen), lambda: l0_penalty(log_alpha, cfg),
                           weight=cfg.l0_lambda, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                           stop_loss=cfg.stop_loss, stop_rule=cfg.stop_rule, check_every=STOP_CHECK_EVERY,
                           loss_on_pad=cfg.loss_on_pad, precision=cfg.precision, desc="hard concrete",
                           progress=cfg.progress)
    return torch.sigmoid(log_alpha.detach()).cpu(), fit


@register("hard_concrete", HardConcreteConfig, "neuron", aliases=("hc",))
def run_hard_concrete(model, inputs: UnlearnInputs, cfg: HardConcreteConfig) -> dict:
    check_ratio(cfg.ratio)
    t0 = time.perf_counter()
    was = model.training
    model.eval()
    try:
        attribution, fit = hard_concrete_gates(model, inputs, cfg)
    finally:
        model.train(was)
    count = ablate_neurons(model, top_neurons(attribution, cfg.ratio))
    return {"time_edit_s": time.perf_counter() - t0, "ablated": count, "steps": fit.steps,
            "epochs_cut": list(fit.epochs_cut)}
