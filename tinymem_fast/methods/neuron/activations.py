"""Activations: ablate the neurons that fire hardest, weighted by how much they write, on the forget set.

One forward pass over the forget set (eval mode, no grad). For each row the MLP activations are averaged
over positions ``start - 1`` .. last non-pad token (``start`` = the memorized window's first position,
``inputs.forget_start[r]``, else 1, so the position predicting the window's first token counts), then
averaged over rows. The attribution is ``A[l, i] = |mean act_i| * ||w_out,i||_2`` and the top
``floor(ratio * I)`` neurons of every layer are ablated (:mod:`.ablation`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ...integrations.adapters import mlp_layers
from ...ops.masked_subnet import check_ratio
from ..registry import UnlearnInputs, register
from .ablation import ablate_neurons, mlp_activation_hook, output_weight_norms, top_neurons


@dataclass
class ActivationsConfig:
    ratio: float = 0.01      # fraction of each layer's neurons ablated
    batch_size: int = 64
    seed: int = 0            # unused (deterministic); kept for a uniform method interface
    progress: bool = False


def position_weights(ids: torch.Tensor, pad: torch.Tensor, start: torch.Tensor | None) -> torch.Tensor:
    """``[n, T]`` weights: ``1 / count`` on positions ``start - 1`` .. last non-pad token of each row, else 0.

    Rows without a counted position (all pad) get all-zero weights."""
    n, t = ids.shape
    start = torch.ones(n, dtype=torch.long) if start is None else torch.as_tensor(start).long().expand(n)
    pos = torch.arange(t)
    nonpad = ~pad.bool()
    last = torch.where(nonpad.any(1), (nonpad * pos).amax(1), torch.full((n,), -1))
    mask = (pos[None, :] >= (start - 1).clamp(min=0)[:, None]) & (pos[None, :] <= last[:, None])
    count = mask.sum(1, keepdim=True)
    return mask.float() / count.clamp(min=1)


@torch.no_grad()
def mean_activations(model, inputs: UnlearnInputs, batch_size: int = 64,
                     progress: bool = False) -> torch.Tensor:
    """``[n_layer, I]``: the mean MLP activation over forget rows (each row its own position mean)."""
    device = next(model.parameters()).device
    layers = mlp_layers(model)
    w_all = position_weights(inputs.forget_ids, inputs.forget_pad, inputs.forget_start)
    rows = w_all.sum(1) > 0
    if not bool(rows.any()):
        raise ValueError("no forget row has a non-pad position to average activations over")
    total = torch.zeros(len(layers), layers[0].intermediate_size, dtype=torch.float64)
    cur = {}

    def collect(li, act):
        # act: [b, t, I]; per-row weighted position mean, summed over the batch's rows
        total[li] += torch.einsum("bt,bti->i", cur["w"], act.float()).double().cpu()

    was_training = model.training
    model.eval()
    try:
        with mlp_activation_hook(model, collect):
            n = inputs.forget_ids.shape[0]
            for b in tqdm(range(0, n, batch_size), desc="activations", disable=not progress):
                sl = slice(b, b + batch_size)
                w = w_all[sl]
                width = int(torch.nonzero(w.sum(0)).max()) + 1 if bool((w > 0).any()) else 0
                if width == 0:
                    continue
                cur["w"] = w[:, :width].to(device)
                model(inputs.forget_ids[sl, :width].to(device))
    finally:
        model.train(was_training)
    return (total / int(rows.sum())).float()


def activation_attribution(model, inputs: UnlearnInputs, batch_size: int = 64,
                           progress: bool = False) -> torch.Tensor:
    mean = mean_activations(model, inputs, batch_size, progress)
    norms = torch.stack([output_weight_norms(layer).cpu() for layer in mlp_layers(model)])
    return mean.abs() * norms


@register("activations", ActivationsConfig, "neuron", aliases=("act",))
def run_activations(model, inputs: UnlearnInputs, cfg: ActivationsConfig) -> dict:
    check_ratio(cfg.ratio)
    t0 = time.perf_counter()
    attribution = activation_attribution(model, inputs, cfg.batch_size, cfg.progress)
    count = ablate_neurons(model, top_neurons(attribution, cfg.ratio))
    return {"time_edit_s": time.perf_counter() - t0, "ablated": count}
