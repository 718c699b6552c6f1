"""Rows of token ids read on demand, so that an input of any size is scored in bounded memory.

A :class:`RowSource` knows how many rows it has and returns any contiguous block of them as an int64
``[rows, width]`` tensor cut to the scoring window. :func:`open_source` picks the reader from the path:

* ``.npy``: memory-mapped (``np.load(mmap_mode="r")``); only the rows asked for are read and converted.
* a GPT-NeoX / Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``, given as either file or the
  prefix): memory-mapped; a row is a document, or with ``seq_len`` a fixed-length sequence cut from the
  documents laid end to end (row ``i`` = tokens ``[i * seq_len, (i + 1) * seq_len)`` of the stream), the
  way pre-shuffled training data such as Pythia's is batched.
* ``.jsonl``: one pass records where each line starts (8 bytes a row); rows are parsed when read.
* ``.parquet`` and a Hugging Face ``datasets`` folder (``save_to_disk``): a column of token ids
  (``input_ids``, ``ids`` or ``tokens``, or the one given) or of text, tokenized when read.
* ``.pt``: loaded whole (``weights_only=True``), for small inputs.

:func:`select_rows` narrows any source to a row range or to the rows an index file lists.
"""

from __future__ import annotations

import json
import mmap
import os
import struct

import numpy as np
import torch

from ..integrations.loading import first_line
from .scoring import ScoringInputError

ID_COLUMNS = ("input_ids", "ids", "tokens", "token_ids")


class RowSource:
    """``len(src)`` rows; ``src.read(lo, hi)`` -> int64 ``[hi - lo, width]``, each row's first ``width``
    tokens. ``describe()`` names the input for summaries; ``fingerprint()`` changes whenever the rows do
    (size and modification time of the files read), so a resumed run can refuse other input."""

    width: int
    path: str

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, lo: int, hi: int) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return os.path.abspath(self.path)

    def files(self) -> list[str]:
        return [self.path]

    def fingerprint(self) -> dict:
        out = {"rows": len(self), "width": self.width}
        for f in self.files():
            st = os.stat(f)
            out[os.path.abspath(f)] = [st.st_size, st.st_mtime_ns]
        return out

    def row_numbers(self, lo: int, hi: int):
        """The input's own numbers of rows ``[lo, hi)`` (a selection maps them back)."""
        return range(lo, hi)

    def _check_range(self, lo: int, hi: int) -> None:
        if not 0 <= lo <= hi <= len(self):
            raise IndexError(f"rows [{lo}, {hi}) outside [0, {len(self)})")


def _too_short(path: str, row, have: int, width: int) -> ScoringInputError:
    return ScoringInputError(f"{path}: row {row} has {have} tokens, fewer than prefix_len + suffix_len = "
                             f"{width}")


