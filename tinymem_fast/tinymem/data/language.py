"""Language data for TinyMem: a text corpus, a tokenizer, and fixed-length training chunks.

Everything here works offline. The default corpus is bundled inside the package (the King James Bible,
public domain outside the UK; see ``corpus/LICENSE.md``), so a language run needs neither network nor
extra packages. Other sources are local text files and, when the optional ``datasets`` package is
installed, a dataset saved with ``save_to_disk`` or one already in the local Hugging Face cache.

The pipeline is ``load_corpus`` -> ``train_bpe`` (or ``load_tokenizer``) -> ``tokenize_and_chunk``; each
step is deterministic, so the same spec always yields the same chunks, and ``tokenizer_hash`` lets a
run record exactly which tokenizer produced its token ids.
"""

from __future__ import annotations

import bz2
import contextlib
import glob
import gzip
import hashlib
import importlib.resources
import itertools
import json
import logging
import lzma
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...common.optional import require
from ...integrations.loading import first_line, load_tokenizer  # noqa: F401 (part of this API)

log = logging.getLogger(__name__)

SOURCES = ("bundled", "files", "hf_disk", "hf_cache")

#: The single special token of a tokenizer trained by :func:`train_bpe` (GPT-2's spelling).
EOT = "<|endoftext|>"

BUNDLED_FILE = "corpus/kjv.txt.xz"
#: Facts about the bundled corpus, checked on load (see ``corpus/LICENSE.md``).
BUNDLED_LINES = 31102
BUNDLED_SHA256 = "b55e956fcf5f187160b3d0dfa93bbac269d127902ad9fb6c8f05a5dab019f6d5"


@dataclass
class CorpusSpec:
    """Where the language corpus comes from and how it is split.

    ``source``:
      * ``"bundled"``: the King James Bible shipped in the package (31,102 verses, one per line).
      * ``"files"``: UTF-8 text files; ``paths`` lists files or glob patterns (``**`` allowed), read in
        the given order, each glob's matches sorted. ``.gz``/``.bz2``/``.xz`` files are decompressed.
      * ``"hf_disk"``: ``paths[0]`` is a folder written by ``datasets``' ``save_to_disk``.
      * ``"hf_cache"``: ``hf_name``/``hf_config`` (e.g. ``"wikitext"``, ``"wikitext-103-v1"``) of a
        dataset already in the local Hugging Face cache; never downloads.

    Lines are the unit: a record of an HF dataset is split at newlines, and lines that are empty or
    only whitespace are dropped. HF sources with a ``test`` split (else ``validation``) use it as the
    test set; every other source is split here (see ``test_fraction``).
    """

    source: str = "bundled"
    paths: list[str] = field(default_factory=list)
    hf_name: str | None = None
    hf_config: str | None = None
    text_column: str = "text"
    # Share of lines held out as test set for sources without their own test split. The split is by
    # contiguous blocks of ``split_block_lines`` lines, chosen with a fixed seed, not by single lines:
    # neighbouring lines of a text are often near-duplicates (parallel verses, repeated formulae,
    # boilerplate, a header and its paragraph), so a line-level random split would put a line in test
    # whose near-copy sits next to it in train, and the "unseen" test perplexity would leak train data.
    test_fraction: float = 0.05
    # Keep only the first max_lines non-empty lines of the source (before the split); for sources with
    # their own test split, the test split is cut to round(max_lines * test_fraction) lines (at least 1).
    max_lines: int | None = None
    split_block_lines: int = 100
    split_seed: int = 0

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown corpus source {self.source!r}; choose one of {', '.join(SOURCES)}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        if self.max_lines is not None and self.max_lines < 1:
            raise ValueError(f"max_lines must be positive or None, got {self.max_lines}")
        if self.split_block_lines < 1:
            raise ValueError(f"split_block_lines must be positive, got {self.split_block_lines}")
        if self.source in ("files", "hf_disk") and not self.paths:
            raise ValueError(f"corpus source {self.source!r} needs paths")
        if self.source == "hf_cache" and not self.hf_name:
            raise ValueError("corpus source 'hf_cache' needs hf_name (and usually hf_config)")


# --- corpus --------------------------------------------------------------------------------------


