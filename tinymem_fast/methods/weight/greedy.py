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

A step's rows run as one forward pass (methods/steps.py): cut to the batch's longest content row, a row
drawn twice (a forget set smaller than half a batch) computed once and weighted by its count, the fused
attention on a CPU. ``precision = "bf16"`` runs the GEMMs in bf16 under autocast; weights, their
gradients and the scores ``w * dJ/dw`` stay float32. A non-finite objective raises FloatingPointError
(checked every iteration on a CPU, every 50 on a GPU, and at the end).

Sampling: by default each batch holds ``batch_size // 2`` forget and ``batch_size - batch_size // 2``
retain rows, each side reshuffled and cycled on its own. ``sampling = "mixed"`` reproduces the reference:
one shuffled loader over forget + retain, where most TinyMem batches hold no forget row at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ...integrations.mixed_precision import check_precision
from ...ops.masked_subnet import check_ratio, num_dropped
from ..registry import UnlearnInputs, register
from ..sampling import Cycler
from ..steps import LossWatch, RowGroups, row_losses, to_device


@dataclass
class GreedyConfig:
    ratio: float = 1e-4             # fraction of all parameters zeroed
    batch_size: int = 64
    weights_per_step: int = 1
    sampling: str = "balanced"      # or "mixed" (the reference's single shuffled loader)
    loss_on_pad: bool = False
    seed: int = 0
    precision: str = "fp32"         # fp32 | bf16 (bf16 GEMMs; float32 weights, gradients and scores)
    progress: bool = False

    def __post_init__(self):
        check_precision(self.precision)
        if self.sampling not in ("balanced", "mixed"):
            raise ValueError(f"sampling must be 'balanced' or 'mixed', got {self.sampling!r}")
        if self.batch_size < 2 and self.sampling == "balanced":
            raise ValueError("balanced sampling needs batch_size >= 2 (one forget and one retain row)")
        if self.weights_per_step < 1:
            raise ValueError(f"weights_per_step must be >= 1, got {self.weights_per_step}")


class GreedyBatches:
    """Yields (ids, pad, y) batches: y = +1 for forget rows, -1 for retain rows. :meth:`step` draws the
    same rows as :meth:`next` as a :class:`~tinymem_fast.methods.steps.Batch` with a weight per row."""

    def __init__(self, inputs: UnlearnInputs, cfg: GreedyConfig, device: torch.device | None = None):
        """``device``: where :meth:`step` puts its batches (the model's); None: the inputs' own."""
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
            sets = [(inputs.forget_ids, inputs.forget_pad), (inputs.retain_ids, inputs.retain_pad)]
        else:
            self.all = Cycler(nf + nr, gen)
            sets = [(self.ids, self.pad)]
        self.rows = RowGroups(sets, cfg.loss_on_pad, device)

    def _picks(self) -> list[torch.Tensor]:
        b = self.cfg.batch_size
        if self.cfg.sampling == "balanced":
            return [self.f.take(b // 2), self.r.take(b - b // 2)]
        return [self.all.take(b)]

    def next(self):
        picks = self._picks()
        idx = torch.cat([picks[0], self.nf + picks[1]]) if len(picks) == 2 else picks[0]
        return self.ids[idx], self.pad[idx], self.y[idx]

    def step(self):
        """The next batch's rows in one :class:`~tinymem_fast.methods.steps.Batch` (a row drawn twice
        appears once) and each row's ``y`` times the times it was drawn, on the batch's device."""
        batch = self.rows.batch(self._picks())
        if len(batch.rows) == 2:
            y = [torch.full((r.numel(),), s) for r, s in zip(batch.rows, (1.0, -1.0), strict=True)]
        else:
            y = [self.y[batch.rows[0]]]
        dev = batch.ids.device
        return batch, torch.cat([to_device(yg, dev) * (1 if c is None else c)
                                 for yg, c in zip(y, batch.counts, strict=True)])


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
    check_precision(cfg.precision)
    device = next(model.parameters()).device
    batches = GreedyBatches(inputs, cfg, device)
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    flat = FlatParameters(model)
    target = num_dropped(flat.flat.numel(), cfg.ratio)
    zeroed = iters = 0
    effective = torch.zeros((), dtype=torch.long, device=device)  # picks that were not already 0
    watch = LossWatch(device, what="greedy objective", unit="iteration", hint="")
    bar = tqdm(total=target, desc="greedy", disable=not cfg.progress)
    try:
        while zeroed < target:
            batch, w = batches.step()
            loss = -(w * row_losses(model, batch, cfg.loss_on_pad, cfg.precision)).sum()
            watch.add(iters, loss)
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
        watch.check(iters - 1)
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
