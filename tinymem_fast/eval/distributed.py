"""Sharding per-example work across ``torchrun`` ranks and gathering the results on rank 0.

Each rank takes one contiguous block of the examples (:func:`shard_bounds`); per-example results are
tensors whose first dimension is the example, gathered in rank order (:func:`gather_columns`), so the
gathered result is the single-process result. Without ``torchrun`` (``WORLD_SIZE`` unset or 1) every
function here is a no-op on one process.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..integrations.loading import first_line


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _default_device(requested: str | None, local_rank: int) -> torch.device:
    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and dev.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_from_env(device: str | None = None) -> DistContext:
    """Join the process group ``torchrun`` describes in the environment (NCCL for CUDA devices, gloo for
    CPU) and pick this rank's device (``cuda:LOCAL_RANK`` by default when CUDA is available)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = _default_device(device, local)
    if world <= 1:
        return DistContext(0, 1, dev, False)
    here = False
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        here = True
    return DistContext(dist.get_rank(), dist.get_world_size(), dev, here)


def agree_on_work(ctx: DistContext, failure: BaseException | None, work: torch.Tensor | None,
                  error=ValueError) -> None:
    """Before any rank starts: every rank learns whether every other rank could prepare its input, and
    that all ranks read the same examples. Otherwise every rank leaves the process group and raises
    ``error`` with one line naming the ranks (rank 0 is the one that prints it), instead of the ranks
    that succeeded waiting in a collective for the one that did not."""
    mine = (None if failure is None else first_line(failure),
            None if work is None else (tuple(work.shape), hashlib.sha256(work.cpu().contiguous().numpy()
                                                                           .tobytes()).hexdigest()[:12]))
    everyone: list = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine)  # our own ranks' tuples of strings and ints
    failed = [f"rank {r}: {msg}" for r, (msg, _) in enumerate(everyone) if msg is not None]
    works = [w for _, w in everyone]
    if not failed and len(set(works)) > 1:
        failed = ["the ranks read different inputs (" + ", ".join(
            f"rank {r}: {w[0][0]} rows, sha256 {w[1]}" for r, w in enumerate(works)) + ")"]
    if failed:
        finish(ctx, barrier=False)
        raise error("; ".join(failed))


class RankVerdict:
    """``with RankVerdict(ctx) as v:`` around a rank's share of the work. A user error (bad input or
    settings) is raised at once on one process; under ``torchrun`` it is kept, and :meth:`agree` tells every
    rank whether any rank failed (all then raise ``error`` in one line). Anything else leaves the process
    group first, so that no rank waits forever in a collective for one that died."""

    def __init__(self, ctx: DistContext, user_errors=(ValueError, FileNotFoundError)):
        self.ctx, self.user_errors, self.failure = ctx, user_errors, None

    def __enter__(self) -> RankVerdict:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None:
            return False
        if isinstance(exc, self.user_errors):
            if self.ctx.active:
                self.failure = exc
                return True
            return False
        finish(self.ctx, barrier=False)
        return False

    def agree(self, work: torch.Tensor | None = None, error=ValueError) -> None:
        if self.ctx.active:
            agree_on_work(self.ctx, self.failure, None if self.failure else work, error)


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()


def finish(ctx: DistContext, barrier: bool = True) -> None:
    if ctx.initialized_here and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous block ``[lo, hi)`` of ``n`` examples for ``rank``; the first ``n % world_size`` ranks take
    one extra."""
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def sync_device(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def gather_columns(cols: dict[str, torch.Tensor], n: int, ctx: DistContext) -> dict[str, torch.Tensor]:
    """Concatenate each rank's per-example tensors (first dim = its shard) in rank order. Every rank gets
    the full result (an all-gather of shards padded to equal length: works on gloo and NCCL alike)."""
    if not ctx.active:
        return cols
    comm_dev = ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
    sizes = [shard_bounds(n, r, ctx.world_size) for r in range(ctx.world_size)]
    most = max(hi - lo for lo, hi in sizes)
    out = {}
    for name in sorted(cols):  # the same order on every rank
        t = cols[name].detach().cpu()
        is_bool = t.dtype == torch.bool
        if is_bool:
            t = t.to(torch.uint8)  # not every backend reduces/gathers bool
        pad = torch.zeros((most,) + tuple(t.shape[1:]), dtype=t.dtype)
        pad[: t.shape[0]] = t
        pad = pad.to(comm_dev)
        bufs = [torch.empty_like(pad) for _ in range(ctx.world_size)]
        dist.all_gather(bufs, pad)
        full = torch.cat([b[: hi - lo].cpu() for b, (lo, hi) in zip(bufs, sizes, strict=True)])
        out[name] = full.bool() if is_bool else full
    return out
