"""Neuron ablation shared by the neuron-level methods.

A neuron-level method produces an attribution ``A`` of shape ``[n_layer, I]`` (``I`` = MLP intermediate
size). In every layer the ``floor(ratio * I)`` neurons with the largest ``A`` are ablated for good by
zeroing the neuron's *input* weights and input bias:

* GPT-2: ``c_fc.weight[:, i]`` (Conv1D ``[in, out]``) and ``c_fc.bias[i]``;
* GPTNeoX: ``dense_h_to_4h.weight[i, :]`` and ``.bias[i]``;
* Llama-style: row ``i`` of both ``gate_proj`` and ``up_proj`` (and their biases, if any).

Since act(0) = 0 for ReLU/GELU/SiLU and ``act(gate) * up`` is 0 once ``up`` is, the neuron then outputs
exactly 0 for every input. Modules are reached only through
:func:`~tinymem_fast.integrations.adapters.mlp_layers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ...integrations.adapters import MLPLayer, mlp_layers
from ...integrations.mixed_precision import check_precision
from ...ops.masked_subnet import layout_of, num_dropped
from ..steps import LossWatch, RowGroups, group_losses


def top_neurons(attribution: Tensor, ratio: float) -> dict[int, Tensor]:
    """Per layer, the indices of the ``floor(ratio * I)`` largest attributions (ties: lower index first)."""
    if attribution.dim() != 2:
        raise ValueError(f"attribution must be [n_layer, intermediate], got shape {tuple(attribution.shape)}")
    if bool(torch.isnan(attribution).any()):
        raise ValueError("attribution contains NaN")
    k = num_dropped(attribution.shape[1], ratio)
    # a stable descending sort keeps equal values in index order, so ties go to the lower index
    order = torch.sort(attribution.detach().float().cpu(), dim=1, descending=True, stable=True).indices
    return {layer: order[layer, :k].clone() for layer in range(attribution.shape[0])}


def output_weight_norms(layer: MLPLayer) -> Tensor:
    """``||w_out,i||_2`` per neuron ``i``: the norm of the vector neuron ``i`` writes into the residual."""
    w = layer.output.weight.detach().float()
    return w.norm(dim=1) if layout_of(layer.output) == "conv1d" else w.norm(dim=0)


@torch.no_grad()
def ablate_neurons(model, neurons: dict[int, Tensor]) -> int:
    """Zero the input weights and input bias of the given neurons (layer index -> neuron indices).

    Returns how many (layer, neuron) pairs were ablated (duplicates counted once)."""
    layers = mlp_layers(model)
    count = 0
    for li, idx in neurons.items():
        if not 0 <= li < len(layers):
            raise IndexError(f"layer {li} out of range: the model has {len(layers)} MLP layers")
        layer = layers[li]
        idx = torch.as_tensor(idx, dtype=torch.long).flatten().unique()
        if idx.numel() == 0:
            continue
        size = layer.intermediate_size
        if bool((idx < 0).any()) or bool((idx >= size).any()):
            raise IndexError(f"neuron index out of range [0, {size}) in layer {li}")
        rows = layer.input_rows(idx)  # both halves of a stacked gate/up matrix (Phi-3)
        for mod in layer.inputs.values():
            i = rows.to(mod.weight.device)
            if layout_of(mod) == "conv1d":
                mod.weight[:, i] = 0
            else:
                mod.weight[i, :] = 0
            if getattr(mod, "bias", None) is not None:
                mod.bias[i] = 0
        count += idx.numel()
    return count


@contextmanager
def mlp_activation_hook(model, fn: Callable[[int, Tensor], None]) -> Iterator[None]:
    """While active, every forward calls ``fn(layer_index, act)`` with each MLP's hidden activation
    ``[batch, seq, I]``: the input of its output module (``act(c_fc(x))``, ``act(gate(x)) * up(x))``).
    If ``fn`` returns a tensor, it replaces the activation (how Zero-Out removes neurons)."""
    handles = []

    def make(index):
        def pre_hook(_module, args):
            out = fn(index, args[0])
            if out is not None:
                return (out, *args[1:])
            return None
        return pre_hook

    try:
        for layer in mlp_layers(model):
            handles.append(layer.output.register_forward_pre_hook(make(layer.index)))
        yield
    finally:
        for h in handles:
            h.remove()


STOP_RULES = ("reference_epochs", "first_step_below")


def check_stop_rule(rule: str) -> None:
    if rule not in STOP_RULES:
        raise ValueError(f"stop_rule must be one of {', '.join(STOP_RULES)}, got {rule!r}")


class GateFit(NamedTuple):
    """What a gate fit did: optimizer steps taken, and the 1-based epochs whose batch loop the stop rule
    ended early (``first_step_below``: the last epoch run, if it stopped)."""

    steps: int
    epochs_cut: tuple[int, ...]


def fit_neuron_gates(model, forget_ids: Tensor, forget_pad: Tensor, param: Tensor,
                     gates: Callable[[], Tensor], penalty: Callable[[], Tensor], *, weight: float,
                     epochs: int, batch_size: int, lr: float, stop_loss: float, loss_on_pad: bool,
                     desc: str, stop_rule: str = "reference_epochs", check_every: int = 1,
                     progress: bool = False, precision: str = "fp32") -> GateFit:
    """Fit per-neuron gates on the frozen model (Slimming, Hard Concrete): each step multiplies every
    MLP activation by ``gates()`` (``[n_layer, I]``) and minimises ``L_F + weight * penalty()`` with Adam
    on ``param`` alone; gradients are zeroed every step. The model's requires_grad flags are restored.

    Each batch is cut to its longest content row and runs with the fused attention on a CPU
    (methods/steps.py); ``precision = "bf16"`` runs the model's GEMMs in bf16 under autocast (the gates
    are applied in the activations' dtype; ``param``, its gradient and Adam's state stay float32). A
    non-finite loss raises FloatingPointError (checked every step on a CPU, every 50 on a GPU, and at
    the end).

    ``stop_rule`` (SPEC 5.4):

    * ``reference_epochs`` (default), the schedule the reference code really runs: only in epochs ``e``
      (1-based) with ``e % check_every == 0`` is the penalty compared with ``stop_loss``, at each batch
      before its step; the first batch below it is not stepped and ends that epoch's batch loop only,
      the next epoch trains as usual. Slimming checks every 100th epoch, Hard Concrete every 10th.
    * ``first_step_below``: every step is taken, and training ends for good after the first step whose
      (pre-step) penalty is below ``stop_loss``; ``check_every`` is ignored.
    """
    if batch_size < 1 or epochs < 1 or check_every < 1:
        raise ValueError("batch_size, epochs and check_every must be >= 1")
    check_stop_rule(stop_rule)
    check_precision(precision)
    device = next(model.parameters()).device
    opt = torch.optim.Adam([param], lr=lr)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    cur: dict[str, Tensor] = {}

    def scale(index, act):
        return act * cur["z"][index].to(act.dtype)

    n = forget_ids.shape[0]
    rows = RowGroups([(forget_ids, forget_pad)], loss_on_pad, device)
    watch = LossWatch(device, what=f"{desc} loss")
    steps = 0
    cut: list[int] = []
    bar = tqdm(total=epochs * math.ceil(n / batch_size), desc=desc, disable=not progress)
    try:
        with mlp_activation_hook(model, scale):
            for epoch in range(1, epochs + 1):
                # a .item() sync per step only where the rule can act on it
                checked = stop_rule == "first_step_below" or epoch % check_every == 0
                for lo in range(0, n, batch_size):
                    pen = penalty()
                    below = checked and pen.item() < stop_loss
                    if below and stop_rule == "reference_epochs":
                        cut.append(epoch)
                        break
                    batch = rows.batch([torch.arange(lo, min(n, lo + batch_size))])
                    cur["z"] = gates()
                    loss = group_losses(model, batch, loss_on_pad, precision)[0] + weight * pen
                    watch.add(steps, loss)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    steps += 1
                    bar.update()
                    if below:
                        watch.check(steps - 1)
                        return GateFit(steps, (epoch,))
        watch.check(steps - 1)
    finally:
        bar.close()
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
    return GateFit(steps, tuple(cut))
