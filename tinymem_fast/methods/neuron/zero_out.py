"""Zero-Out: attribute each MLP neuron by how much removing it raises the forget loss, ablate the top.

A[l, i] = L_F(neuron i of layer l removed) - L_F(model), with L_F the mean over forget rows of the
per-row mean CE on the memorized suffix (window start .. last non-pad token). Removal sets that one
activation to zero and leaves every other neuron alone. (The reference's patch vector was zeros with a
single one, i.e. it KEPT only neuron i; ``compat_inverted_mask`` reproduces that for comparison only.)

Neurons are scored many at a time: the forget rows are replicated once per neuron of a chunk and each
replica has its own neuron removed, so a layer of I neurons costs I / chunk forward passes. The decoder
blocks below the scored layer see no removed neuron, so the replicas do not run them: those blocks'
outputs from the one clean pass are replayed (repeated per replica), which saves (l / L) of the block
work for layer l -- when the model's blocks are the entries of one ModuleList in layer order, else
every block runs. The passes
run with the fused attention on a CPU; ``precision = "bf16"`` runs their GEMMs in bf16 under autocast
(the baseline loss too, so each difference compares like with like; the losses are float32). The
attribution stays on the model's device until the end.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...integrations.adapters import mlp_layers
from ...integrations.mixed_precision import autocast, check_precision
from ..registry import UnlearnInputs, register
from .ablation import ablate_neurons, mlp_activation_hook, top_neurons
from .activations import position_weights


@dataclass
class ZeroOutConfig:
    ratio: float = 0.01
    rows_per_pass: int = 512          # forget rows x neurons scored in one forward pass
    compat_inverted_mask: bool = False
    seed: int = 0                     # unused: deterministic; uniform interface
    precision: str = "fp32"           # fp32 | bf16 (bf16 GEMMs; float32 losses)
    progress: bool = False

    def __post_init__(self):
        check_precision(self.precision)


def suffix_loss(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-row weighted mean CE of predicting ``ids[:, t]`` from position ``t - 1`` (weights on targets)."""
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                         reduction="none").view(ids.shape[0], -1)
    return (ce * weights[:, 1:]).sum(1)


def suffix_weights(ids: torch.Tensor, pad: torch.Tensor, start: torch.Tensor | None) -> torch.Tensor:
    """[n, T] weights 1/count on target positions start .. last non-pad token of each row (window start
    defaults to 1). Activations' weights cover start - 1 .., the positions that predict those targets."""
    n = ids.shape[0]
    start = torch.ones(n, dtype=torch.long) if start is None else torch.as_tensor(start).long().expand(n)
    return position_weights(ids, pad, start.clamp(min=1) + 1)


def decoder_blocks(model, layers) -> list[nn.Module] | None:
    """The decoder block holding each MLP when the blocks are one ModuleList's entries in layer order
    (then a block's output is the next block's input, and replaying it stands in for running it)."""
    parent = {id(child): mod for mod in model.modules() for child in mod.children()}
    blocks = [parent.get(id(layer.mlp)) for layer in layers]
    for stack in model.modules():
        if (isinstance(stack, nn.ModuleList) and len(stack) == len(blocks)
                and all(stack[layer.index] is b for layer, b in zip(layers, blocks, strict=True))):
            return blocks
    return None


def _repeat(out, copies: int):
    if torch.is_tensor(out):
        return out.repeat(copies, *([1] * (out.dim() - 1)))
    if isinstance(out, tuple | list):
        return type(out)(_repeat(o, copies) for o in out)
    if out is None:
        return None
    raise TypeError(f"cannot replay a decoder block output of type {type(out).__name__}")


@contextmanager
def _recording(blocks: list[nn.Module]):
    """Yields a list that holds each block's output of the forward run inside."""
    recorded: list = [None] * len(blocks)
    hooks = [b.register_forward_hook(lambda _m, _i, out, k=k: recorded.__setitem__(k, out))
             for k, b in enumerate(blocks)]
    try:
        yield recorded
    finally:
        for h in hooks:
            h.remove()


@contextmanager
def _replay(blocks: list[nn.Module], outputs: list, copies: int):
    """While active, each block returns its recorded output repeated ``copies`` times along the batch."""
    for block, out in zip(blocks, outputs, strict=True):
        block.forward = lambda *args, _out=out, **kwargs: _repeat(_out, copies)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # the class's forward again


@torch.no_grad()
def zero_out_attribution(model, inputs: UnlearnInputs, cfg: ZeroOutConfig) -> torch.Tensor:
    check_precision(cfg.precision)
    device = next(model.parameters()).device
    ids = inputs.forget_ids.to(device)
    w = suffix_weights(inputs.forget_ids, inputs.forget_pad, inputs.forget_start).to(device)
    n = ids.shape[0]

    def logits_of(x):
        with autocast(model, cfg.precision, device.type, fused_attention=True):
            return model(x, use_cache=False).logits

    layers = mlp_layers(model)
    blocks = decoder_blocks(model, layers)
    if blocks is not None and any("forward" in vars(b) for b in blocks):
        blocks = None  # an instance-level forward (someone's patch) is not ours to replace
    with _recording(blocks or []) as recorded:
        base = suffix_loss(logits_of(ids), ids, w).mean()
    try:
        _repeat(recorded, 1)
    except TypeError:  # an output we do not know how to replay: run every block
        blocks = None
    width = layers[0].intermediate_size
    attribution = torch.zeros(len(layers), width, device=device)
    chunk = max(1, cfg.rows_per_pass // n)
    state = {"layer": -1, "neurons": None}

    def patch(index, act):
        if index != state["layer"]:
            return None
        neurons = state["neurons"]                      # [c] one neuron per replica
        c = neurons.numel()
        a = act.view(c, n, *act.shape[1:])
        keep = torch.ones(c, a.shape[-1], device=a.device, dtype=a.dtype)
        keep[torch.arange(c, device=a.device), neurons] = 0  # a host index would sync
        if cfg.compat_inverted_mask:
            keep = 1 - keep
        return (a * keep[:, None, None, :]).view_as(act)

    with mlp_activation_hook(model, patch):
        for layer in layers:
            state["layer"] = layer.index
            for lo in range(0, width, chunk):
                neurons = torch.arange(lo, min(width, lo + chunk), device=device)
                state["neurons"] = neurons
                c = neurons.numel()
                below = [] if blocks is None else blocks[: layer.index]
                with _replay(below, recorded[: len(below)], c):
                    logits = logits_of(ids.repeat(c, 1))
                per = suffix_loss(logits, ids.repeat(c, 1), w.repeat(c, 1)).view(c, n).mean(1)
                attribution[layer.index, lo: lo + c] = per - base
    return attribution.cpu()


@register("zero_out", ZeroOutConfig, "neuron", aliases=("zero",))
def run_zero_out(model, inputs: UnlearnInputs, cfg: ZeroOutConfig) -> dict:
    t0 = time.perf_counter()
    was = model.training
    model.eval()
    attribution = zero_out_attribution(model, inputs, cfg)
    model.train(was)
    count = ablate_neurons(model, top_neurons(attribution, cfg.ratio))
    return {"time_edit_s": time.perf_counter() - t0, "ablated": count}
