"""Loss truncation (Kang & Hashimoto 2020; SPEC 5.2 (2)): drop the highest-loss sequences.

Every sequence's mean-token loss (pads counted only with ``loss_on_pad``) enters a ring buffer of the
last ``trunc_buffer`` values. Nothing is dropped until ``trunc_min_count`` values have been seen and the
buffer is full; from then on the threshold t is the ``(1 - trunc_drop_frac)`` quantile of the buffer
(linear interpolation, as ``numpy.percentile``), recomputed whenever ``trunc_buffer`` more sequences have
arrived. Sequences with loss >= t get weight 0 and the batch loss is the mean over all sequences, the
dropped ones counting as 0. The current batch enters the buffer before the threshold is (re)computed.

The buffer lives on the loss's device and the bookkeeping is plain integers, so a step adds no host sync.
"""

from __future__ import annotations

import torch

from .base import TrainHook


class LossTruncation(TrainHook):
    def __init__(self, drop_frac: float = 0.4, buffer: int = 10000, min_count: int = 10000):
        if not 0 <= drop_frac < 1:
            raise ValueError(f"trunc_drop_frac must be in [0, 1), got {drop_frac}")
        if buffer < 1 or min_count < 0:
            raise ValueError(f"trunc_buffer must be >= 1 and trunc_min_count >= 0, got {buffer}, {min_count}")
        self.keep = 1.0 - drop_frac
        self.size, self.min_count = buffer, min_count
        self.buf: torch.Tensor | None = None
        self.seen = 0               # sequences pushed so far
        self.since = 0              # sequences pushed since the threshold was last computed
        self.threshold: torch.Tensor | None = None
        self.dropped = 0            # lazily counted: a tensor sum, read only when reported

    def _push(self, x: torch.Tensor) -> None:
        if self.buf is None:
            self.buf = torch.zeros(self.size, dtype=torch.float32, device=x.device)
        elif self.buf.device != x.device:   # restored from a checkpoint (CPU tensors)
            self.buf = self.buf.to(x.device)
            if self.threshold is not None:
                self.threshold = self.threshold.to(x.device)
        n = x.numel()
        x = x.float().reshape(-1)[-self.size:]   # a batch larger than the buffer keeps its newest values
        pos = (self.seen + n - x.numel() + torch.arange(x.numel(), device=x.device)) % self.size
        self.buf[pos] = x

    def per_sequence_weights(self, step: int, seq_loss: torch.Tensor) -> torch.Tensor:
        n = seq_loss.numel()
        self._push(seq_loss.detach())
        self.seen += n
        self.since += n
        ready = self.seen >= max(self.min_count, self.size)
        if ready and (self.threshold is None or self.since >= self.size):
            self.threshold = torch.quantile(self.buf, self.keep)
            self.since = 0
        if self.threshold is None:
            return torch.ones_like(seq_loss)
        w = (seq_loss.detach() < self.threshold).to(seq_loss.dtype)
        self.dropped = self.dropped + (n - w.sum())
        return w

    def state_dict(self) -> dict:
        return {"buf": None if self.buf is None else self.buf.cpu(), "seen": self.seen, "since": self.since,
                "threshold": None if self.threshold is None else self.threshold.cpu(),
                "dropped": float(self.dropped)}

    def load_state_dict(self, state: dict) -> None:
        self.buf = state["buf"]
        if self.buf is not None and self.buf.numel() != self.size:
            raise ValueError(f"checkpointed loss-truncation buffer holds {self.buf.numel()} values, "
                             f"trunc_buffer is {self.size}")
        self.seen, self.since = int(state["seen"]), int(state["since"])
        self.threshold = state["threshold"]
        self.dropped = state.get("dropped", 0.0)
