"""What the gradient-based methods' steps share, so that a method step costs what a training step costs.

* :class:`RowGroups` draws rows of several sets (forget, retain) into **one** batch: one forward pass,
  the per-row losses split afterwards. Rows are independent in a causal LM (no op mixes rows), so the
  losses equal those of separate passes up to GEMM blocking; one pass of 2B rows is cheaper than two of B
  (every non-GEMM op and every kernel launch runs once). A row drawn twice in a step (a forget set
  smaller than its share of the batch) is computed once and counted twice. The batch is cut to its
  longest content row (right padding + causal attention: later positions never reach a counted target),
  with lengths read once up front so that no step waits on the device for them.
* :func:`group_losses` runs the pass under the method's ``precision`` (``bf16``: bf16 GEMMs under
  autocast, float32 weights/scores/optimizer; see :mod:`tinymem_fast.integrations.mixed_precision`),
  with the fused causal attention on a CPU in either precision.
* :class:`LossWatch` checks the loss for NaN/inf and keeps the logged values on the device, reading them
  back every ``every`` steps instead of every step (a host sync per step stalls a GPU queue); host index
  tensors go to the device with non-blocking copies (:func:`to_device`) for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..integrations.mixed_precision import autocast
from ..tinymem.training import token_loss


@dataclass
class Batch:
    """Rows of several groups in one batch: ``sizes[g]`` rows of group g, in order; ``counts[g]`` how many
    times each of them was drawn (None: once each)."""

    ids: Tensor
    pad: Tensor
    sizes: list[int]
    counts: list[Tensor | None]
    rows: list[Tensor] | None = None  # host indices into each set of the rows in the batch, in order


class RowGroups:
    """Sets of rows (token ids + pad masks, same width) from which one batch takes rows of each.

    A row drawn several times in one step (a forget set smaller than its share of the batch) is computed
    once and weighted by its count: the same mean loss and gradient for less work."""

    def __init__(self, sets: list[tuple[Tensor, Tensor]], loss_on_pad: bool,
                 device: torch.device | None = None):
        """``device``: where the batches go (the model's); the sets are copied there once if they are
        elsewhere (the experiments pass host tensors). None: each set's own device."""
        widths = {ids.shape[1] for ids, _ in sets}
        if len(widths) != 1:
            raise ValueError(f"every row set must have the same width, got {sorted(widths)}")
        if device is not None:
            sets = [(ids.to(device), pad.to(device)) for ids, pad in sets]
        self.sets, self.loss_on_pad = sets, loss_on_pad
        self.full = widths.pop()
        # content lengths on the host, once: the batch width of a step then needs no device read
        self.lengths = [(~pad).sum(1).cpu() for _, pad in sets]

    def batch(self, picks: list[Tensor]) -> Batch:
        """Rows ``picks[g]`` (host int64 indices, repeats allowed) of each set ``g``, in one batch cut to
        its longest content row (unless loss_on_pad)."""
        rows, counts = [], []
        for p in picks:
            u, c = torch.unique(p, return_counts=True)
            dup = u.numel() < p.numel()
            rows.append(u if dup else p)
            counts.append(c if dup else None)
        width = self.full
        if not self.loss_on_pad:
            width = max(int(lens[p].max()) for lens, p in zip(self.lengths, rows, strict=True) if p.numel())
        # host -> device copies that do not wait for the queued steps (a blocking one syncs the stream)
        picked = [(i[to_device(p, i.device)], q[to_device(p, q.device)])
                  for (i, q), p in zip(self.sets, rows, strict=True)]
        ids = torch.cat([i[:, :width] for i, _ in picked])
        pad = torch.cat([q[:, :width] for _, q in picked])
        counts = [None if c is None else to_device(c.float(), ids.device) for c in counts]
        return Batch(ids, pad, [p.numel() for p in rows], counts, rows)


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device`` without a stream sync: a non-blocking copy from pageable memory is
    staged before the call returns, so ``x`` may be freed or changed afterwards."""
    return x.to(device, non_blocking=True)


def row_losses(model, batch: Batch, loss_on_pad: bool, precision: str = "fp32") -> Tensor:
    """One forward over the batch (the fused attention on a CPU, in either precision) -> the float32
    per-sequence mean CE of each row in it (a row drawn several times appears once)."""
    with autocast(model, precision, batch.ids.device.type, fused_attention=True):
        seq, _ = token_loss(model, batch.ids, batch.pad, loss_on_pad)
    return seq.float()


def group_losses(model, batch: Batch, loss_on_pad: bool, precision: str = "fp32") -> list[Tensor]:
    """:func:`row_losses` -> each group's mean per-sequence CE over the rows drawn, repeats counted."""
    out = []
    for part, c in zip(row_losses(model, batch, loss_on_pad, precision).split(batch.sizes), batch.counts,
                       strict=True):
        out.append(part.mean() if c is None else (part * c).sum() / c.sum())
    return out


class LossWatch:
    """NaN/inf checks and logged values, read back from the device every ``every`` steps (every step on
    a CPU, where a read costs nothing). A non-finite loss raises FloatingPointError naming the steps."""

    def __init__(self, device: torch.device, every: int = 50, what: str = "loss", unit: str = "step",
                 hint: str = "lower lr"):
        self.every = 1 if device.type == "cpu" else max(1, every)
        self.what, self.unit, self.hint = what, unit, hint
        self.ok: Tensor | None = None
        self.values: dict[str, Tensor] = {}
        self.checked = 0  # steps before this one are known finite

    def add(self, step: int, loss: Tensor, **values: Tensor) -> None:
        finite = torch.isfinite(loss.detach())
        self.ok = finite if self.ok is None else self.ok & finite
        self.values = {k: v.detach() for k, v in values.items()}
        if (step + 1) % self.every == 0:
            self.check(step, loss)

    def check(self, step: int, loss: Tensor | None = None) -> None:
        if self.ok is not None and not bool(self.ok):
            u = self.unit
            at = f"at {u} {step}" if step == self.checked else f"between {u}s {self.checked} and {step}"
            got = f" ({loss.item()})" if loss is not None and step == self.checked else ""
            hint = f"; {self.hint}" if self.hint else ""
            raise FloatingPointError(f"{self.what} became non-finite{got} {at}{hint}")
        self.checked = step + 1

    def floats(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.values.items()}
