"""Exact top-k over several tensors together, without concatenating them.

``top_k_masks(keys, k)`` returns the masks that ``top_k_mask(torch.cat([key.reshape(-1) ...]), k)`` split
back into the shapes of ``keys`` would give: the ``k`` largest entries over all the tensors, ties at the
k-th value taken in concatenation order (lowest tensor index first, then lowest flat index).

Method: radix select on the bit patterns. A non-negative IEEE float orders like its bits read as an
integer, so each key is read as float32 bits in an int32 (float64 bits in an int64 when any key is float64;
float16/bfloat16 widen to float32 exactly). The k-th largest pattern is found 16 bits at a time: each pass
counts one 16-bit digit (``index_add_`` of ones into 65536 bins) of the entries whose higher bits equal
the prefix found so far, tensor by tensor, summing the counts; the digit where the count from the top
reaches the remaining rank extends the prefix. Two passes for float32 bits, four for float64. The first
pass also checks for NaN and negative entries (one ``aminmax`` per tensor). A last pass builds the masks:
the entries above the k-th value, then the ties it needs, in order (when every tie is taken, simply the
entries ``>=`` it). Entries outside the prefix are not compacted away (that would need a host sync per
tensor): their digit goes to a second, ignored block of 65536 bins, so they stay spread over the bins
(no single hot counter for GPU atomics). -0.0 counts as +0.0, as torch's comparisons have it.

Memory: the bit patterns are re-read from the keys in each pass, one tensor at a time, so the temporaries
are O(largest single tensor), never O(sum of all). For the largest tensor, at most 9 bytes per entry with
int32 patterns (one int32 digit tensor, one int32 shifted copy, one bool) and 17 with int64 ones, plus,
when a key is not contiguous or not already float32 (float64 in the wide case), a converted copy (4 or 8
bytes per entry) while that tensor is processed; and 1 MiB of counts (2 x 65536 int64) per device. The
returned masks take 1 byte per entry (the result, as before). The concatenating version held a float32
copy of every key, its negation, and kthvalue's working copy and int64 indices: about 20 bytes per entry
of all tensors together.

Host syncs per call: the validity flags and one 64k-bin histogram per pass (2 or 4), plus the per-tensor
tie counts and one ``nonzero`` when the ties at the k-th value are split; none per tensor otherwise.
Under ``torch.use_deterministic_algorithms(True)`` the counts come from ``torch.bincount`` instead (CUDA's
``index_add_`` would take a sort-based ``index_put_`` with int64 temporaries there; integer counts are
exact either way); on CUDA bincount reads its input's maximum, one sync per tensor and pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_DIGIT = 16
_BINS = 1 << _DIGIT


def _bits(key: Tensor, wide: bool) -> Tensor:
    """``key``'s values as flat integer bit patterns: a view when ``key`` is contiguous and already of the
    working float dtype (float32, or float64 when ``wide``), else a converted copy.

    For a valid key (non-negative, no NaN) the patterns order like the values, except that -0.0 has the
    sign bit set (INT_MIN); every digit and comparison below masks the sign bit off or handles zero apart.
    """
    fdt, idt = (torch.float64, torch.int64) if wide else (torch.float32, torch.int32)
    return key.reshape(-1).to(fdt).view(idt)


def _bits_from(b: Tensor, shift: int, width: int, n: int) -> Tensor:
    """``n`` bits of ``b`` from bit ``shift`` up, the sign bit excluded, as a new tensor."""
    mask = (1 << min(n, width - 1 - shift)) - 1
    return (b >> shift).bitwise_and_(mask) if shift else b & mask


def _flags(key: Tensor) -> Tensor:
    """[has NaN, has an entry < 0] as a bool tensor on ``key``'s device (one fused reduction, no sync)."""
    lo, hi = torch.aminmax(key)
    return torch.stack([hi.isnan(), lo < 0])   # NaN propagates through max; -0.0 is not < 0


def _check(flags: Tensor) -> None:
    has_nan, has_negative = flags.tolist()
    if has_nan:
        raise ValueError("gradient contains NaN; the selection is undefined (did the loss diverge?)")
    if has_negative:
        raise ValueError("keys must be non-negative (absolute values)")


