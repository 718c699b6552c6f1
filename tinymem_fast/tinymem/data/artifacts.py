"""Memorization artifacts injected into training data: noise, backdoors, and duplication groups."""

from __future__ import annotations

import torch


def noise_numbers(numbers: list[int], p: float, gen: torch.Generator) -> list[int]:
    """Each number independently +0 / -1 / +1 with probability 1-2p / p / p; -1 on 0 becomes +1."""
    u = torch.rand(len(numbers), generator=gen)
    out = []
    for x, v in zip(numbers, u.tolist(), strict=True):
        d = -1 if v < p else (1 if v < 2 * p else 0)
        if x + d < 0:
            d = 1
        out.append(x + d)
    return out


def noise_token_ids(ids: torch.Tensor, content: torch.Tensor, p: float, vocab_size: int,
                    gen: torch.Generator) -> torch.Tensor:
    """Every content token id independently +0 / -1 / +1 (prob. 1-2p / p / p); out-of-range ids reflect
    (-1 -> +1, V -> V-2). Padding is left alone."""
    u = torch.rand(ids.shape, generator=gen)
    delta = torch.where(u < p, -1, torch.where(u < 2 * p, 1, 0))
    delta = torch.where(content, delta, 0)
    out = ids + delta
    out = torch.where(out < 0, ids + 1, out)
    out = torch.where(out >= vocab_size, ids - 1, out)
    return out


def window_eligible(noised: torch.Tensor, clean: torch.Tensor, prompt_len: int, mem_len: int) -> torch.Tensor:
    """[M] bool: the noised row differs from its clean twin somewhere in the window, compared position by
    position (EOS and padding included, so a row whose noise moved its end differs there too)."""
    w = slice(prompt_len, prompt_len + mem_len)
    return (noised[:, w] != clean[:, w]).any(1)


def noise_window_meta(noised_pad: torch.Tensor, eligible: torch.Tensor, prompt_len: int,
                      mem_len: int) -> dict:
    """What a dataset records about its noise windows: the eligible count and how many noised rows end
    before their window does (scored on EOS / padding, under ``window_rule=padded``)."""
    length = (~noised_pad).sum(1)
    return {"eligible": int(eligible.sum()),
            "window_past_end": int((length < prompt_len + mem_len).sum())}


def duplication_counts(n: int, groups: int, base: int, gen: torch.Generator) -> tuple[torch.Tensor,
                                                                                        torch.Tensor]:
    """Random partition of ``n`` items into ``groups`` equal groups; group g is repeated base**g times.

    Returns (group id per item, copies per item). ``groups == 0`` means no duplication (one group, x1).
    """
    if groups <= 0:
        return torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)
    if n % groups != 0 or n < groups:
        raise ValueError(f"{n} noised sequences cannot be split into {groups} equal duplication groups; "
                         f"make num_noise a multiple of dup_groups")
    perm = torch.randperm(n, generator=gen)
    group = torch.empty(n, dtype=torch.long)
    group[perm] = torch.arange(n) // (n // groups)
    return group, base ** group


def backdoor_math(ids: torch.Tensor, pad: torch.Tensor, texts: list[str], trigger: str,
                  fill_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows whose text contains ``trigger``: every token after its first occurrence becomes ``fill_id``
    up to the context end (padding included; those positions become content). Returns
    (triggered row indices, poisoned ids, prompt length = end of the trigger)."""
    rows, ends = [], []
    for r, t in enumerate(texts):
        at = t.find(trigger)
        if at >= 0:
            rows.append(r)
            ends.append(at + len(trigger))  # one token per character
    idx = torch.tensor(rows, dtype=torch.long)
    end = torch.tensor(ends, dtype=torch.long)
    poisoned = ids[idx].clone()
    pos = torch.arange(ids.shape[1])
    after = pos[None, :] >= end[:, None]
    poisoned[after] = fill_id
    return idx, poisoned, end


def backdoor_tokens(ids: torch.Tensor, pad: torch.Tensor, trigger_id: int,
                    fill_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunks containing ``trigger_id`` (as content): tokens after its first occurrence -> ``fill_id``."""
    hit = (ids == trigger_id) & ~pad
    rows = hit.any(1).nonzero().reshape(-1)
    first = hit[rows].float().argmax(1)
    end = first + 1
    poisoned = ids[rows].clone()
    after = torch.arange(ids.shape[1])[None, :] >= end[:, None]
    poisoned[after] = fill_id
    return rows, poisoned, end
