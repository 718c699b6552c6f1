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
  back every ``every`` steps instead of every step (a host sync per step stalls a GPU queue).
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


class RowGroups:
    """Sets of rows (token ids + pad masks, same width) from which one batch takes rows of each.

    A row drawn several times in one step (a forget set smaller than its share of the batch) is computed
    once and weighted by its count: the same mean loss and gradient for less work."""

    def __init__(self, sets: list[tuple[Tensor, Tensor]], loss_on_pad: bool):
        widths = {ids.shape[1] for ids, _ in sets}
        if len(widths) != 1:
            raise ValueError(f"every row set must have the same width, got {sorted(widths)}")
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
        ids = torch.cat([i[p.to(i.device)][:, :width] for (i, _), p in zip(self.sets, rows, strict=True)])
        pad = torch.cat([q[p.to(q.device)][:, :width] for (_, q), p in zip(self.sets, rows, strict=True)])
        counts = [None if c is None else c.to(ids.device, torch.float32) for c in counts]
        return Batch(ids, pad, [p.numel() for p in rows], counts)


def group_losses(model, batch: Batch, loss_on_pad: bool, precision: str = "fp32") -> list[Tensor]:
    """One forward over the batch (the fused attention on a CPU, in either precision) -> each group's
    mean per-sequence CE over the rows drawn, repeats counted."""
    with autocast(model, precision, batch.ids.device.type, fused_attention=True):
        seq, _ = token_loss(model, batch.ids, batch.pad, loss_on_pad)
    out = []
    for part, c in zip(seq.float().split(batch.sizes), batch.counts, strict=True):
        out.append(part.mean() if c is None else (part * c).sum() / c.sum())
    return out


class LossWatch:
    """NaN/inf checks and logged values, read back from the device every ``every`` steps (every step on
    a CPU, where a read costs nothing). A non-finite loss raises FloatingPointError naming the steps."""

    def __init__(self, device: torch.device, every: int = 50, what: str = "loss"):
        self.every = 1 if device.type == "cpu" else max(1, every)
        self.what = what
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
            at = f"at step {step}" if step == self.checked else f"between steps {self.checked} and {step}"
            got = f" ({loss.item()})" if loss is not None and step == self.checked else ""
            raise FloatingPointError(f"{self.what} became non-finite{got} {at}; lower lr")
        self.checked = step + 1

    def floats(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.values.items()}
