"""One-token branches off a shared prefix, in one forward pass of a Hugging Face causal LM.

Many attribution passes (Integrated Gradients' scaled activations, for one) perturb a single position
``t`` of a sequence and read the output at ``t`` only. Causality makes everything before ``t`` identical
across the perturbed copies, so recomputing the prefix for each copy is waste. Here the input is laid out
as ``[prefix (P tokens) | branches (C tokens)]``: branch ``c`` is the token of position ``pos[c]`` (passed
as its ``position_ids``, so learned and rotary position embeddings see the right place) and its attention
sees the prefix keys ``0 .. pos[c] - 1`` and its own key, never another branch. The prefix attends
causally within itself and never to a branch. Each branch's output therefore equals the output at
``pos[c]`` of a separate forward of ``prefix[:pos[c]] + token`` (same arithmetic, float32, within
rounding), for the price of one token per branch.

The attention is registered with transformers' ``AttentionInterface`` as :data:`BRANCH_ATTENTION` and
swapped in for one model instance only inside :func:`shared_prefix_branches`. A model whose attention
does not go through that interface is refused with a clear error (the first forward is checked), never
run with a silently different mask.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .adapters import UnsupportedArchitecture

BRANCH_ATTENTION = "tinymem_branch"
_registered = False
_active: list = []  # the layout of the forward in progress (a stack: nested use is refused)


@dataclass
class BranchLayout:
    """Set before each forward: ``prefix`` tokens, then one branch per entry of ``positions``."""

    prefix: int = 0
    positions: torch.Tensor | None = None   # [C] long, each in [0, prefix]
    calls: int = 0                           # attention calls seen (a model that bypasses us sees 0)
    _blocked: dict = field(default_factory=dict)

    def set(self, prefix: int, positions: torch.Tensor) -> None:
        positions = positions.long()
        if positions.dim() != 1 or positions.numel() == 0:
            raise ValueError("branch positions must be a non-empty 1-D tensor")
        if int(positions.min()) < 0 or int(positions.max()) > prefix:
            raise ValueError(f"branch positions must lie in [0, {prefix}] (the prefix has {prefix} tokens)")
        self.prefix, self.positions, self._blocked = prefix, positions, {}

    def blocked(self, device: torch.device) -> torch.Tensor:
        """``[C, P]`` True where branch ``c`` must not see prefix key ``j`` (``j >= pos[c]``)."""
        if device not in self._blocked:
            pos = self.positions.to(device)
            self._blocked[device] = torch.arange(self.prefix, device=device)[None, :] >= pos[:, None]
        return self._blocked[device]


def branch_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Transformers attention function for the ``[prefix | branches]`` layout (``[B, H, S, D]`` in,
    ``([B, S, H, D], None)`` out); the model's own mask is not used (the layout defines it)."""
    if not _active:
        raise RuntimeError(f"attention {BRANCH_ATTENTION!r} runs only inside shared_prefix_branches()")
    lay: BranchLayout = _active[-1]
    window = kwargs.get("sliding_window")
    unsupported = [name for name, bad in (
        ("dropout", bool(dropout)), ("logit soft-capping", kwargs.get("softcap") is not None),
        ("attention sinks", kwargs.get("s_aux") is not None),
        ("a sliding window shorter than the prefix", window is not None and window < lay.prefix + 1),
        ("a KV cache", query.shape[2] != key.shape[2])) if bad]
    if unsupported:
        raise UnsupportedArchitecture(f"shared-prefix branches: {type(module).__name__} uses "
                                      f"{', '.join(unsupported)}, which this attention does not model")
    p, c = lay.prefix, query.shape[2] - lay.prefix
    if c != lay.positions.numel():
        raise ValueError(f"the input has {c} branch tokens after the {p}-token prefix, the layout "
                         f"{lay.positions.numel()}")
    lay.calls += 1
    with torch.autocast(query.device.type, enabled=False):
        q, k, v = query.float(), key.float(), value.float()
        groups = q.shape[1] // k.shape[1]
        if groups > 1:  # grouped-query attention
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scale = q.shape[-1] ** -0.5 if scaling is None else scaling
        kp, vp = k[:, :, :p], v[:, :, :p]
        out_prefix = torch.nn.functional.scaled_dot_product_attention(q[:, :, :p], kp, vp, is_causal=True,
                                                                      scale=scale)
        qb, kb, vb = q[:, :, p:], k[:, :, p:], v[:, :, p:]
        to_prefix = (qb @ kp.transpose(-1, -2) * scale).masked_fill(lay.blocked(q.device), float("-inf"))
        to_self = (qb * kb).sum(-1, keepdim=True) * scale
        probs = torch.softmax(torch.cat([to_prefix, to_self], -1), -1)
        out_branch = probs[..., :p] @ vp + probs[..., p:] * vb
        out = torch.cat([out_prefix, out_branch], 2)
    return out.transpose(1, 2).to(query.dtype), None


def _no_mask(*args, **kwargs):
    return None  # the layout is the mask; building one of S x S would only cost memory


def register_branch_attention() -> None:
    global _registered
    if _registered:
        return
    from .transformers import register_attention_function

    try:  # before transformers 4.53 models build their own 4-D masks, which we ignore
        register_attention_function(BRANCH_ATTENTION, branch_attention, _no_mask)
    except ImportError as exc:
        raise UnsupportedArchitecture("shared-prefix branches need transformers >= 4.48 "
                                      "(AttentionInterface)") from exc
    _registered = True


@contextmanager
def shared_prefix_branches(model):
    """While active, ``model``'s attention is :func:`branch_attention`; yields the :class:`BranchLayout`
    to :meth:`~BranchLayout.set` before each forward. Pass ``position_ids`` = ``[0 .. P-1, *positions]``
    and no ``attention_mask``."""
    if _active:
        raise RuntimeError("shared_prefix_branches() does not nest")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise UnsupportedArchitecture(f"{type(model).__name__} has no attention implementation setting")
    register_branch_attention()
    was = config._attn_implementation
    layout = BranchLayout()
    config._attn_implementation = BRANCH_ATTENTION
    _active.append(layout)
    try:
        yield layout
    finally:
        _active.pop()
        config._attn_implementation = was


def check_branches_ran(model, layout: BranchLayout) -> None:
    """After the first forward: refuse a model whose attention never called us (wrong results else)."""
    if layout.calls == 0:
        raise UnsupportedArchitecture(f"{type(model).__name__}'s attention does not go through transformers' "
                                      "AttentionInterface, so shared-prefix branches cannot run on it")


__all__ = ["BRANCH_ATTENTION", "BranchLayout", "branch_attention", "shared_prefix_branches",
           "check_branches_ran"]