def load_corpus(spec: CorpusSpec) -> tuple[list[str], list[str]]:
    """Load the corpus as ``(train_lines, test_lines)``, deterministically, without network access.

    Lines keep their text exactly (only the line terminator is removed), so a byte-level tokenizer can
    reproduce them; empty lines are dropped because they carry no tokens but would skew line counts
    and splits.
    """
    spec.validate()
    t0 = time.perf_counter()
    if spec.source in ("bundled", "files"):
        stream = _bundled_lines() if spec.source == "bundled" else _file_lines(spec.paths)
        lines = _take(_nonempty(stream), spec.max_lines)
        if not lines:
            raise ValueError(f"corpus source {spec.source!r} {spec.paths or ''} holds no non-empty lines")
        train, test = split_lines(lines, spec.test_fraction, spec.split_block_lines, spec.split_seed)
    else:
        train, test = _hf_lines(spec)
    log.info("corpus %s: %d train lines, %d test lines (%.2f s)", spec.source, len(train), len(test),
             time.perf_counter() - t0)
    return train, test


def split_lines(lines: Sequence[str], test_fraction: float, block_lines: int = 100,
                seed: int = 0) -> tuple[list[str], list[str]]:
    """Split ``lines`` into train and test by whole contiguous blocks (see ``CorpusSpec.test_fraction``).

    Blocks are ranked by a sha256 of ``(seed, block index)`` rather than by a PRNG, so the split is
    the same on every platform and library version. Both parts keep the original line order.
    """
    n = len(lines)
    n_blocks = -(-n // block_lines)
    if test_fraction <= 0 or n_blocks < 2:
        if test_fraction > 0:
            log.warning("corpus of %d lines is a single split block; no test lines held out", n)
        return list(lines), []
    k = min(n_blocks - 1, max(1, round(test_fraction * n_blocks)))

    def rank(b: int) -> bytes:
        return hashlib.sha256(f"tinymem-split:{seed}:{b}".encode()).digest()

    test_blocks = set(sorted(range(n_blocks), key=rank)[:k])
    train: list[str] = []
    test: list[str] = []
    for b in range(n_blocks):
        (test if b in test_blocks else train).extend(lines[b * block_lines:(b + 1) * block_lines])
    return train, test


def _nonempty(lines: Iterable[str]) -> Iterator[str]:
    return (ln for ln in lines if ln.strip())


def _take(lines: Iterable[str], max_lines: int | None) -> list[str]:
    return list(lines if max_lines is None else itertools.islice(lines, max_lines))


def _bundled_lines() -> list[str]:
    res = importlib.resources.files("tinymem_fast.tinymem.data").joinpath(BUNDLED_FILE)
    try:
        raw = lzma.decompress(res.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"bundled corpus {BUNDLED_FILE} is missing from the installed package "
                                "(reinstall tinymem_fast)") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != BUNDLED_SHA256:
        log.warning("bundled corpus sha256 %s differs from the recorded %s", digest[:16], BUNDLED_SHA256[:16])
    return raw.decode("utf-8").splitlines()


def _expand_paths(paths: Sequence[str]) -> list[str]:
    """Files named by ``paths``, in order: plain names as given, each glob's matches sorted."""
    out: list[str] = []
    for p in paths:
        p = os.path.expanduser(p)
        if glob.has_magic(p):
            hits = sorted(h for h in glob.glob(p, recursive=True) if os.path.isfile(h))
            if not hits:
                raise FileNotFoundError(f"corpus glob {p!r} matches no files")
            out.extend(hits)
        elif os.path.isfile(p):
            out.append(p)
        elif os.path.isdir(p):
            raise ValueError(f"corpus path {p!r} is a folder; give files or a glob such as {p}/*.txt")
        else:
            raise FileNotFoundError(f"corpus file {p!r} not found")
    unique: dict[str, str] = {}  # a file named twice (or by two globs) is read once, at its first place
    for f in out:
        unique.setdefault(os.path.abspath(f), f)
    return list(unique.values())


def _open_text(path: str):
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(os.path.splitext(path)[1], open)
    return opener(path, "rt", encoding="utf-8", newline=None)


def _file_lines(paths: Sequence[str]) -> Iterator[str]:
    for path in _expand_paths(paths):
        try:
            with _open_text(path) as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"corpus file {path!r} is not UTF-8 text ({e.reason} at byte {e.start})"
                             ) from None
        yield from text.splitlines()


def _import_datasets():
    return require("datasets", "the corpus sources 'hf_disk' and 'hf_cache'")


