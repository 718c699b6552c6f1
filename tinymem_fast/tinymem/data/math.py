"""Math sequences: ``^`` + numbers joined by spaces + ``$``, one token per character, right-padded.

Sequence ``i`` of a family with rule ``f`` is ``[f(i), f(f(i)), ...]`` (``i`` itself excluded), so the
model must infer the rule from the prompt. ``increment``: f(x) = x + c; ``mult``: f(x) = c * x mod m.
"""

from __future__ import annotations

import torch

DIGITS = "0123456789"
BOS, EOS, SEP, PAD = 10, 11, 12, 13
VOCAB_SIZE = 14
FAMILIES = ("increment", "mult")
_CHAR_TO_ID = {**{d: i for i, d in enumerate(DIGITS)}, "^": BOS, "$": EOS, " ": SEP}
_ID_TO_CHAR = {v: k for k, v in _CHAR_TO_ID.items()} | {PAD: "_"}


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown math family {family!r}; choose one of {', '.join(FAMILIES)}")
    return family


def numbers_of(family: str, c: int, i: int, length: int, modulus: int) -> list[int]:
    out, x = [], i
    for _ in range(length):
        x = x + c if family == "increment" else (c * x) % modulus
        out.append(x)
    return out


def to_text(numbers: list[int]) -> str:
    return "^" + " ".join(str(n) for n in numbers) + "$"


def encode(text: str) -> list[int]:
    try:
        return [_CHAR_TO_ID[ch] for ch in text]
    except KeyError as exc:
        raise ValueError(f"character {exc.args[0]!r} is not in the math vocabulary") from None


def decode(ids) -> str:
    return "".join(_ID_TO_CHAR[int(t)] for t in ids)


def pad_rows(rows: list[list[int]], max_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to ``max_ctx``; returns ids and the positional pad mask (True = padding we added)."""
    ids = torch.full((len(rows), max_ctx), PAD, dtype=torch.long)
    pad = torch.ones((len(rows), max_ctx), dtype=torch.bool)
    for r, row in enumerate(rows):
        if len(row) > max_ctx:
            raise ValueError(f"a sequence has {len(row)} tokens but max_ctx is {max_ctx}; raise max_ctx "
                             "or use fewer/smaller numbers per sequence")
        ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        pad[r, : len(row)] = False
    return ids, pad


def family_numbers(family: str, c: int, count: int, length: int, modulus: int) -> list[list[int]]:
    check_family(family)
    return [numbers_of(family, c, i, length, modulus) for i in range(count)]


def split_indices(count: int, num_test: int, data_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed permutation seeded by ``data_seed`` (not the run seed): (train indices, test indices)."""
    if num_test >= count:
        raise ValueError(f"num_test ({num_test}) must be smaller than the number of sequences ({count})")
    perm = torch.randperm(count, generator=torch.Generator().manual_seed(data_seed))
    return perm[num_test:].sort().values, perm[:num_test].sort().values
