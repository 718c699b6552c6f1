"""Language data: bundled corpus, offline sources, byte-level BPE, chunking with a positional pad mask."""

import gzip
import hashlib
import importlib.resources
import lzma
import sys

import pytest
import torch

from tinymem_fast.tinymem.data import language as lang
from tinymem_fast.tinymem.data.language import CorpusSpec, load_corpus, tokenize_and_chunk, train_bpe

# sha256 of "\n".join(test lines) of the bundled corpus with the default split; pins the split so that
# no change to the splitting code silently moves lines between train and test
BUNDLED_TEST_SHA = "737ae00c054263fd"  # first 16 hex digits


@pytest.fixture(scope="module")
def bundled():
    return load_corpus(CorpusSpec())


@pytest.fixture(scope="module")
def tok4096(bundled):
    """The real configuration: BPE with vocab 4096 on the bundled training lines (about 1-3 s)."""
    return train_bpe(bundled[0], 4096)


@pytest.fixture(scope="module")
def small_tok(bundled):
    return train_bpe(bundled[0][:3000], 512)


# --- corpus --------------------------------------------------------------------------------------


def test_bundled_file_matches_its_license_facts():
    raw = lzma.decompress(importlib.resources.files("tinymem_fast.tinymem.data").joinpath(lang.BUNDLED_FILE)
                          .read_bytes())
    assert hashlib.sha256(raw).hexdigest() == lang.BUNDLED_SHA256
    assert raw.count(b"\n") == lang.BUNDLED_LINES == 31102
    lic = importlib.resources.files("tinymem_fast.tinymem.data").joinpath("corpus/LICENSE.md").read_text()
    assert lang.BUNDLED_SHA256 in lic and "31,102" in lic


def test_bundled_corpus_lines_and_split(bundled):
    train, test = bundled
    assert len(train) + len(test) == 31102
    assert train[0] == "In the beginning God created the heaven and the earth."
    assert all(ln.strip() for ln in train + test)
    # 312 blocks of 100 lines, 5 % -> 16 blocks held out
    assert len(test) == 1600
    full = lang._bundled_lines()
    aligned = {tuple(full[b * 100:(b + 1) * 100]) for b in range(312)}
    assert all(tuple(test[i:i + 100]) in aligned for i in range(0, 1600, 100))  # whole blocks only


def test_bundled_split_is_stable(bundled):
    train2, test2 = load_corpus(CorpusSpec())
    assert (train2, test2) == bundled
    digest = hashlib.sha256("\n".join(bundled[1]).encode()).hexdigest()[:16]
    assert digest == BUNDLED_TEST_SHA


