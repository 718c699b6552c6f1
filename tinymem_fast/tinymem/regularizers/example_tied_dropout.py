"""Example-tied dropout (Maini et al. 2023; SPEC 5.2 (3)).

Applied to the residual stream at the start of every transformer block (before its first norm), through
forward pre-hooks on the block modules: no model class is forked or patched.

* Training: the first ``floor(p_fixed * D)`` hidden channels ("generalization" channels) are always on;
  each other channel is on with probability ``p_mem`` under a Bernoulli mask fixed per example id and
  block. The mask covers channels, identical at every position of the sequence.
* Evaluation (``model.eval()``): the other channels are zeroed and the fixed ones scaled by
  ``(p_fixed + p_mem) / p_fixed``.

Masks are a pure function of (seed, block, example id, channel) -- an integer hash evaluated on the
device each step -- so there is no cache to fill, nothing to save in a checkpoint, and an example gets the
same mask in every epoch. Example ids are training-row indices (duplicate copies share their sequence's
id) or, with ``per_row_ids``, copy numbers.

The hooks are not part of the saved model: a model trained with this regularizer is evaluated as intended
only with them attached (``ExampleTiedDropout(model, p_fixed, p_mem)`` then ``model.eval()``); the
training loop's own evaluations and final metrics have them.
"""

from __future__ import annotations

import math

import torch

from ...integrations.adapters import FAMILIES, _get, family_of
from .base import TrainHook

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (xor-shift-multiply) on int64 tensors holding values below 2^32; the
    products stay below 2^59, so nothing overflows."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def hidden_size(model) -> int:
    c = model.config
    for name in ("n_embd", "hidden_size", "d_model"):
        if isinstance(getattr(c, name, None), int):
            return getattr(c, name)
    raise TypeError(f"example_tied_dropout: cannot read the hidden size of {type(model).__name__}")


def blocks_of(model):
    fam = family_of(model)
    return list(_get(model, FAMILIES[fam].layers))


class ExampleTiedDropout(TrainHook):
    def __init__(self, model, p_fixed: float = 0.2, p_mem: float = 0.1, seed: int = 0,
                 per_row_ids: bool = False):
        d = hidden_size(model)
        n_fixed = math.floor(p_fixed * d)
        if not (0 < p_fixed <= 1 and 0 <= p_mem <= 1):
            raise ValueError(f"example_tied_dropout needs 0 < etd_p_fixed <= 1 and 0 <= etd_p_mem <= 1, got "
                             f"{p_fixed}, {p_mem}")
        if n_fixed < 1:
            raise ValueError(f"etd_p_fixed {p_fixed} leaves no always-on channel of {d}; raise it")
        self.d, self.n_fixed, self.p_mem, self.seed = d, n_fixed, p_mem, seed
        self.per_row_ids = per_row_ids
        self.eval_scale = (p_fixed + p_mem) / p_fixed
        self.ids: torch.Tensor | None = None
        self.handles = [b.register_forward_pre_hook(self._make_hook(i), with_kwargs=True)
                        for i, b in enumerate(blocks_of(model))]
        self.n_blocks = len(self.handles)

    # --- masks -----------------------------------------------------------------------------------
    def masks(self, ids: torch.Tensor, block: int) -> torch.Tensor:
        """[len(ids), D] training mask of ``block`` (1 = on) for the given example ids."""
        ids = ids.long().reshape(-1) & _M32
        key = _mix32(torch.tensor((self.seed * 1_000_003 + block * 7_919) & _M32, device=ids.device))
        h = _mix32(_mix32(key ^ ids))                                     # per example
        ch = torch.arange(self.d, device=ids.device, dtype=torch.long)
        r = _mix32(h[:, None] ^ (_mix32(ch + 0x9E3779B9 & _M32)[None, :]))  # per (example, channel)
        on = r.double() < self.p_mem * 2.0**32
        on[:, : self.n_fixed] = True
        return on

    def eval_vector(self, device, dtype) -> torch.Tensor:
        v = torch.zeros(self.d, device=device, dtype=dtype)
        v[: self.n_fixed] = self.eval_scale
        return v

    def set_ids(self, ids: torch.Tensor | None) -> None:
        self.ids = ids

    def begin_step(self, step, row_ids, copy_ids) -> None:
        ids = copy_ids if self.per_row_ids else row_ids
        if ids is None:
            raise ValueError("example_tied_dropout needs the example ids of every training batch")
        self.set_ids(ids)

    # --- hook ------------------------------------------------------------------------------------
    def _make_hook(self, block: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if x.shape[-1] != self.d:
                raise ValueError(f"example_tied_dropout: block input has {x.shape[-1]} channels, "
                                 f"expected {self.d}")
            if module.training:
                if self.ids is None:
                    raise RuntimeError("example_tied_dropout: the model runs in training mode without "
                                       "example ids; call set_ids(ids) (or begin_step) before the forward")
                if self.ids.numel() != x.shape[0]:
                    raise ValueError(f"example_tied_dropout: {self.ids.numel()} example ids for a batch of "
                                     f"{x.shape[0]}")
                x = x * self.masks(self.ids.to(x.device), block).to(x.dtype)[:, None, :]
            else:
                x = x * self.eval_vector(x.device, x.dtype)
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
