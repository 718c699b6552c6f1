"""Slimming: learn a [0, 1] coefficient per MLP neuron that keeps the frozen model fitting the forget set
under an L1 pull towards zero; the neurons that keep large coefficients carry the memorized data and are
ablated (top floor(ratio * I) per layer).

Loss = L_F + lambda * mean|c| with Adam on c only; gradients are zeroed every step (the reference zeroed
them once per epoch, so they accumulated across batches). The stop follows the reference's effective
schedule by default (``stop_rule="reference_epochs"``): the sparsity term is compared with ``stop_loss``
only in every 100th epoch, and falling below it ends that epoch alone, so the paper's 1/10/20-epoch runs
train every epoch in full. ``stop_rule="first_step_below"`` ends training after the first step whose
term is below ``stop_loss`` (this library's earlier behaviour).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ...integrations.adapters import mlp_layers
from ...integrations.mixed_precision import check_precision
from ..registry import UnlearnInputs, register
from .ablation import GateFit, ablate_neurons, check_stop_rule, fit_neuron_gates, top_neurons

# the reference compares the penalty with stop_loss only in epochs (i + 1) % 100 == 0
STOP_CHECK_EVERY = 100


@dataclass
class SlimmingConfig:
    ratio: float = 0.01
    epochs: int = 1
    lr: float = 0.1
    l1_lambda: float = 1000.0
    stop_loss: float = 0.1
    stop_rule: str = "reference_epochs"  # reference_epochs (paper) | first_step_below
    batch_size: int = 32
    loss_on_pad: bool = False
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 (bf16 GEMMs; float32 gates, gradients and Adam state)
    progress: bool = False

    def __post_init__(self):
        check_stop_rule(self.stop_rule)
        check_precision(self.precision)


def slimming_coefficients(model, inputs: UnlearnInputs, cfg: SlimmingConfig) -> tuple[torch.Tensor, GateFit]:
    """Train the coefficients; returns (clipped c ``[n_layer, I]`` on CPU, what the fit did)."""
    device = next(model.parameters()).device
    layers = mlp_layers(model)
    coef = torch.ones(len(layers), layers[0].intermediate_size, device=device, requires_grad=True)
    fit = fit_neuron_gates(model, inputs.forget_ids, inputs.forget_pad, coef, lambda: coef.clamp(0, 1),
                           lambda: coef.abs().mean(), weight=cfg.l1_lambda, epochs=cfg.epochs,
                           batch_size=cfg.batch_size, lr=cfg.lr, stop_loss=cfg.stop_loss,
                           stop_rule=cfg.stop_rule, check_every=STOP_CHECK_EVERY,
                           loss_on_pad=cfg.loss_on_pad, precision=cfg.precision, desc="slimming",
                           progress=cfg.progress)
    return coef.detach().clamp(0, 1).cpu(), fit


@register("slimming", SlimmingConfig, "neuron", aliases=("slim",))
def run_slimming(model, inputs: UnlearnInputs, cfg: SlimmingConfig) -> dict:
    t0 = time.perf_counter()
    was = model.training
    model.eval()
    coef, fit = slimming_coefficients(model, inputs, cfg)
    model.train(was)
    count = ablate_neurons(model, top_neurons(coef, cfg.ratio))
    return {"time_edit_s": time.perf_counter() - t0, "ablated": count, "steps": fit.steps,
            "epochs_cut": list(fit.epochs_cut)}