def test_split_is_by_whole_contiguous_blocks():
    lines = [f"line {i}" for i in range(1050)]
    train, test = lang.split_lines(lines, 0.2, block_lines=50, seed=3)
    idx = sorted(int(s.split()[1]) for s in test)
    assert sorted(train + test, key=lambda s: int(s.split()[1])) == lines
    assert train == sorted(train, key=lambda s: int(s.split()[1]))  # order kept
    blocks = {i // 50 for i in idx}
    assert len(blocks) == round(0.2 * 21) and len(idx) == sum(len(lines[b * 50:(b + 1) * 50]) for b in blocks)
    assert lang.split_lines(lines, 0.2, 50, seed=3) == (train, test)
    assert lang.split_lines(lines, 0.2, 50, seed=4)[1] != test
    assert lang.split_lines(lines, 0.0, 50) == (lines, [])


def test_files_source_with_glob(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "sub").mkdir()
    (tmp_path / "a" / "2.txt").write_text("two\n\n   \nthree\n")
    (tmp_path / "a" / "1.txt").write_text("zero\r\none\n")
    (tmp_path / "a" / "sub" / "4.txt").write_text("four\n")
    with gzip.open(tmp_path / "a" / "5.txt.gz", "wt") as f:
        f.write("five\n")
    spec = CorpusSpec(source="files", paths=[str(tmp_path / "a" / "*.txt")], test_fraction=0.0)
    assert load_corpus(spec) == (["zero", "one", "two", "three"], [])
    spec.paths = [str(tmp_path / "a" / "**" / "*.txt"), str(tmp_path / "a" / "*.gz"),
                  str(tmp_path / "a" / "1.txt")]  # 1.txt again: read once
    assert load_corpus(spec)[0] == ["zero", "one", "two", "three", "four", "five"]
    spec.max_lines = 3
    assert load_corpus(spec)[0] == ["zero", "one", "two"]
    spec = CorpusSpec(source="files", paths=[str(tmp_path / "a" / "*.txt")], test_fraction=0.5,
                      split_block_lines=1)
    train, test = load_corpus(spec)
    assert len(train) == len(test) == 2 and sorted(train + test) == sorted(["zero", "one", "two", "three"])


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_corpus(CorpusSpec(source="files", paths=[str(tmp_path / "missing.txt")]))
    with pytest.raises(FileNotFoundError, match="matches no files"):
        load_corpus(CorpusSpec(source="files", paths=[str(tmp_path / "*.txt")]))
    (tmp_path / "blank.txt").write_text("\n  \n\t\n")
    with pytest.raises(ValueError, match="no non-empty lines"):
        load_corpus(CorpusSpec(source="files", paths=[str(tmp_path / "blank.txt")]))
    with pytest.raises(ValueError, match="is a folder"):
        load_corpus(CorpusSpec(source="files", paths=[str(tmp_path)]))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_corpus(CorpusSpec(source="files", paths=[str(tmp_path / "latin1.txt")]))
    with pytest.raises(ValueError, match="unknown corpus source"):
        load_corpus(CorpusSpec(source="web"))
    with pytest.raises(ValueError, match="needs paths"):
        load_corpus(CorpusSpec(source="files"))
    with pytest.raises(FileNotFoundError, match="not found"):
        lang.load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="holds no tokenizer"):
        lang.load_tokenizer(str(tmp_path))


def test_hf_source_without_datasets_says_so(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"package datasets: pip install 'tinymem_fast\[datasets\]'"):
        load_corpus(CorpusSpec(source="hf_disk", paths=[str(tmp_path)]))


def test_hf_disk_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a b\nc", "", " = Head = \n", "d"], "n": [1, 2, 3, 4]}),
        "test": datasets.Dataset.from_dict({"text": ["t1", " ", "t2\n"], "n": [1, 2, 3]}),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_corpus(CorpusSpec(source="hf_disk", paths=[str(tmp_path / "dd")])) == (
        ["a b", "c", " = Head = ", "d"], ["t1", "t2"])
    dd["train"].save_to_disk(str(tmp_path / "single"))  # no test split: split here
    train, test = load_corpus(CorpusSpec(source="hf_disk", paths=[str(tmp_path / "single")],
                                         test_fraction=0.25, split_block_lines=1))
    assert len(test) == 1 and sorted(train + test) == sorted(["a b", "c", " = Head = ", "d"])
    with pytest.raises(ValueError, match="no column 'body'"):
        load_corpus(CorpusSpec(source="hf_disk", paths=[str(tmp_path / "dd")], text_column="body"))
    with pytest.raises(FileNotFoundError):
        load_corpus(CorpusSpec(source="hf_disk", paths=[str(tmp_path / "absent")]))
    with pytest.raises(ValueError, match="not available offline"):
        load_corpus(CorpusSpec(source="hf_cache", hf_name="tinymem-no-such-dataset-xyz"))


# --- tokenizer -----------------------------------------------------------------------------------


def test_bpe_full_corpus_special_token_is_last(tok4096):
    assert len(tok4096) == 4096
    assert tok4096.eos_token_id == tok4096.bos_token_id == tok4096.pad_token_id == 4095
    assert tok4096.convert_ids_to_tokens(4095) == "<|endoftext|>"
    assert tok4096.all_special_tokens == ["<|endoftext|>"]
    assert tok4096("In the beginning", add_special_tokens=True)["input_ids"] == \
        tok4096("In the beginning", add_special_tokens=False)["input_ids"]


