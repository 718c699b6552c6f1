"""Inputs of the scoring engine: token sequences from .jsonl (ids or text + tokenizer), .npy or .pt
(``weights_only=True``), cut to a fixed window; tokenizer and EOS checks against the model."""

from __future__ import annotations

import os

import numpy as np
import torch

from .scoring import ScoringInputError, split_causal_lm
from .sources import parse_line, read_npy, read_pt


def check_tokenizer(tokenizer, model, name: str = "the tokenizer") -> None:
    """A tokenizer with more tokens than the model's vocabulary does not belong to it (a smaller one may:
    checkpoints often pad their embedding matrix)."""
    vocab = split_causal_lm(model).vocab_size
    if len(tokenizer) > vocab:
        raise ScoringInputError(f"tokenizer {name!r} has {len(tokenizer)} tokens but the model's vocabulary "
                                f"has {vocab}: they do not belong together")


def load_sequences(path: str, tokenizer=None) -> list[list[int]] | torch.Tensor:
    """Token sequences, whole and in memory (for small inputs; :func:`~.sources.open_source` reads any size
    by row blocks): ``.jsonl`` (one ``{"ids": [...]}`` or ``{"text": "..."}`` per line; blank lines skipped),
    ``.npy`` (an integer array ``[N, L]``) or ``.pt`` (an integer tensor ``[N, L]``, loaded with
    ``weights_only=True``). Returns a tensor for array inputs, else a list of lists (rows may differ in
    length)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json"):
        with open(path, "rb") as f:
            out = [parse_line(raw, f"{path}:{lineno}", tokenizer)
                   for lineno, raw in enumerate(f, 1) if raw.strip()]
        if not out:
            raise ScoringInputError(f"{path}: empty input (no sequences)")
        return out
    if ext == ".npy":
        return torch.from_numpy(read_npy(path).astype(np.int64))
    if ext == ".pt":
        return read_pt(path).long()
    raise ScoringInputError(f"{path}: unknown input format {ext!r}; use .jsonl, .npy or .pt")


def to_matrix(seqs, need: int) -> torch.Tensor:
    """Cut every sequence to its first ``need`` tokens and stack them into ``[N, need]``."""
    if isinstance(seqs, torch.Tensor):
        if seqs.shape[1] < need:
            raise ScoringInputError(f"prefix_len + suffix_len = {need} is longer than the sequences "
                                    f"({seqs.shape[1]} tokens)")
        return seqs[:, :need]
    if not seqs:
        raise ScoringInputError("empty input (no sequences)")
    for r, s in enumerate(seqs):
        if len(s) < need:
            raise ScoringInputError(f"sequence {r} has {len(s)} tokens, fewer than prefix_len + suffix_len = "
                                    f"{need}")
    return torch.tensor([s[:need] for s in seqs], dtype=torch.long)



def eos_ids(model) -> list[int]:
    """The model's EOS token ids (generation config first, then model config); [] when it has none."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None \
        else model.config.vocab_size
    bad = [e for e in ids if not 0 <= e < vocab]
    if bad:
        raise ScoringInputError(f"the model's EOS id {bad[0]} is outside its vocabulary of {vocab}: fix "
                                "eos_token_id in config.json / generation_config.json, or no --suppress-eos")
    return ids
