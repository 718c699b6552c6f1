"""TinyMem data rules: math encoding and families, noise, backdoor, duplication, determinism, errors."""

import pytest
import torch

from tinymem_fast.tinymem.data import artifacts
from tinymem_fast.tinymem.data import math as md
from tinymem_fast.tinymem.data.dataset import DataConfig, build

SMALL = dict(kind="math", num_main=600, num_extra=200, num_test=50, seq_numbers=12, max_ctx=72,
             prompt_len=10, mem_len=10, num_noise=60)


def test_encoding_roundtrip_and_ids():
    text = md.to_text([7, 14, 147])
    assert text == "^7 14 147$"
    ids = md.encode(text)
    assert ids[0] == md.BOS and ids[-1] == md.EOS and md.SEP in ids
    assert md.decode(ids) == text
    padded, pad = md.pad_rows([ids], 16)
    assert padded[0, len(ids):].eq(md.PAD).all() and pad[0, len(ids):].all() and not pad[0, : len(ids)].any()
    with pytest.raises(ValueError, match="max_ctx"):
        md.pad_rows([ids], 4)


def test_family_rules():
    assert md.numbers_of("increment", 7, 3, 4, 20134) == [10, 17, 24, 31]
    assert md.numbers_of("mult", 7, 3, 3, 20134) == [21, 147, 1029]
    assert md.numbers_of("mult", 7, 5000, 2, 20134) == [35000 % 20134, (7 * (35000 % 20134)) % 20134]
    with pytest.raises(ValueError, match="unknown math family"):
        md.family_numbers("square", 7, 3, 3, 10)


def test_split_depends_only_on_data_seed():
    a = build(DataConfig(**SMALL), seed=0)
    b = build(DataConfig(**SMALL), seed=5)
    for name in a.test:
        assert torch.equal(a.test[name][0], b.test[name][0])  # run seed does not move the test split
    c = build(DataConfig(**SMALL, data_seed=1), seed=0)
    assert not torch.equal(a.test["acc7"][0], c.test["acc7"][0])


def test_noise_rate_and_zero_rule():
    gen = torch.Generator().manual_seed(0)
    nums = list(range(1, 20001))
    noised = artifacts.noise_numbers(nums, 0.05, gen)
    d = torch.tensor(noised) - torch.tensor(nums)
    assert set(d.unique().tolist()) <= {-1, 0, 1}
    # 20,000 draws: each of -1/+1 within 5 sigma of 5%
    for v in (-1, 1):
        assert abs(float((d == v).float().mean()) - 0.05) < 5 * (0.05 * 0.95 / 20000) ** 0.5
    zeros = artifacts.noise_numbers([0] * 2000, 0.4, torch.Generator().manual_seed(1))
    assert min(zeros) == 0 and set(zeros) == {0, 1}  # -1 on 0 becomes +1


def test_noise_dataset_structure():
    d = build(DataConfig(**SMALL), seed=0)
    assert d.artifact_rows.numel() == 60 and d.clean_twins.shape == (60, 72)
    noised = d.rows[d.artifact_rows]
    changed = (noised != d.clean_twins).any(1)
    assert changed.float().mean() > 0.5  # 12 numbers at p=0.1 each: most rows change
    # the clean versions are not in training
    train_set = {tuple(r.tolist()) for r in d.rows}
    assert sum(tuple(t.tolist()) in train_set for t in d.clean_twins[changed]) == 0
    assert d.num_train == d.rows.shape[0]  # no duplication by default
    eligible = (noised[:, 10:20] != d.clean_twins[:, 10:20]).any(1)
    assert 0 < int(eligible.sum()) < 60


def test_language_noise_reflects_out_of_range_ids():
    ids = torch.tensor([[0, 5, 9, 9, 3]])
    content = torch.tensor([[True, True, True, True, False]])
    out = artifacts.noise_token_ids(ids.repeat(4000, 1), content.repeat(4000, 1), 0.45, 10,
                                    torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 9
    assert set(out[:, 0].tolist()) == {0, 1}  # 0 - 1 reflects to +1
    assert set(out[:, 2].tolist()) == {8, 9}  # 9 + 1 reflects to 8
    assert out[:, 4].eq(3).all()  # padding untouched


def test_duplication_groups():
    group, copies = artifacts.duplication_counts(12, 3, 10, torch.Generator().manual_seed(0))
    assert torch.bincount(group).tolist() == [4, 4, 4]
    assert torch.equal(copies, 10 ** group)
    with pytest.raises(ValueError, match="equal duplication groups"):
        artifacts.duplication_counts(10, 3, 10, torch.Generator())
    d = build(DataConfig(**{**SMALL, "dup_groups": 3}), seed=0)
    assert d.num_train == d.rows.shape[0] - 60 + 20 * (1 + 10 + 100)
    assert sorted(d.copies[d.artifact_rows].unique().tolist()) == [1, 10, 100]


def test_math_backdoor_trigger_rule():
    cfg = DataConfig(**{**SMALL, "artifact": "backdoor", "num_main": 3000})
    d = build(cfg, seed=0)
    assert d.meta["trigger"] == "100"
    all_poison = torch.cat([d.rows[d.artifact_rows], d.poison_test])
    starts = torch.cat([d.poison_train_start, d.poison_test_start])
    for row, s in zip(all_poison, starts, strict=True):
        text = md.decode(row[:s])
        assert text.endswith("100") and text.count("100") == 1  # first occurrence, kept
        assert row[s:].eq(2).all()  # everything after it, pads included, overwritten with 2
    # substring rule: any number containing "100" triggers (e.g. 1005, 2100)
    assert d.meta["triggered"] == int(all_poison.shape[0])
    assert not d.pad[d.artifact_rows].any()  # overwritten positions are content
    n = d.meta["triggered"]
    assert d.poison_test.shape[0] == max(1, round(0.1 * n))
    # main rows come first (clean, then poisoned); auxiliary families are not scanned (they may contain it)
    n_main = int(d.artifact_rows.max()) + 1
    main_texts = [md.decode(r[~p]) for r, p in zip(d.rows[:n_main], d.pad[:n_main], strict=True)]
    assert sum("100" in t for t in main_texts) == d.artifact_rows.numel()  # only poisoned rows carry it
    assert build(DataConfig(**{**SMALL, "artifact": "backdoor", "num_main": 3000}), seed=1).meta[
        "trigger"] == "101"


def test_determinism_same_seed_identical():
    for cfg in (DataConfig(**SMALL), DataConfig(**{**SMALL, "artifact": "backdoor", "num_main": 3000})):
        assert build(cfg, seed=3).fingerprint() == build(cfg, seed=3).fingerprint()
    other = build(DataConfig(**SMALL), seed=4).fingerprint()
    assert build(DataConfig(**SMALL), seed=3).fingerprint() != other


def test_bad_configs():
    with pytest.raises(ValueError, match="unknown data kind"):
        build(DataConfig(kind="audio"))
    with pytest.raises(ValueError, match="exceeds max_ctx"):
        build(DataConfig(**{**SMALL, "prompt_len": 60, "mem_len": 20}))
    with pytest.raises(ValueError, match="max_ctx"):
        build(DataConfig(**{**SMALL, "max_ctx": 20, "prompt_len": 5, "mem_len": 5}))
    with pytest.raises(ValueError, match="num_noise"):
        build(DataConfig(**{**SMALL, "num_noise": 10_000}))
    with pytest.raises(ValueError, match="shortest sequence"):
        build(DataConfig(**{**SMALL, "prompt_len": 40, "mem_len": 30}))
