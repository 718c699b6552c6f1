"""Row sources: every input format read by row range equals the rows read whole, in bounded memory;
indexed training data (.bin/.idx) by document and by fixed-length window; selections; one-line errors."""

import json

import numpy as np
import pytest
import torch

from tinymem_fast.eval.scoring import ScoringInputError
from tinymem_fast.eval.sources import (
    HFDatasetSource,
    IndexedSource,
    JsonlSource,
    NpySource,
    ParquetSource,
    open_source,
    select_rows,
    write_indexed,
)

RANGES = [(0, 1), (0, 7), (3, 11), (10, 23), (22, 23), (5, 5)]


def _blocks_equal(src, want: np.ndarray):
    assert len(src) == want.shape[0]
    for lo, hi in RANGES:
        got = src.read(lo, hi)
        assert got.dtype == torch.int64 and got.shape == (hi - lo, src.width)
        np.testing.assert_array_equal(got.numpy(), want[lo:hi, :src.width])


@pytest.fixture
def rows():
    rng = np.random.default_rng(0)
    return rng.integers(0, 60000, size=(23, 12)).astype(np.int64)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_npy_is_memory_mapped_and_cut_to_width(tmp_path, rows, dtype):
    np.save(tmp_path / "x.npy", rows.astype(dtype))
    src = open_source(str(tmp_path / "x.npy"), 9)
    assert isinstance(src, NpySource) and isinstance(src.arr, np.memmap)
    _blocks_equal(src, rows)


def test_npy_errors(tmp_path, rows):
    np.save(tmp_path / "f.npy", rows.astype(np.float32))
    with pytest.raises(ScoringInputError, match="integer array"):
        open_source(str(tmp_path / "f.npy"), 9)
    np.save(tmp_path / "x.npy", rows)
    with pytest.raises(ScoringInputError, match="longer than the sequences"):
        open_source(str(tmp_path / "x.npy"), 13)
    neg = rows.copy()
    neg[4, 2] = -1
    np.save(tmp_path / "neg.npy", neg)
    src = open_source(str(tmp_path / "neg.npy"), 9)
    with pytest.raises(ScoringInputError, match="row 4 holds a negative"):
        src.read(2, 6)


@pytest.fixture
def docs():
    rng = np.random.default_rng(1)
    return [rng.integers(0, 50000, size=int(n)).tolist() for n in rng.integers(10, 40, size=17)]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_indexed_rows_are_documents(tmp_path, docs, dtype):
    write_indexed(str(tmp_path / "d"), docs, dtype)
    for given in ("d", "d.bin", "d.idx"):
        src = open_source(str(tmp_path / given), 10)
        assert isinstance(src, IndexedSource) and len(src) == len(docs)
    want = np.asarray([d[:10] for d in docs])
    for lo, hi in [(0, 17), (3, 9), (16, 17)]:
        np.testing.assert_array_equal(src.read(lo, hi).numpy(), want[lo:hi])


def test_indexed_fixed_length_windows_follow_the_stream(tmp_path, docs):
    write_indexed(str(tmp_path / "d"), docs, np.uint16)
    stream = np.concatenate([np.asarray(d) for d in docs])
    src = open_source(str(tmp_path / "d"), 8, seq_len=11)
    assert len(src) == stream.size // 11
    want = stream[:len(src) * 11].reshape(-1, 11)[:, :8]
    np.testing.assert_array_equal(src.read(0, len(src)).numpy(), want)
    np.testing.assert_array_equal(src.read(5, 9).numpy(), want[5:9])


def test_indexed_errors(tmp_path, docs):
    write_indexed(str(tmp_path / "d"), docs, np.uint16)
    with pytest.raises(ScoringInputError, match="row 0 has"):
        open_source(str(tmp_path / "d"), 45).read(0, 3)
    with pytest.raises(ScoringInputError, match="shorter than prefix_len"):
        open_source(str(tmp_path / "d"), 8, seq_len=4)
    raw = (tmp_path / "d.bin").read_bytes()
    (tmp_path / "d.bin").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ScoringInputError, match="shorter than its index"):
        open_source(str(tmp_path / "d"), 8)
    (tmp_path / "e.bin").write_bytes(b"")
    (tmp_path / "e.idx").write_bytes(b"NOTANIDX" + bytes(40))
    with pytest.raises(ScoringInputError, match="MMIDIDX"):
        open_source(str(tmp_path / "e.idx"), 8)
    with pytest.raises(ScoringInputError, match=".bin/.idx inputs only"):
        np.save(tmp_path / "x.npy", np.zeros((2, 9), np.int64))
        open_source(str(tmp_path / "x.npy"), 8, seq_len=9)


