"""Greedy: zero, one at a time, the weight whose removal most lowers forget-ascent / retain-descent.

Each iteration takes a fresh batch of forget rows (label y = +1) and retain rows (y = -1), computes
``J = -sum_i y_i L_i`` (``L_i`` = per-sequence mean CE; minimising ``J`` raises the forget loss and lowers
the retain loss), backpropagates once, scores every entry of every parameter tensor (embeddings,
LayerNorms, attention included; a tied embedding/head counts once) by ``s = w * dJ/dw`` -- the first-order
decrease of ``J`` when ``w`` is set to 0 -- and zeroes the best entry (``weights_per_step`` > 1 zeroes
that many per iteration). It stops after ``floor(ratio * #params)`` picks; once no entry's removal
lowers ``J`` any more, the best pick may be a weight that is already 0 (``zeroed_nonzero`` counts the
picks that changed the model).

Speed: all parameters are re-pointed into one flat buffer, and their gradients into another, for the
duration of the method, so scoring and selection are one multiply and one argmax on the device per
iteration -- no host-side scan over tensors (the reference re-scanned every tensor on the host for each
zeroed weight). Parameters get their own storage back at the end.

Sampling: by default each batch holds ``batch_size // 2`` forget and ``batch_size - batch_size // 2``
retain rows, each side reshuffled and cycled on its own. ``sampling = "mixed"`` reproduces the reference:
one shuffled loader over forget + retain, where most TinyMem batches hold no forget row at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ...ops.masked_subnet import check_ratio, num_dropped
from ...tinymem.training import token_loss
from ..registry import UnlearnInputs, register
from ..sampling import Cycler


@dataclass
class GreedyConfig:
    ratio: float = 1e-4             # fraction of all parameters zeroed
    batch_size: int = 64
    weights_per_step: int = 1
    sampling: str = "balanced"      # or "mixed" (the reference's single shuffled loader)
    loss_on_pad: bool = False
    seed: int = 0
    progress: bool = False

    def __post_init__(self):
        if self.sampling not in ("balanced", "mixed"):
            raise ValueError(f"sampling must be 'balanced' or 'mixed', got {self.sampling!r}")
        if self.batch_size < 2 and self.sampling == "balanced":
            raise ValueError("balanced sampling needs batch_size >= 2 (one forget and one retain row)")
        if self.weights_per_step < 1:
            raise ValueError(f"weights_per_step must be >= 1, got {self.weights_per_step}")


class GreedyBatches:
    """Yields (ids, pad, y) batches: y = +1 for forget rows, -1 for retain rows."""

    def __init__(self, inputs: UnlearnInputs, cfg: GreedyConfig):
        self.inputs, self.cfg = inputs, cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        nf, nr = inputs.forget_ids.shape[0], inputs.retain_ids.shape[0]
        if cfg.sampling == "balanced" and nr == 0:
            raise ValueError("the retain set is empty; balanced sampling needs retain rows")
        self.ids = torch.cat([inputs.forget_ids, inputs.retain_ids])
        self.pad = torch.cat([inputs.forget_pad, inputs.retain_pad])
        self.y = torch.cat([torch.ones(nf), -torch.ones(nr)])
        self.nf = nf
        if cfg.sampling == "balanced":
            self.f, self.r = Cycler(nf, gen), Cycler(nr, gen)
        else:
            self.all = Cycler(nf + nr, gen)

    def next(self):
        b = self.cfg.batch_size
        if self.cfg.sampling == "balanced":
            idx = torch.cat([self.f.take(b // 2), self.nf + self.r.take(b - b // 2)])
        else:
            idx = self.all.take(b)
        return self.ids[idx], self.pad[idx], self.y[idx]


class FlatParameters:
    """Re-points every (distinct) parameter and its ``.grad`` into two flat buffers; ``restore()`` undoes it.

    Needs one dtype and device across parameters (true for HF models loaded normally)."""

    def __init__(self, model):
        self.params = list(dict.fromkeys(model.parameters()))  # tied weights once
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"greedy needs one parameter dtype and device, found {dtypes} on {devices}")
        self.sizes = [p.numel() for p in self.params]
        with torch.no_grad():
            self.flat = torch.cat([p.detach().reshape(-1) for p in self.params])
            self.grad = torch.zeros_like(self.flat)
        off = 0
        for p, n in zip(self.params, self.sizes, strict=True):
            p.data = self.flat[off: off + n].view_as(p)
            p.grad = self.grad[off: off + n].view_as(p)
            off += n

    def restore(self) -> None:
        for p in self.params:
            p.data = p.data.clone()
            p.grad = None


def greedy_unlearn(model, inputs: UnlearnInputs, cfg: GreedyConfig) -> dict:
    check_ratio(cfg.ratio)
    batches = GreedyBatches(inputs, cfg)
    device = next(model.parameters()).device
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    flat = FlatParameters(model)
    target = num_dropped(flat.flat.numel(), cfg.ratio)
    zeroed = iters = 0
    effective = torch.zeros((), dtype=torch.long, device=device)  # picks that were not already 0
    bar = tqdm(total=target, desc="greedy", disable=not cfg.progress)
    try:
        while zeroed < target:
            ids, pad, y = batches.next()
            seq, _ = token_loss(model, ids.to(device), pad.to(device), cfg.loss_on_pad)
            loss = -(y.to(device, seq.dtype) * seq).sum()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"greedy objective is {loss.item()} at iteration {iters}")
            flat.grad.zero_()
            loss.backward()  # accumulates in place into the flat gradient buffer
            with torch.no_grad():
                score = flat.flat.float() * flat.grad.float()
                m = min(cfg.weights_per_step, target - zeroed)
                best = score.argmax() if m == 1 else torch.topk(score, m, sorted=False).indices
                effective += (flat.flat[best] != 0).sum()
                flat.flat[best] = 0
            zeroed += m
            iters += 1
            bar.update(m)
    finally:
        bar.close()
        flat.restore()
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    return {"zeroed": zeroed, "zeroed_nonzero": int(effective), "iterations": iters,
            "n_params": flat.flat.numel()}


@register("greedy", GreedyConfig, "weight", aliases=("greedy",))
def run_greedy(model, inputs: UnlearnInputs, cfg: GreedyConfig) -> dict:
    t0 = time.perf_counter()
    info = greedy_unlearn(model, inputs, cfg)
    return {"time_edit_s": time.perf_counter() - t0, **info}