def test_bpe_is_deterministic_and_round_trips(bundled, small_tok, tmp_path):
    again = train_bpe(bundled[0][:3000], 512, out_dir=str(tmp_path / "tok"))
    assert again.backend_tokenizer.to_str() == small_tok.backend_tokenizer.to_str()
    assert lang.tokenizer_hash(again) == lang.tokenizer_hash(small_tok)
    assert len(small_tok) == 512 and small_tok.eos_token_id == 511
    loaded = lang.load_tokenizer(str(tmp_path / "tok"))
    assert lang.tokenizer_hash(loaded) == lang.tokenizer_hash(small_tok)
    text = "And God said, Let there be light: and there was light. Zebulun's 1611 café!"
    assert loaded(text)["input_ids"] == small_tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text  # byte level: exact, even for unseen chars
    other = train_bpe(bundled[0][:3000], 600)
    assert lang.tokenizer_hash(other) != lang.tokenizer_hash(small_tok)
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["abc"], 100)
    with pytest.raises(ValueError, match="empty corpus"):
        train_bpe([], 512)


# --- chunks --------------------------------------------------------------------------------------


def test_chunk_shapes_order_and_last_chunk_padding(bundled, small_tok):
    lines = bundled[0][:200]
    pad_id = small_tok.pad_token_id
    flat = [i for ln in lines for i in small_tok(ln)["input_ids"]]
    L = 64
    ids, pad = tokenize_and_chunk(lines, small_tok, L, pad_id, batch_lines=37)  # several batches
    n = -(-len(flat) // L)
    assert ids.shape == pad.shape == (n, L) and ids.dtype == torch.long and pad.dtype == torch.bool
    assert ids.flatten()[~pad.flatten()].tolist() == flat
    assert small_tok.decode(ids.flatten()[:len(flat)]) == "".join(lines)
    n_pad = n * L - len(flat)
    assert 0 < n_pad < L
    assert not pad[:-1].any() and pad[-1].tolist() == [False] * (L - n_pad) + [True] * n_pad
    assert (ids[-1, L - n_pad:] == pad_id).all()

    head, head_pad = tokenize_and_chunk(lines, small_tok, L, pad_id, max_chunks=3)
    assert torch.equal(head, ids[:3]) and not head_pad.any()
    exact, exact_pad = tokenize_and_chunk(lines, small_tok, len(flat), pad_id)
    assert exact.shape == (1, len(flat)) and not exact_pad.any()


def test_pad_mask_is_positional_when_eos_is_content(small_tok):
    eos = small_tok.eos_token_id
    lines = ["Amen.", "So be it<|endoftext|>", "and more"]
    ids, pad = tokenize_and_chunk(lines, small_tok, 8, eos, sep_id=eos)
    flat = ids.flatten()[~pad.flatten()].tolist()
    per_line = [small_tok(ln)["input_ids"] for ln in lines]
    assert flat == per_line[0] + [eos] + per_line[1] + [eos] + per_line[2]
    assert flat.count(eos) == 3  # two separators + the special token in the text
    content = ~pad.flatten()
    assert (ids.flatten()[content] == eos).sum() == 3  # EOS as content is not padding
    assert pad.sum() == ids.numel() - len(flat) > 0  # only the chunking tail is padding
    assert (ids.flatten()[pad.flatten()] == eos).all()


def test_chunk_minimum_and_empty(small_tok):
    with pytest.raises(ValueError, match=r"yields 1 chunks of 16 tokens .*; 5 needed"):
        tokenize_and_chunk(["a short line"], small_tok, 16, 0, min_chunks=5)
    ids, pad = tokenize_and_chunk([], small_tok, 16, 0)
    assert ids.shape == pad.shape == (0, 16)
    with pytest.raises(ValueError, match="yields 0 chunks"):
        tokenize_and_chunk([], small_tok, 16, 0, min_chunks=1)
