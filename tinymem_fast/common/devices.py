"""Device names and synchronisation for timings and result rows."""

from __future__ import annotations

import platform

import torch


def _device_of(where) -> torch.device:
    if isinstance(where, torch.device | str):
        return torch.device(where)
    return next(where.parameters()).device


def device_name(where) -> str:
    """A model's (or a device's) hardware, as result rows record it."""
    dev = _device_of(where)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(where) -> None:
    """Wait for queued GPU work, so that a clock read afterwards measures it."""
    dev = _device_of(where)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
