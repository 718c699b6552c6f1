"""Row sampling shared by the methods that draw forget and retain rows on their own schedule."""

from __future__ import annotations

import torch


class Cycler:
    """Endless reshuffled passes over ``n`` row indices, drawn from ``gen``; a pass is reshuffled only when
    more rows are needed than it has left."""

    def __init__(self, n: int, gen: torch.Generator):
        self.n, self.gen = n, gen
        self.perm, self.pos = torch.randperm(n, generator=gen), 0

    def take(self, k: int) -> torch.Tensor:
        out = []
        while k > 0:
            if self.pos == self.n:
                self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
            part = self.perm[self.pos: self.pos + k]
            self.pos += part.numel()
            k -= part.numel()
            out.append(part)
        return torch.cat(out)