@contextlib.contextmanager
def _cache_only(datasets):
    """``hf_cache`` means the local cache: datasets never reaches for the network during this load, and
    its settings are restored afterwards (nothing changes process-wide, e.g. for a user's own loads)."""
    names = [n for n in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if hasattr(datasets.config, n)]
    saved = {n: getattr(datasets.config, n) for n in names}
    for n in names:
        setattr(datasets.config, n, True)
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(datasets.config, n, v)


def _hf_lines(spec: CorpusSpec) -> tuple[list[str], list[str]]:
    datasets = _import_datasets()
    if spec.source == "hf_disk":
        where = os.path.expanduser(spec.paths[0])
        if not os.path.isdir(where):
            raise FileNotFoundError(f"hf_disk corpus folder {where!r} not found")
        try:
            ds = datasets.load_from_disk(where)
        except Exception as e:  # noqa: BLE001 - any failure means "not a saved dataset"
            raise ValueError(f"cannot load a saved dataset from {where!r} ({first_line(e)})") from None
        what = where
    else:
        what = spec.hf_name + (f"/{spec.hf_config}" if spec.hf_config else "")
        try:
            with _cache_only(datasets):
                ds = datasets.load_dataset(spec.hf_name, spec.hf_config)
        except Exception as e:  # noqa: BLE001 - offline, the usual failure is "not in the cache"
            raise ValueError(f"HF dataset {what} is not available offline in the local cache "
                             f"({first_line(e)})") from None

    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        train_name = "train" if "train" in ds else (names[0] if len(names) == 1 else None)
        if train_name is None:
            raise ValueError(f"dataset {what} has no 'train' split (splits: {', '.join(names)})")
        test_name = next((s for s in ("test", "validation") if s in ds and s != train_name), None)
        train_ds, test_ds = ds[train_name], (ds[test_name] if test_name else None)
    else:
        train_ds, test_ds = ds, None

    def lines_of(d) -> Iterator[str]:
        if spec.text_column not in d.column_names:
            raise ValueError(f"dataset {what} has no column {spec.text_column!r} "
                             f"(columns: {', '.join(d.column_names)})")
        for batch in d.iter(batch_size=4096):
            for text in batch[spec.text_column]:
                if text:
                    yield from str(text).splitlines()

    train = _take(_nonempty(lines_of(train_ds)), spec.max_lines)
    if not train:
        raise ValueError(f"dataset {what} holds no non-empty lines in column {spec.text_column!r}")
    if test_ds is None:
        return split_lines(train, spec.test_fraction, spec.split_block_lines, spec.split_seed)
    cap = None if spec.max_lines is None else max(1, round(spec.max_lines * spec.test_fraction))
    return train, _take(_nonempty(lines_of(test_ds)), cap)


# --- tokenizer -----------------------------------------------------------------------------------


def train_bpe(lines: Sequence[str], vocab_size: int, out_dir: str | None = None):
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``lines``; returns a fast HF tokenizer.

    Pass the training lines only, so test text never shapes the vocabulary. Byte-level means every
    string encodes (no unknown token) and decoding gives back the exact text. The one special token
    ``<|endoftext|>`` is BOS, EOS and PAD at once and takes the last id, ``vocab_size - 1``, as in
    GPT-2 (50256), so ordinary tokens keep ids ``0 .. vocab_size - 2``. Training is deterministic:
    the same lines and size give the same vocabulary and merges. Saved with ``save_pretrained`` to
    ``out_dir`` when given (a folder :func:`load_tokenizer` reads back).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
        raise ValueError(f"vocab_size must be at least {len(alphabet) + 2} (256 bytes, one merge, "
                         f"{EOT}), got {vocab_size}")
    if not any(ln for ln in lines):
        raise ValueError("cannot train a tokenizer on an empty corpus")
    t0 = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=0, special_tokens=[],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    # added after training so that it gets the last id rather than id 0
    tok.add_special_tokens([EOT])
    got = tok.get_vocab_size(with_added_tokens=True)
    if got < vocab_size:
        log.warning("BPE ran out of merges: vocabulary %d < requested %d (corpus too small)", got, vocab_size)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                 clean_up_tokenization_spaces=False)
    if hf.eos_token_id != got - 1:  # pragma: no cover - guards a change of behaviour in tokenizers
        raise RuntimeError(f"{EOT} got id {hf.eos_token_id}, expected the last id {got - 1}")
    log.info("trained byte-level BPE: %d tokens on %d lines in %.2f s", got, len(lines),
             time.perf_counter() - t0)
    if out_dir is not None:
        hf.save_pretrained(out_dir)
        log.info("tokenizer saved to %s", out_dir)
    return hf