def _release(arr) -> None:
    """Drop this process's mapping of a memory-mapped file's pages (they stay in the page cache): read
    once and copied, they would otherwise count towards the resident size until the whole input had been
    mapped in, growing with the number of rows."""
    mm = getattr(arr, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


def _check_ids(path: str, block: np.ndarray, lo: int) -> None:
    if block.dtype.kind == "i" and block.size and block.min() < 0:
        r = int(np.argwhere(block < 0)[0][0])
        raise ScoringInputError(f"{path}: row {lo + r} holds a negative token id")


def _matrix(path: str, a, width: int = 0):
    """``a`` (array or tensor of token ids) as ``[N, L]``: one row when 1-D; refused when empty, of
    another rank, or narrower than ``width``."""
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ScoringInputError(f"{path}: expected a non-empty [N, L] array of token ids, "
                                f"got shape {tuple(a.shape)}")
    if a.shape[1] < width:
        raise ScoringInputError(f"prefix_len + suffix_len = {width} is longer than the sequences "
                                f"({a.shape[1]} tokens)")
    return a


def read_npy(path: str, mmap: bool = False) -> np.ndarray:
    """An integer ``[N, L]`` array from ``.npy`` (never unpickled), memory-mapped when asked."""
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ScoringInputError(f"{path}: not a readable .npy array ({first_line(exc)})") from None
    if arr.dtype.kind not in "iu":
        raise ScoringInputError(f"{path}: token ids must be an integer array, got dtype {arr.dtype}")
    return _matrix(path, arr)


def read_pt(path: str) -> torch.Tensor:
    """An integer ``[N, L]`` tensor from ``.pt``, loaded with ``weights_only=True``."""
    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean the same to the user
        raise ScoringInputError(f"{path}: cannot load a tensor with weights_only=True "
                                f"({first_line(exc)})") from None
    if not isinstance(t, torch.Tensor):
        raise ScoringInputError(f"{path}: expected a tensor of token ids, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ScoringInputError(f"{path}: token ids must be an integer tensor, got {t.dtype}")
    return _matrix(path, t)


class TensorSource(RowSource):
    """Rows already in memory (``.pt`` files, tensors built by callers)."""

    def __init__(self, ids: torch.Tensor, width: int, path: str = "<memory>"):
        ids = _matrix(path, ids, width)
        self.ids, self.width, self.path = ids[:, :width].long(), width, path

    def __len__(self) -> int:
        return self.ids.shape[0]

    def read(self, lo: int, hi: int) -> torch.Tensor:
        self._check_range(lo, hi)
        return self.ids[lo:hi]

    def files(self) -> list[str]:
        return [self.path] if os.path.isfile(self.path) else []


class NpySource(RowSource):
    def __init__(self, path: str, width: int):
        self.arr, self.width, self.path = _matrix(path, read_npy(path, mmap=True), width), width, path

    def __len__(self) -> int:
        return self.arr.shape[0]

    def read(self, lo: int, hi: int) -> torch.Tensor:
        self._check_range(lo, hi)
        block = np.array(self.arr[lo:hi, :self.width], dtype=np.int64)
        _release(self.arr)
        _check_ids(self.path, block, lo)
        return torch.from_numpy(block)


# --- GPT-NeoX / Megatron indexed datasets ------------------------------------------------------------

IDX_MAGIC = b"MMIDIDX\x00\x00"
# the integer codes of the format (codes 6 and 7 are floats, never token ids)
IDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}


def indexed_prefix(path: str) -> str | None:
    """``PREFIX`` when ``path`` is ``PREFIX``, ``PREFIX.bin`` or ``PREFIX.idx`` of an indexed dataset."""
    base = path[:-4] if path.endswith((".bin", ".idx")) else path
    return base if os.path.isfile(base + ".idx") and os.path.isfile(base + ".bin") else None


class IndexedSource(RowSource):
    """A GPT-NeoX/Megatron ``.bin``/``.idx`` pair: the index holds, after a 9-byte magic, the version
    (uint64, 1), the token dtype code (uint8), the number of sequences and of document boundaries (uint64
    each), then the sequence lengths (int32), their byte offsets into ``.bin`` (int64) and the document
    boundaries (int64). Rows are documents, or fixed-length windows of the concatenated stream
    (``seq_len``)."""

    def __init__(self, prefix: str, width: int, seq_len: int | None = None):
        self.path, self.width, self.seq_len = prefix, width, seq_len
        idx = prefix + ".idx"
        with open(idx, "rb") as f:
            head = f.read(len(IDX_MAGIC) + 8 + 1 + 8 + 8)
        if len(head) < 34 or head[:9] != IDX_MAGIC:
            raise ScoringInputError(f"{idx}: not a GPT-NeoX/Megatron index (no MMIDIDX header)")
        version, code, n, n_docs = struct.unpack("<QBQQ", head[9:34])
        if version != 1:
            raise ScoringInputError(f"{idx}: index version {version}; only version 1 is known")
        if code not in IDX_DTYPES:
            raise ScoringInputError(f"{idx}: token dtype code {code} is not an integer type")
        self.dtype = np.dtype(IDX_DTYPES[code])
        need = 34 + 4 * n + 8 * n + 8 * n_docs
        if os.path.getsize(idx) < need:
            raise ScoringInputError(f"{idx}: truncated ({os.path.getsize(idx)} bytes, the header promises "
                                    f"{need})")
        self.sizes = np.memmap(idx, dtype=np.int32, mode="r", offset=34, shape=(n,))
        self.pointers = np.memmap(idx, dtype=np.int64, mode="r", offset=34 + 4 * n, shape=(n,))
        bin_size = os.path.getsize(prefix + ".bin")
        self.tokens = np.memmap(prefix + ".bin", dtype=self.dtype, mode="r") if bin_size else \
            np.zeros(0, dtype=self.dtype)
        if n and int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize > bin_size:
            raise ScoringInputError(f"{prefix}.bin: shorter than its index says ({bin_size} bytes)")
        if seq_len is not None:
            if seq_len < width:
                raise ScoringInputError(f"--seq-len {seq_len} is shorter than prefix_len + suffix_len = "
                                        f"{width}")
            # documents are laid out back to back, so the stream is the .bin file itself
            self.n_rows = self.tokens.shape[0] // seq_len
            if n and int(self.pointers[0]) != 0:
                raise ScoringInputError(f"{prefix}: documents do not start at byte 0 of the .bin file; "
                                        "fixed-length rows need the plain concatenation")
        else:
            self.n_rows = n
        if self.n_rows == 0:
            raise ScoringInputError(f"{prefix}: empty input (no sequences)")

    def __len__(self) -> int:
        return self.n_rows

    def files(self) -> list[str]:
        return [self.path + ".idx", self.path + ".bin"]

    def describe(self) -> str:
        how = f", rows of {self.seq_len} tokens" if self.seq_len else ", one row per document"
        return os.path.abspath(self.path) + how

    def read(self, lo: int, hi: int) -> torch.Tensor:
        self._check_range(lo, hi)
        w = self.width
        if self.seq_len is not None:
            block = self.tokens[lo * self.seq_len:hi * self.seq_len].reshape(hi - lo, self.seq_len)[:, :w]
        else:
            sizes = np.asarray(self.sizes[lo:hi])
            short = np.flatnonzero(sizes < w)
            if short.size:
                raise _too_short(self.path, lo + int(short[0]), int(sizes[short[0]]), w)
            starts = np.asarray(self.pointers[lo:hi]) // self.dtype.itemsize
            block = self.tokens[starts[:, None] + np.arange(w)[None, :]]
        block = np.array(block, dtype=np.int64)
        _release(self.tokens)
        _check_ids(self.path, block, lo)
        return torch.from_numpy(block)


def write_indexed(prefix: str, docs, dtype=np.uint16) -> None:
    """Write documents (sequences of token ids) as a ``.bin``/``.idx`` pair in the format above; for
    tests, benchmarks and users preparing their own training data."""
    code = {np.dtype(v): k for k, v in IDX_DTYPES.items()}[np.dtype(dtype)]
    sizes, pointers, offset = [], [], 0
    with open(prefix + ".bin", "wb") as f:
        for d in docs:
            a = np.asarray(d, dtype=dtype)
            f.write(a.tobytes())
            sizes.append(a.size)
            pointers.append(offset)
            offset += a.nbytes
    with open(prefix + ".idx", "wb") as f:
        f.write(IDX_MAGIC)
        f.write(struct.pack("<QBQQ", 1, code, len(sizes), len(sizes) + 1))
        f.write(np.asarray(sizes, dtype=np.int32).tobytes())
        f.write(np.asarray(pointers, dtype=np.int64).tobytes())
        f.write(np.arange(len(sizes) + 1, dtype=np.int64).tobytes())


# --- JSON Lines ----------------------------------------------------------------------------------------


def _line_ids(obj, where: str, tokenizer) -> list[int]:
    if not isinstance(obj, dict) or not (("ids" in obj) ^ ("text" in obj)):
        raise ScoringInputError(f"{where}: expected an object with exactly one of \"ids\" or \"text\"")
    if "ids" in obj:
        seq = obj["ids"]
        if not isinstance(seq, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in seq):
            raise ScoringInputError(f"{where}: \"ids\" must be a list of integers")
        bad = next((t for t in seq if not 0 <= t < 2**63), None)
        if bad is not None:
            raise ScoringInputError(f"{where}: token id {bad} is not a vocabulary index (0 <= id < 2**63)")
        return seq
    if not isinstance(obj["text"], str):
        raise ScoringInputError(f"{where}: \"text\" must be a string")
    if tokenizer is None:
        raise ScoringInputError(f"{where}: a \"text\" line needs a tokenizer (--tokenizer DIR)")
    # no BOS or other special tokens: the ids are the text's own tokens (SPEC 4.4)
    return list(tokenizer(obj["text"], add_special_tokens=False)["input_ids"])


def parse_line(raw: bytes, where: str, tokenizer) -> list[int]:
    """The token ids of one JSON Lines line (``where`` = ``path:lineno`` for messages)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScoringInputError(f"{where}: not UTF-8 text (byte {exc.start})") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ScoringInputError(f"{where}: malformed JSON ({exc.msg})") from None
    return _line_ids(obj, where, tokenizer)


class JsonlSource(RowSource):
    """One ``{"ids": [...]}`` or ``{"text": "..."}`` object per line (blank lines skipped). The first pass
    checks every line is UTF-8 JSON and records where it starts; rows are parsed when read."""

    def __init__(self, path: str, width: int, tokenizer=None):
        self.path, self.width, self.tokenizer = path, width, tokenizer
        starts, lines = [], []
        with open(path, "rb") as f:
            pos = 0
            for lineno, raw in enumerate(f, 1):
                if raw.strip():
                    try:
                        raw.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise ScoringInputError(f"{path}:{lineno}: not UTF-8 text (byte {exc.start})") \
                            from None
                    starts.append(pos)
                    lines.append(lineno)
                pos += len(raw)
        if not starts:
            raise ScoringInputError(f"{path}: empty input (no sequences)")
        self.starts = np.asarray(starts, dtype=np.int64)
        self.lines = np.asarray(lines, dtype=np.int64)

    def __len__(self) -> int:
        return self.starts.shape[0]

    def read(self, lo: int, hi: int) -> torch.Tensor:
        self._check_range(lo, hi)
        out = np.empty((hi - lo, self.width), dtype=np.int64)
        with open(self.path, "rb") as f:
            if hi > lo:
                f.seek(int(self.starts[lo]))
            r = lo
            while r < hi:
                raw = f.readline()
                if not raw.strip():
                    continue
                where = f"{self.path}:{int(self.lines[r])}"
                seq = parse_line(raw, where, self.tokenizer)
                if len(seq) < self.width:
                    raise ScoringInputError(f"{where}: sequence {r} has {len(seq)} tokens, fewer than "
                                            f"prefix_len + suffix_len = {self.width}")
                out[r - lo] = seq[:self.width]
                r += 1
        return torch.from_numpy(out)

    def validate_all(self, chunk: int = 4096) -> None:
        """Parse every row once (small inputs: report any malformed line before a model is loaded)."""
        for lo in range(0, len(self), chunk):
            self.read(lo, min(len(self), lo + chunk))


# --- columnar: Parquet and Hugging Face datasets -------------------------------------------------------


def _pick_column(names: list[str], column: str | None, where: str) -> tuple[str, bool]:
    """(column, is_text)."""
    if column:
        if column not in names:
            raise ScoringInputError(f"{where}: no column {column!r} (columns: {', '.join(names)})")
        return column, column == "text"
    for c in ID_COLUMNS:
        if c in names:
            return c, False
    if "text" in names:
        return "text", True
    raise ScoringInputError(f"{where}: no token-id column ({', '.join(ID_COLUMNS)}) and no \"text\" column "
                            f"(columns: {', '.join(names)}); name one with --column")


def _rows_to_matrix(values, is_text: bool, tokenizer, where: str, lo: int, width: int) -> torch.Tensor:
    out = np.empty((len(values), width), dtype=np.int64)
    for i, v in enumerate(values):
        if is_text:
            if tokenizer is None:
                raise ScoringInputError(f"{where}: a text column needs a tokenizer (--tokenizer DIR)")
            v = tokenizer(v, add_special_tokens=False)["input_ids"]
        if v is None or len(v) < width:
            raise _too_short(where, lo + i, 0 if v is None else len(v), width)
        out[i] = np.asarray(v[:width], dtype=np.int64)
    if out.size and out.min() < 0:
        raise ScoringInputError(f"{where}: negative token id in rows [{lo}, {lo + len(values)})")
    return torch.from_numpy(out)


class ParquetSource(RowSource):
    """Row groups are read only when a block needs them (the last one is kept for the next block)."""

    def __init__(self, path: str, width: int, tokenizer=None, column: str | None = None):
        from ..common.optional import require

        pq = require("pyarrow.parquet", f"the Parquet input {path!r}")
        self.path, self.width, self.tokenizer = path, width, tokenizer
        try:
            self.file = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises its own error types for every malformation
            raise ScoringInputError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
        self.column, self.is_text = _pick_column(self.file.schema_arrow.names, column, path)
        md = self.file.metadata
        self.group_rows = np.asarray([md.row_group(g).num_rows for g in range(md.num_row_groups)], np.int64)
        self.group_start = np.concatenate([[0], np.cumsum(self.group_rows)])
        if self.group_start[-1] == 0:
            raise ScoringInputError(f"{path}: empty input (no sequences)")
        self._cached: tuple[int, list] | None = None

    def __len__(self) -> int:
        return int(self.group_start[-1])

    def _group(self, g: int) -> list:
        if self._cached is None or self._cached[0] != g:
            self._cached = (g, self.file.read_row_group(g, columns=[self.column]).column(0).to_pylist())
        return self._cached[1]

    def read(self, lo: int, hi: int) -> torch.Tensor:
        self._check_range(lo, hi)
        values = []
        g = int(np.searchsorted(self.group_start, lo, side="right") - 1)
        r = lo
        while r < hi:
            start = int(self.group_start[g])
            rows = self._group(g)
            take = min(hi, start + len(rows)) - r
            values.extend(rows[r - start:r - start + take])
            r += take
            g += 1
        return _rows_to_matrix(values, self.is_text, self.tokenizer, self.path, lo, self.width)


class HFDatasetSource(RowSource):
    """A folder written by ``datasets.Dataset.save_to_disk`` (memory-mapped Arrow; a ``DatasetDict``
    needs ``split``)."""

    def __init__(self, path: str, width: int, tokenizer=None, column: str | None = None,
                 split: str | None = None):
        from ..common.optional import require

        datasets = require("datasets", f"the Hugging Face dataset folder {path!r}")
        self.path, self.width, self.tokenizer = path, width, tokenizer
        try:
            ds = datasets.load_from_disk(path)
        except Exception as exc:  # datasets' loaders raise many types
            raise ScoringInputError(f"{path}: not a Hugging Face dataset folder ({first_line(exc)})") \
                from None
        if isinstance(ds, datasets.DatasetDict):
            if split is None and len(ds) == 1:
                split = next(iter(ds))
            if split not in ds:
                raise ScoringInputError(f"{path}: a dataset with splits {', '.join(ds)}: choose one with "
                                        "--split")
            ds = ds[split]
        self.ds = ds
        self.column, self.is_text = _pick_column(list(ds.column_names), column, path)
        if len(ds) == 0:
            raise ScoringInputError(f"{path}: empty input (no sequences)")

    def __len__(self) -> int:
        return len(self.ds)

    def files(self) -> list[str]:
        return [os.path.join(self.path, f) for f in sorted(os.listdir(self.path))
                if os.path.isfile(os.path.join(self.path, f))]

    def read(self, lo: int, hi: int) -> torch.Tensor:
        self._check_range(lo, hi)
        values = self.ds[lo:hi][self.column]
        return _rows_to_matrix(values, self.is_text, self.tokenizer, self.path, lo, self.width)


# --- selection -----------------------------------------------------------------------------------------


class SelectedSource(RowSource):
    """The rows of ``base`` at ``indices`` (in that order); row ``i`` here is row ``indices[i]`` there."""

    def __init__(self, base: RowSource, indices: np.ndarray, how: str):
        self.base, self.indices, self.how = base, indices, how
        self.width, self.path = base.width, base.path

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def files(self) -> list[str]:
        return self.base.files()

    def describe(self) -> str:
        return f"{self.base.describe()} [{self.how}]"

    def fingerprint(self) -> dict:
        return {**self.base.fingerprint(), "selection": self.how, "rows": len(self)}

    def row_numbers(self, lo: int, hi: int):
        return self.indices[lo:hi].copy()

    def read(self, lo: int, hi: int) -> torch.Tensor:
        self._check_range(lo, hi)
        idx = self.indices[lo:hi]
        if idx.size == 0:
            return torch.zeros(0, self.width, dtype=torch.long)
        # contiguous runs are read as blocks (a range selection is one run)
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        parts = [self.base.read(int(run[0]), int(run[-1]) + 1) for run in np.split(idx, breaks)]
        return torch.cat(parts)


def parse_rows(text: str, n: int) -> tuple[int, int]:
    """``A:B`` (either end may be empty; negative counts from the end) -> a range within ``[0, n)``."""
    if ":" not in text:
        raise ScoringInputError(f"--rows expects START:END (e.g. 0:100000), got {text!r}")
    a, b = text.split(":", 1)
    try:
        lo = int(a) if a.strip() else 0
        hi = int(b) if b.strip() else n
    except ValueError:
        raise ScoringInputError(f"--rows expects whole numbers, got {text!r}") from None
    lo, hi = (lo + n if lo < 0 else lo), (hi + n if hi < 0 else hi)
    if not 0 <= lo < hi <= n:
        raise ScoringInputError(f"--rows {text} selects nothing of the input's {n} rows")
    return lo, hi


def read_index_file(path: str, n: int) -> np.ndarray:
    """Row indices from ``.npy`` (integers) or text (one integer per line, ``#`` comments allowed)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"row index file {path!r} does not exist")
    if path.endswith(".npy"):
        try:
            idx = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ScoringInputError(f"{path}: not a readable .npy array ({first_line(exc)})") from None
        if idx.dtype.kind not in "iu":
            raise ScoringInputError(f"{path}: row indices must be integers, got dtype {idx.dtype}")
        idx = idx.reshape(-1).astype(np.int64)
    else:
        vals = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                try:
                    vals.append(int(line))
                except ValueError:
                    raise ScoringInputError(f"{path}:{lineno}: expected a row index, got {line!r}") from None
        idx = np.asarray(vals, dtype=np.int64)
    if idx.size == 0:
        raise ScoringInputError(f"{path}: no row indices")
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.size:
        raise ScoringInputError(f"{path}: row index {int(bad[0])} is outside the input's {n} rows")
    return idx


def select_rows(src: RowSource, rows: str | None = None, index_file: str | None = None) -> RowSource:
    if rows and index_file:
        raise ScoringInputError("give --rows or --row-index, not both")
    if rows:
        lo, hi = parse_rows(rows, len(src))
        return src if (lo, hi) == (0, len(src)) else SelectedSource(src, np.arange(lo, hi), f"rows {lo}:{hi}")
    if index_file:
        return SelectedSource(src, read_index_file(index_file, len(src)), f"rows of {index_file}")
    return src


def open_source(path: str, width: int, *, tokenizer=None, seq_len: int | None = None,
                column: str | None = None, split: str | None = None) -> RowSource:
    """The reader for ``path`` (see the module docstring), each row cut to ``width`` tokens."""
    prefix = indexed_prefix(path)
    if prefix is not None:
        return IndexedSource(prefix, width, seq_len)
    if seq_len is not None:
        raise ScoringInputError("--seq-len applies to GPT-NeoX/Megatron .bin/.idx inputs only")
    if os.path.isdir(path):
        return HFDatasetSource(path, width, tokenizer, column, split)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json"):
        return JsonlSource(path, width, tokenizer)
    if ext == ".npy":
        return NpySource(path, width)
    if ext == ".parquet":
        return ParquetSource(path, width, tokenizer, column)
    if ext == ".pt":
        return TensorSource(read_pt(path), width, path)
    raise ScoringInputError(f"{path}: unknown input format {ext!r}; use .jsonl, .npy, .parquet, .pt, a "
                            ".bin/.idx pair or a Hugging Face dataset folder")
