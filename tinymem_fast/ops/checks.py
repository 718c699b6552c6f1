"""The data checks the LM-head ops share (memscore, lm_head_argmax, fused_linear_cross_entropy): hidden
states and head weight finite, target ids inside the vocabulary.

One host synchronisation per call for all of them, and none while ``torch.compile`` traces. Finiteness is
tested on a sum (NaN or inf iff some entry is, up to an overflow of the sum itself, which the exact
re-check on the error path tells apart), so no input-sized temporary is made. A weight once found finite
is read again only after it changed -- its version counter moved, as every optimizer step and in-place
write moves it -- so a decoding loop calling the head once per token does not re-read V x d floats each
time. (Writes through ``.data`` bypass the counter and are not seen.) A bias is never checked: ``-inf``
there is how ids are suppressed.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

# weights found finite, by id: (weak reference, version counter, data pointer) at the check
_FINITE_WEIGHTS: dict[int, tuple] = {}


def tensor_version(t: Tensor) -> int | None:
    """The tensor's version counter (None for an inference tensor, which has none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _known_finite(weight: Tensor) -> bool:
    seen = _FINITE_WEIGHTS.get(id(weight))
    return (seen is not None and seen[0]() is weight and seen[1] == tensor_version(weight)
            and seen[2] == weight.data_ptr())


def _remember_finite(weight: Tensor) -> None:
    version = tensor_version(weight)
    if version is None:
        return
    key = id(weight)
    _FINITE_WEIGHTS[key] = (weakref.ref(weight, lambda _: _FINITE_WEIGHTS.pop(key, None)), version,
                            weight.data_ptr())


def check_bias(bias: Tensor | None, weight: Tensor, hidden: Tensor) -> None:
    """An LM head's bias (None allowed): ``[V]``, in hidden's dtype, on its device."""
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    if bias.dtype != hidden.dtype:
        raise TypeError(f"bias is {bias.dtype} but hidden is {hidden.dtype}; cast them to one dtype")
    if bias.device != hidden.device:
        raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")


def _first(bad: Tensor) -> list[int]:
    return [int(i) for i in bad.nonzero()[0]]


def _raise_if_not_finite(name: str, t: Tensor, hint: str) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):  # the error path: the sum may have overflowed on finite entries
        pos = _first(bad)
        raise ValueError(f"{name} contains NaN or inf ({float(t[tuple(pos)])} at position {pos}); {hint}")


def check_values(hidden: Tensor, weight: Tensor, targets: Tensor | None = None, *, vocab: int | None = None,
                 mask: Tensor | None = None, ignore_index: int | None = None) -> None:
    """Raise ValueError unless ``hidden`` and ``weight`` are finite and every ``targets`` id is in
    ``[0, vocab)`` where ``mask`` is True (None: everywhere) and the id is not ``ignore_index``."""
    if torch.compiler.is_compiling():
        return
    flags = []
    if hidden.numel():
        flags.append(~hidden.sum().isfinite())  # half precision accumulates in float32 already
    check_weight = weight.numel() > 0 and not _known_finite(weight)
    if check_weight:
        flags.append(~weight.sum().isfinite())
    bad_t = None
    if targets is not None:
        bad_t = (targets < 0) | (targets >= vocab)
        if ignore_index is not None:
            bad_t &= targets != ignore_index
        if mask is not None:
            bad_t &= mask
        flags.append(bad_t.any())
    if not flags:
        return
    got = torch.stack(flags).tolist()
    if bad_t is not None and got.pop():
        pos = _first(bad_t)
        also = f" and not ignore_index={ignore_index}" if ignore_index is not None else ""
        raise ValueError(f"targets contain id {int(targets[tuple(pos)])} at position {pos}, outside the "
                         f"vocabulary [0, {vocab}){also}; mask out padding or fix the tokenizer/lm_head "
                         "pairing")
    if hidden.numel() and got.pop(0):
        _raise_if_not_finite("hidden", hidden, "the model's hidden states are not finite (diverged "
                                               "weights, or a float16 overflow?)")
    if check_weight:
        if got.pop(0):
            _raise_if_not_finite("weight", weight, "the LM head is not finite; suppress ids with a -inf "
                                                   "bias, not in the weight")
        _remember_finite(weight)
