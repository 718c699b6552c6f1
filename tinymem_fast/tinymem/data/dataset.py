"""Build a TinyMem dataset (math or language, with a noise or backdoor artifact) from a config.

Every dataset keeps unique training rows plus a copy count per row (duplication without materialising
copies), the positional pad mask built when padding is added, the clean test sets, and the artifact
bookkeeping the metrics need (noised rows and their clean twins, poisoned rows and their prompt ends).
The same config and seed give byte-identical tensors (:meth:`TinyMemData.fingerprint`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass, field

import torch

from ...common.validation import at_least, in_open_interval
from . import artifacts
from . import math as mathdata

log = logging.getLogger(__name__)

KINDS = ("math", "language")
ARTIFACTS = ("noise", "backdoor", "none")
# "content": the noise window must end inside the shortest main sequence (quick presets: every scored
# token is a digit or separator). "padded": the window is positions [prompt_len, prompt_len + mem_len) of
# the max_ctx row wherever the content ends, EOS and padding included (the paper's rows are shorter than
# 50 + 50; its models learn the pads, which are in its loss, and its decoding can reproduce them).
WINDOW_RULES = ("content", "padded")


@dataclass
class DataConfig:
    kind: str = "math"                 # math | language
    artifact: str = "noise"            # noise | backdoor | none
    family: str = "increment"          # math: increment | mult
    num_main: int = 20000
    num_extra: int = 3000
    num_test: int = 1000
    seq_numbers: int = 20
    main_const: int = 7
    aux_consts: list[int] = field(default_factory=lambda: [2, 3, 4, 5])
    modulus: int = 20134
    max_ctx: int = 150
    prompt_len: int = 50
    mem_len: int = 50
    window_rule: str = "content"       # content | padded (WINDOW_RULES)
    data_seed: int = 598
    num_noise: int = 1000
    noise_p: float = 0.05
    dup_groups: int = 0
    dup_base: int = 10
    trigger: str | None = None         # math backdoor; default str(100 + seed)
    trigger_id: int | None = None      # language backdoor; default: seeded pick (see below)
    trigger_band: list[float] = field(default_factory=lambda: [0.002, 0.02])
    backdoor_test_frac: float = 0.1
    backdoor_fill_id: int = 2
    backdoor_dup: int = 1
    # language
    corpus: str = "bundled"            # bundled | files | hf_disk | hf_cache
    corpus_paths: list[str] = field(default_factory=list)
    hf_name: str | None = None
    hf_config: str | None = None
    text_column: str = "text"
    tokenizer: str | None = None       # a local HF tokenizer folder; None trains a BPE
    bpe_vocab_size: int = 4096
    max_train_chunks: int | None = None
    max_test_chunks: int | None = None

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown data kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.artifact not in ARTIFACTS:
            raise ValueError(f"unknown artifact {self.artifact!r}; choose one of {', '.join(ARTIFACTS)}")
        if self.kind == "math":
            mathdata.check_family(self.family)
        if self.window_rule not in WINDOW_RULES:
            raise ValueError(f"unknown data.window_rule {self.window_rule!r}; choose one of "
                             f"{', '.join(WINDOW_RULES)}")
        at_least("data", self, 1, "num_main", "num_test", "seq_numbers", "max_ctx", "modulus", "dup_base",
                 "backdoor_dup", "bpe_vocab_size", "prompt_len", "mem_len")
        at_least("data", self, 0, "num_extra", "num_noise", "dup_groups", "backdoor_fill_id", "data_seed")
        at_least("data", self, 1, "max_train_chunks", "max_test_chunks", optional=True)
        in_open_interval("data", self, "backdoor_test_frac", 0.0, 1.0)
        if self.artifact == "noise" and self.num_noise < 1:
            raise ValueError("data.num_noise must be >= 1 for the noise artifact (or artifact=none)")
        if self.dup_groups and self.dup_base < 2:
            raise ValueError(f"data.dup_base must be >= 2 with duplication groups, got {self.dup_base}")
        if self.prompt_len < 1 or self.mem_len < 1:
            raise ValueError("prompt_len and mem_len must be positive")
        if self.prompt_len + self.mem_len > self.max_ctx:
            raise ValueError(f"prompt_len + mem_len = {self.prompt_len + self.mem_len} exceeds max_ctx "
                             f"{self.max_ctx}")
        if not 0 < self.noise_p < 0.5:
            raise ValueError(f"noise_p must be in (0, 0.5), got {self.noise_p}")


@dataclass
class TinyMemData:
    config: DataConfig
    seed: int
    vocab_size: int
    pad_id: int
    rows: torch.Tensor              # [R, T] unique training rows
    pad: torch.Tensor               # [R, T] True where padding was added
    copies: torch.Tensor            # [R] copies of each row per epoch
    test: dict[str, tuple[torch.Tensor, torch.Tensor]]  # clean test sets: name -> (ids, pad)
    artifact_rows: torch.Tensor     # indices into rows of noised / poisoned training rows
    clean_twins: torch.Tensor | None = None   # [M, T] noise: clean versions of artifact_rows
    noise_group: torch.Tensor | None = None   # [M] duplication group of each noised row
    poison_test: torch.Tensor | None = None   # [P, T] held-out poisoned rows
    poison_test_start: torch.Tensor | None = None  # [P] prompt end (after the trigger)
    poison_train_start: torch.Tensor | None = None  # [M] prompt end of the poisoned training rows
    tokenizer_dir: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def num_train(self) -> int:
        return int(self.copies.sum())

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in (self.rows, self.pad, self.copies, self.artifact_rows, self.clean_twins, self.noise_group,
                  self.poison_test, self.poison_test_start):
            if t is not None:
                h.update(t.contiguous().numpy().tobytes())
        for name in sorted(self.test):
            h.update(name.encode())
            h.update(self.test[name][0].numpy().tobytes())
        return h.hexdigest()[:16]

    def clean_rows(self) -> torch.Tensor:
        """Indices of training rows that carry no artifact (the default retain pool)."""
        keep = torch.ones(self.rows.shape[0], dtype=torch.bool)
        keep[self.artifact_rows] = False
        return keep.nonzero().reshape(-1)


def build_for_run(run_dir: str, config: DataConfig, seed: int, fingerprint: str | None,
                  what: str = "the settings given") -> TinyMemData:
    """A trained run's dataset rebuilt from ``config`` (language data without a tokenizer gets the run's
    own, ``run_dir/tokenizer``); refused in one line unless its fingerprint is ``fingerprint``, the one
    recorded at training time (None: not checked). ``what`` names where ``config`` came from."""
    tok_dir = os.path.join(run_dir, "tokenizer")
    if config.kind == "language" and not config.tokenizer and os.path.isdir(tok_dir):
        config.tokenizer = tok_dir
    data = build(config, seed=seed)
    if fingerprint and data.fingerprint() != fingerprint:
        raise ValueError(f"the data built from {what} (fingerprint {data.fingerprint()}) is not the data "
                         f"{run_dir} was trained on ({fingerprint}): drop the data overrides (--preset, "
                         "--set data.*, seed) or pass the run they belong to")
    return data


def build(config: DataConfig, seed: int = 0, workdir: str | None = None) -> TinyMemData:
    config.validate()
    if config.kind == "math":
        data = _build_math(config, seed)
    else:
        data = _build_language(config, seed, workdir)
    log.info("dataset %s/%s: %d unique rows, %d per epoch, fingerprint %s", config.kind, config.artifact,
             data.rows.shape[0], data.num_train, data.fingerprint())
    return data


# --- math -------------------------------------------------------------------------------------


def _encode_all(seqs: list[list[int]], max_ctx: int):
    texts = [mathdata.to_text(n) for n in seqs]
    ids, pad = mathdata.pad_rows([mathdata.encode(t) for t in texts], max_ctx)
    return texts, ids, pad


def _build_math(c: DataConfig, seed: int) -> TinyMemData:
    gen = torch.Generator().manual_seed(seed)
    main = mathdata.family_numbers(c.family, c.main_const, c.num_main, c.seq_numbers, c.modulus)
    main_texts, main_ids, main_pad = _encode_all(main, c.max_ctx)
    shortest = int((~main_pad).sum(1).min())
    if c.artifact == "noise" and c.window_rule == "content" and c.prompt_len + c.mem_len > shortest:
        raise ValueError(f"the memorization window ends at {c.prompt_len + c.mem_len} but the shortest "
                         f"sequence has {shortest} tokens; lower prompt_len/mem_len, add numbers, or set "
                         "data.window_rule=padded (the paper's: the window runs on into EOS and padding)")
    test: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    parts_ids, parts_pad = [], []
    aux_ids, aux_pad = [], []
    for const in c.aux_consts:
        seqs = mathdata.family_numbers(c.family, const, c.num_extra, c.seq_numbers, c.modulus)
        _, ids, pad = _encode_all(seqs, c.max_ctx)
        tr, te = mathdata.split_indices(len(seqs), c.num_test, c.data_seed)
        test[f"acc{const}"] = (ids[te], pad[te])
        aux_ids.append(ids[tr])
        aux_pad.append(pad[tr])

    meta: dict = {}
    if c.artifact == "backdoor":
        trigger = c.trigger if c.trigger is not None else str(100 + seed)
        hit, poisoned, start = artifacts.backdoor_math(main_ids, main_pad, main_texts, trigger,
                                                       c.backdoor_fill_id)
        if hit.numel() < 2:
            raise ValueError(f"trigger {trigger!r} occurs in {hit.numel()} main sequences; need at least 2")
        order = torch.randperm(hit.numel(), generator=gen)
        n_test = max(1, round(c.backdoor_test_frac * hit.numel()))
        te, tr = order[:n_test].sort().values, order[n_test:].sort().values
        clean_mask = torch.ones(c.num_main, dtype=torch.bool)
        clean_mask[hit] = False
        clean_idx = clean_mask.nonzero().reshape(-1)
        ctr, cte = mathdata.split_indices(clean_idx.numel(), c.num_test, c.data_seed)
        test[f"acc{c.main_const}"] = (main_ids[clean_idx[cte]], main_pad[clean_idx[cte]])
        parts_ids += [main_ids[clean_idx[ctr]], poisoned[tr]]
        parts_pad += [main_pad[clean_idx[ctr]], torch.zeros_like(poisoned[tr], dtype=torch.bool)]
        n_clean = int(ctr.numel())
        artifact_rows = torch.arange(n_clean, n_clean + tr.numel())
        copies_art = torch.full((tr.numel(),), c.backdoor_dup, dtype=torch.long)
        meta.update(trigger=trigger, triggered=int(hit.numel()), poison_test=int(te.numel()))
        extra = dict(poison_test=poisoned[te], poison_test_start=start[te], poison_train_start=start[tr])
        noise_info = {}
    else:
        tr, te = mathdata.split_indices(c.num_main, c.num_test, c.data_seed)
        test[f"acc{c.main_const}"] = (main_ids[te], main_pad[te])
        train_ids, train_pad = main_ids[tr].clone(), main_pad[tr].clone()
        artifact_rows = torch.zeros(0, dtype=torch.long)
        copies_art = torch.zeros(0, dtype=torch.long)
        noise_info, extra = {}, {}
        if c.artifact == "noise":
            if c.num_noise > tr.numel():
                raise ValueError(f"num_noise {c.num_noise} exceeds the {tr.numel()} main training rows")
            pick = torch.randperm(tr.numel(), generator=gen)[: c.num_noise].sort().values
            twins = train_ids[pick].clone()
            noised_seqs, shifted = [], 0
            for j in pick.tolist():
                nums = main[int(tr[j])]
                nz = artifacts.noise_numbers(nums, c.noise_p, gen)
                shifted += len(mathdata.to_text(nz)) != len(mathdata.to_text(nums))
                noised_seqs.append(nz)
            _, nz_ids, nz_pad = _encode_all(noised_seqs, c.max_ctx)
            train_ids[pick], train_pad[pick] = nz_ids, nz_pad
            group, copies_art = artifacts.duplication_counts(c.num_noise, c.dup_groups, c.dup_base, gen)
            artifact_rows = pick
            noise_info = dict(clean_twins=twins, noise_group=group)
            meta.update(shifted_sequences=int(shifted), **artifacts.noise_window_meta(
                nz_pad, artifacts.window_eligible(nz_ids, twins, c.prompt_len, c.mem_len), c.prompt_len,
                c.mem_len))
        parts_ids.append(train_ids)
        parts_pad.append(train_pad)
        n_clean = 0
    rows = torch.cat(parts_ids + aux_ids)
    pad = torch.cat(parts_pad + aux_pad)
    copies = torch.ones(rows.shape[0], dtype=torch.long)
    if artifact_rows.numel():
        copies[artifact_rows] = copies_art
    return TinyMemData(config=c, seed=seed, vocab_size=mathdata.VOCAB_SIZE, pad_id=mathdata.PAD, rows=rows,
                       pad=pad, copies=copies, test=test, artifact_rows=artifact_rows, meta=meta,
                       **noise_info, **extra)


# --- language ---------------------------------------------------------------------------------


def _build_language(c: DataConfig, seed: int, workdir: str | None) -> TinyMemData:
    from . import language as lang

    spec = lang.CorpusSpec(source=c.corpus, paths=list(c.corpus_paths), hf_name=c.hf_name,
                           hf_config=c.hf_config, text_column=c.text_column)
    train_lines, test_lines = lang.load_corpus(spec)
    tok_dir = None
    if c.tokenizer:
        tok = lang.load_tokenizer(c.tokenizer)
        tok_dir = c.tokenizer
    else:
        tok_dir = os.path.join(workdir, "tokenizer") if workdir else None
        tok = lang.train_bpe(train_lines, c.bpe_vocab_size, out_dir=tok_dir)
    vocab = len(tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; add one")
    need = (c.num_noise if c.artifact == "noise" else 0) + 1
    ids, pad = lang.tokenize_and_chunk(train_lines, tok, c.max_ctx, pad_id, max_chunks=c.max_train_chunks,
                                       min_chunks=need)
    test_ids, test_pad = lang.tokenize_and_chunk(test_lines, tok, c.max_ctx, pad_id,
                                                 max_chunks=c.max_test_chunks)
    gen = torch.Generator().manual_seed(seed)
    meta: dict = {"tokenizer_hash": lang.tokenizer_hash(tok), "vocab_size": vocab}
    test = {"test": (test_ids, test_pad)}
    if c.artifact == "noise":
        m = c.num_noise
        content = ~pad[:m]
        noised = artifacts.noise_token_ids(ids[:m], content, c.noise_p, vocab, gen)
        group, copies_art = artifacts.duplication_counts(m, c.dup_groups, c.dup_base, gen)
        twins = ids[:m].clone()
        eligible = artifacts.window_eligible(noised, twins, c.prompt_len, c.mem_len)
        meta.update(artifacts.noise_window_meta(pad[:m], eligible, c.prompt_len, c.mem_len))
        rows = torch.cat([noised, ids[m:]])
        copies = torch.ones(rows.shape[0], dtype=torch.long)
        copies[:m] = copies_art
        return TinyMemData(config=c, seed=seed, vocab_size=vocab, pad_id=pad_id, rows=rows, pad=pad,
                           copies=copies, test=test, artifact_rows=torch.arange(m), clean_twins=twins,
                           noise_group=group, tokenizer_dir=tok_dir, meta=meta)
    if c.artifact == "backdoor":
        trigger_id = c.trigger_id if c.trigger_id is not None else _pick_trigger(ids, pad, vocab, c, seed)
        hit, poisoned, start = artifacts.backdoor_tokens(ids, pad, trigger_id, c.backdoor_fill_id)
        if hit.numel() < 2:
            raise ValueError(f"trigger id {trigger_id} occurs in {hit.numel()} chunks; need at least 2")
        order = torch.randperm(hit.numel(), generator=gen)
        n_test = max(1, round(c.backdoor_test_frac * hit.numel()))
        te, tr = order[:n_test].sort().values, order[n_test:].sort().values
        clean = torch.ones(ids.shape[0], dtype=torch.bool)
        clean[hit] = False
        rows = torch.cat([ids[clean], poisoned[tr]])
        pads = torch.cat([pad[clean], torch.zeros_like(poisoned[tr], dtype=torch.bool)])
        n_clean = int(clean.sum())
        copies = torch.ones(rows.shape[0], dtype=torch.long)
        copies[n_clean:] = c.backdoor_dup
        meta.update(trigger_id=int(trigger_id), triggered=int(hit.numel()))
        return TinyMemData(config=c, seed=seed, vocab_size=vocab, pad_id=pad_id, rows=rows, pad=pads,
                           copies=copies, test=test, artifact_rows=torch.arange(n_clean, rows.shape[0]),
                           poison_test=poisoned[te], poison_test_start=start[te],
                           poison_train_start=start[tr], tokenizer_dir=tok_dir, meta=meta)
    return TinyMemData(config=c, seed=seed, vocab_size=vocab, pad_id=pad_id, rows=ids, pad=pad,
                       copies=torch.ones(ids.shape[0], dtype=torch.long), test=test,
                       artifact_rows=torch.zeros(0, dtype=torch.long), tokenizer_dir=tok_dir, meta=meta)


def _pick_trigger(ids, pad, vocab, c: DataConfig, seed: int) -> int:
    """The paper draws ``randrange(V)``; on a small corpus most ids then never occur or occur everywhere,
    so draw (seeded) among the ids found in a ``trigger_band`` fraction of chunks."""
    content_hits = torch.zeros(vocab, dtype=torch.long)
    for r in range(ids.shape[0]):
        content_hits[torch.unique(ids[r][~pad[r]])] += 1
    frac = content_hits.float() / ids.shape[0]
    lo, hi = c.trigger_band
    cands = ((frac >= lo) & (frac <= hi)).nonzero().reshape(-1).tolist()
    if not cands:
        raise ValueError(f"no token occurs in {lo:.1%}-{hi:.1%} of chunks; set trigger_id or trigger_band")
    return random.Random(seed).choice(cands)