def tokenizer_hash(tok: Any) -> str:
    """A short sha256 (16 hex digits) of what decides token ids: vocab, merges, added/special tokens.

    Canonical form, so it does not change with JSON key order, file layout or the merges notation
    of the ``tokenizers`` version, and a tokenizer hashes the same before saving and after loading.
    """
    canon: dict[str, Any] = {}
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        model = state.get("model") or {}
        canon["model"] = model.get("type")
        vocab = model.get("vocab")
        if isinstance(vocab, dict):
            canon["vocab"] = sorted((int(i), t) for t, i in vocab.items())
        elif isinstance(vocab, list):  # Unigram: [piece, score]
            canon["vocab"] = [list(v) for v in vocab]
        merges = model.get("merges")
        if merges is not None:
            canon["merges"] = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]
        canon["added"] = sorted((a["id"], a["content"], bool(a.get("special"))) for a in
                                state.get("added_tokens", []))
    else:
        canon["vocab"] = sorted((int(i), t) for t, i in tok.get_vocab().items())
    specials = getattr(tok, "special_tokens_map", None) or {}
    canon["special"] = sorted((k, str(v)) for k, v in specials.items())
    blob = json.dumps(canon, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# --- chunks --------------------------------------------------------------------------------------


def tokenize_and_chunk(lines: Sequence[str], tokenizer: Any, chunk_len: int, pad_id: int,
                       max_chunks: int | None = None, *, min_chunks: int | None = None,
                       sep_id: int | None = None,
                       batch_lines: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the token stream of ``lines`` into ``[N, chunk_len]`` rows plus a positional pad mask.

    Each line is encoded on its own (with whatever special tokens the tokenizer itself adds; a
    tokenizer from :func:`train_bpe` adds none) and the ids are concatenated in line order. Nothing is
    inserted between lines unless ``sep_id`` is given, in which case it goes between consecutive
    lines (not after the last). Note that without a separator the lines' texts simply abut. The stream
    is cut into consecutive chunks, the last one right-padded with ``pad_id``; ``max_chunks`` keeps
    only the first chunks (and stops tokenizing once they are full).

    The mask is True exactly at the padding added here. It is positional on purpose: ``pad_id`` is
    usually the EOS id, which can also occur as real content (a separator, or ``<|endoftext|>`` in the
    text), and such tokens must be trained on and measured like any other.

    Raises ValueError if ``min_chunks`` is given and fewer chunks are available. With no lines and no
    minimum, returns empty ``[0, chunk_len]`` tensors.
    """
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be positive, got {chunk_len}")
    if max_chunks is not None and max_chunks < 0:
        raise ValueError(f"max_chunks must be >= 0 or None, got {max_chunks}")
    if min_chunks is not None and max_chunks is not None and min_chunks > max_chunks:
        raise ValueError(f"min_chunks {min_chunks} exceeds max_chunks {max_chunks}")
    limit = None if max_chunks is None else max_chunks * chunk_len
    parts: list[np.ndarray] = []
    n_tok = 0
    for start in range(0, len(lines), batch_lines):
        if limit is not None and n_tok >= limit:
            break
        batch = list(lines[start:start + batch_lines])
        enc = tokenizer(batch, return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        for i, ids in enumerate(enc):
            if sep_id is not None and (start + i) > 0:
                parts.append(np.array([sep_id], dtype=np.int64))
                n_tok += 1
            parts.append(np.asarray(ids, dtype=np.int64))
            n_tok += len(ids)
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    available = -(-flat.size // chunk_len)  # the last, partial chunk counts: it is padded
    if min_chunks is not None and available < min_chunks:
        raise ValueError(f"corpus yields {available} chunks of {chunk_len} tokens ({flat.size} tokens from "
                         f"{len(lines)} lines); {min_chunks} needed")
    n = available if max_chunks is None else min(available, max_chunks)
    flat = flat[:n * chunk_len]
    ids = torch.full((n, chunk_len), int(pad_id), dtype=torch.long)
    pad = torch.ones((n, chunk_len), dtype=torch.bool)
    ids.view(-1)[:flat.size] = torch.from_numpy(flat)
    pad.view(-1)[:flat.size] = False
    log.info("chunked %d lines into %d x %d tokens (%d tokens, %d padding)", len(lines), n, chunk_len,
             flat.size, n * chunk_len - flat.size)
    return ids, pad