def _count_(hist: Tensor, d: Tensor) -> None:
    """``hist[v] += (number of entries of d equal to v)``."""
    if torch.are_deterministic_algorithms_enabled():
        hist += torch.bincount(d, minlength=hist.numel())
    else:
        hist.index_add_(0, d, torch.ones((), dtype=hist.dtype, device=d.device).expand(d.numel()))


def _equal(b: Tensor, value: int, width: int) -> Tensor:
    return b == value if value else (b & ((1 << (width - 1)) - 1)) == 0     # +0.0 and -0.0


def top_k_masks(keys: Sequence[Tensor], k: int) -> list[Tensor]:
    """Boolean masks (shapes of ``keys``) of the ``k`` largest entries over all ``keys`` together.

    Ties are taken in concatenation order: lowest tensor index first, then lowest flat index; the result
    equals ``top_k_mask`` on the concatenation, split back. Keys must be floating point, non-negative
    (absolute values), free of NaN (ValueError), and ``0 <= k <= total size`` (ValueError). Each mask is
    on its key's device; the keys may be of different float dtypes and sizes (empty and 0-d included).
    Temporary memory is O(largest key), see the module docstring.
    """
    keys = list(keys)
    for i, key in enumerate(keys):
        if not key.is_floating_point():
            raise ValueError(f"keys must be floating point, key {i} is {key.dtype}")
    total = sum(key.numel() for key in keys)
    if not 0 <= k <= total:
        raise ValueError(f"k must be in [0, {total}], got {k}")
    live = [i for i, key in enumerate(keys) if key.numel()]
    if not live:
        return [torch.zeros_like(key, dtype=torch.bool) for key in keys]
    dev = keys[live[0]].device
    flags = torch.zeros(2, dtype=torch.bool, device=dev)
    if k in (0, total):
        for i in live:
            flags |= _flags(keys[i]).to(dev)
        _check(flags)
        return [torch.full_like(key, k == total, dtype=torch.bool) for key in keys]

    wide = any(keys[i].dtype == torch.float64 for i in live)
    width = 64 if wide else 32
    need = k        # rank from the top, among the entries whose high digits equal `prefix`, of the k-th
    prefix = 0
    count = 0       # entries equal to the k-th value, once every digit is known
    for p in range(width // _DIGIT):
        shift = width - _DIGIT * (p + 1)
        # per device: index_add_ needs its counts beside the index
        hists: dict[torch.device, Tensor] = {}
        for i in live:
            if p == 0:
                flags |= _flags(keys[i]).to(dev)
            b = _bits(keys[i], wide)
            d = _bits_from(b, shift, width, _DIGIT)
            if p:   # entries outside the prefix go to the upper, ignored block, still spread over bins
                d.add_(_bits_from(b, shift + _DIGIT, width, width) != prefix, alpha=_BINS)
            del b
            h = hists.get(d.device)
            if h is None:
                h = hists[d.device] = torch.zeros(2 * _BINS, dtype=torch.int64, device=d.device)
            _count_(h, d)
            del d
        if p == 0:
            _check(flags)
        c = sum(h[:_BINS].cpu() for h in hists.values())
        from_top = c.flip(0).cumsum(0)
        j = int((from_top < need).sum())    # first bin, from the top, where the count reaches `need`
        digit = _BINS - 1 - j
        count = int(c[digit])
        need -= int(from_top[j]) - count
        assert 1 <= need <= count, (need, count)
        prefix = (prefix << _DIGIT) | digit

    value = prefix                          # the bit pattern of the k-th largest entry
    masks = [key.new_zeros(key.shape, dtype=torch.bool) if not key.numel() else None for key in keys]
    if need == count:   # every tie is taken (so value > 0: all the zeros taken would mean k == total)
        for i in live:
            masks[i] = (_bits(keys[i], wide) >= value).view(keys[i].shape)
        return masks
    ties = []
    for i in live:
        b = _bits(keys[i], wide)
        masks[i] = (b > value).view(keys[i].shape)      # -0.0 (INT_MIN) is below any value
        ties.append(_equal(b, value, width).sum().to(dev))
        del b
    for i, n in zip(live, torch.stack(ties).tolist(), strict=True):
        take = min(need, n)
        if not take:
            continue
        eq = _equal(_bits(keys[i], wide), value, width).view(keys[i].shape)
        if take == n:
            masks[i] |= eq
        else:
            masks[i].view(-1)[torch.nonzero(eq.view(-1)).reshape(-1)[:take]] = True
        need -= take
        if not need:
            break
    return masks