def test_jsonl_reads_lines_on_demand(tmp_path, rows):
    lines = [json.dumps({"ids": r.tolist()}) for r in rows]
    lines.insert(5, "")  # blank lines are skipped
    (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n")
    src = open_source(str(tmp_path / "x.jsonl"), 9)
    assert isinstance(src, JsonlSource)
    _blocks_equal(src, rows)
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n{oops\n")
    bad = open_source(str(tmp_path / "bad.jsonl"), 9)
    with pytest.raises(ScoringInputError, match="bad.jsonl:2: malformed JSON"):
        bad.validate_all()


def test_jsonl_text_needs_and_uses_a_tokenizer(tmp_path):
    class Chars:  # one token per character
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "abcdefghij"}) + "\n")
    with pytest.raises(ScoringInputError, match="needs a tokenizer"):
        open_source(str(tmp_path / "t.jsonl"), 4).read(0, 1)
    got = open_source(str(tmp_path / "t.jsonl"), 4, tokenizer=Chars()).read(0, 1)
    assert got.tolist() == [[97, 98, 99, 100]]


def test_parquet_reads_across_row_groups(tmp_path, rows):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"input_ids": [r.tolist() for r in rows], "meta": list(range(len(rows)))})
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=4)
    src = open_source(str(tmp_path / "x.parquet"), 9)
    assert isinstance(src, ParquetSource) and len(src.group_rows) == 6
    _blocks_equal(src, rows)
    with pytest.raises(ScoringInputError, match="no column 'ids'"):
        open_source(str(tmp_path / "x.parquet"), 9, column="ids")


def test_hf_dataset_folder(tmp_path, rows):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"tokens": [r.tolist() for r in rows]}).save_to_disk(str(tmp_path / "ds"))
    src = open_source(str(tmp_path / "ds"), 9)
    assert isinstance(src, HFDatasetSource)
    _blocks_equal(src, rows)


def test_selection_by_range_and_index_file(tmp_path, rows):
    np.save(tmp_path / "x.npy", rows)
    base = open_source(str(tmp_path / "x.npy"), 9)
    sub = select_rows(base, rows="3:-2")
    np.testing.assert_array_equal(sub.read(0, len(sub)).numpy(), rows[3:-2, :9])
    (tmp_path / "idx.txt").write_text("# rows to score\n7\n2\n3\n4\n22\n")
    sel = select_rows(base, index_file=str(tmp_path / "idx.txt"))
    np.testing.assert_array_equal(sel.read(0, 5).numpy(), rows[[7, 2, 3, 4, 22], :9])
    np.testing.assert_array_equal(sel.indices, [7, 2, 3, 4, 22])
    np.save(tmp_path / "idx.npy", np.array([1, 1, 0]))
    np.testing.assert_array_equal(select_rows(base, index_file=str(tmp_path / "idx.npy")).read(0, 3).numpy(),
                                  rows[[1, 1, 0], :9])
    for kw, msg in [(dict(rows="5"), "START:END"), (dict(rows="30:40"), "selects nothing"),
                    (dict(rows="1:2", index_file="x"), "not both")]:
        with pytest.raises(ScoringInputError, match=msg):
            select_rows(base, **kw)
    (tmp_path / "far.txt").write_text("23\n")
    with pytest.raises(ScoringInputError, match="row index 23 is outside"):
        select_rows(base, index_file=str(tmp_path / "far.txt"))


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ScoringInputError, match="unknown input format '.csv'"):
        open_source(str(tmp_path / "x.csv"), 2)
    with pytest.raises(FileNotFoundError):
        open_source(str(tmp_path / "nope.npy"), 2)
