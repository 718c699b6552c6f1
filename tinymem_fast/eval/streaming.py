"""Scoring written as it goes: the rows are cut into shards of fixed size, each shard's results are written
atomically the moment it is done, and a run that is killed resumes where it stopped with no row lost or
scored twice. Memory holds one shard (plus the next one, read ahead), whatever the number of rows.

Layout of an output folder while a run is going::

    OUT/manifest.json              what is being scored (model, input fingerprint, window, mode, shard size)
    OUT/shards/score-00000012.jsonl   rows [12 * S, 13 * S), one JSON object per row
    OUT/shards/score-00000012.json    that shard's sums (written first; the .jsonl marks it done)

When every shard is done, the shards are concatenated in order into ``OUT/score.jsonl`` (``extract.jsonl``
for ``tinymem extract``), the sums into ``OUT/summary.json``, and the shard folder is removed. Shards are the
unit of work for ``torchrun`` too: each rank takes every ``world_size``-th shard still missing and writes it
itself (nothing is gathered), so a run may even resume with another number of ranks. A shard's rows are
scored in the same batches whoever scores it, so the merged file of a resumed run is byte-identical to an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..common import atomic
from .scoring import ScoringInputError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
SHARDS = "shards"
# rows per shard: what a kill can cost, and the unit of work per rank; small enough that a resumed run
# loses little, large enough that the per-shard writes are noise next to the scoring
DEFAULT_SHARD_ROWS = 4096


FORMATS = ("jsonl", "parquet")


@dataclass(frozen=True)
class ShardPlan:
    n: int
    rows: int  # per shard
    fmt: str = "jsonl"  # of the rows: JSON Lines, or Parquet for big runs (columnar, typed, compressed)

    @property
    def count(self) -> int:
        return -(-self.n // self.rows)

    def bounds(self, j: int) -> tuple[int, int]:
        return j * self.rows, min(self.n, (j + 1) * self.rows)


def shard_path(out: str, command: str, j: int, ext: str = "jsonl") -> str:
    return os.path.join(out, SHARDS, f"{command}-{j:08d}.{ext}")


def done_shards(out: str, command: str, plan: ShardPlan) -> set[int]:
    folder = os.path.join(out, SHARDS)
    if not os.path.isdir(folder):
        return set()
    names = set(os.listdir(folder))
    return {j for j in range(plan.count)
            if f"{command}-{j:08d}.{plan.fmt}" in names and f"{command}-{j:08d}.json" in names}


def check_resume(out: str, manifest: dict, resume: bool) -> dict | None:
    """With ``resume``: refuse in one line a folder that holds a run of other settings or input, and
    return the summary of a run of these that already finished (None when there is work). Read-only, so
    every ``torchrun`` rank can check before any starts."""
    path = os.path.join(out, MANIFEST)
    if not resume or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError) as exc:
        raise ScoringInputError(f"{path} is unreadable ({exc}): start over without --resume") from None
    changed = [k for k in sorted(set(old) | set(manifest)) if old.get(k) != manifest.get(k)]
    if changed:
        what = ", ".join(f"{k} {old.get(k)!r} -> {manifest.get(k)!r}" for k in changed[:3])
        raise ScoringInputError(f"{out} holds a run of other settings or input ({what}): resuming would mix "
                                "the two; start over without --resume, or choose another --out")
    summary = os.path.join(out, "summary.json")
    if os.path.exists(summary) and not os.path.isdir(os.path.join(out, SHARDS)):
        with open(summary) as f:
            return json.load(f)
    return None


def claim(out: str, manifest: dict, resume: bool) -> None:
    """Make ``out`` this run's folder (one process does this, after :func:`check_resume` passed): with
    ``resume`` the finished shards stay (half-written temporary files go); without, earlier shards and
    results are removed."""
    shards = os.path.join(out, SHARDS)
    if resume and os.path.exists(os.path.join(out, MANIFEST)):
        if os.path.isdir(shards):
            for name in os.listdir(shards):
                if name.startswith(".tmp-"):
                    os.remove(os.path.join(shards, name))
        os.makedirs(shards, exist_ok=True)
        return
    shutil.rmtree(shards, ignore_errors=True)
    for name in (f"{manifest['command']}.jsonl", "summary.json", "memorized_index.txt"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    shutil.rmtree(os.path.join(out, f"{manifest['command']}.parquet"), ignore_errors=True)
    os.makedirs(shards, exist_ok=True)
    atomic.write_json(os.path.join(out, MANIFEST), manifest)


class AutoBatch:
    """The batch size of a run: a number, or ``auto`` -- 64 on a CPU (where larger batches gain nothing);
    on a GPU start at 1024 and halve whenever a shard runs out of memory, keeping the size that fit for
    the shards after it. Results do not depend on the batch size, so a resumed run may use another."""

    CPU, GPU_START = 64, 1024

    def __init__(self, requested: int | str, device):
        self.auto = requested == "auto"
        on_gpu = torch.device(device).type == "cuda"
        self.size = (self.GPU_START if on_gpu else self.CPU) if self.auto else int(requested)

    def run(self, fn):
        """``fn(batch_size)``, retried at half the size on out-of-memory (``auto`` only)."""
        while True:
            try:
                return fn(self.size)
            except torch.cuda.OutOfMemoryError:
                if not self.auto or self.size == 1:
                    raise
                self.size //= 2
                torch.cuda.empty_cache()
                log.info("out of memory: batch size %d from now on", self.size)


# --- one shard ---------------------------------------------------------------------------------------


def shard_stats(cols: dict[str, torch.Tensor], index: torch.Tensor) -> dict:
    """The sums a summary is made of, so that merging never rereads the rows."""
    s = {"n": int(cols["exact"].shape[0]), "n_exact": int(cols["exact"].sum())}
    for name, key in (("fractional", "sum_fractional"), ("fractional_tf", "sum_fractional_tf"),
                      ("nll", "sum_nll")):
        if name in cols:
            s[key] = float(cols[name].double().sum())
    if "verified" in cols:
        s["n_verified"] = int(cols["verified"].sum())
        s["disagree"] = index[cols["disagree"].bool()].tolist()
    s["exact_rows"] = index[cols["exact"].bool()].tolist()
    return s


def write_shard(out: str, command: str, j: int, cols: dict[str, torch.Tensor], index: torch.Tensor,
                fmt: str = "jsonl") -> dict:
    """Rows as JSON objects ``{"index": input row, column: value, ...}`` (or a Parquet table of the same
    columns); the sums first, the rows last, so a shard's rows on disk always have their sums beside it."""
    names = list(cols)
    lists = {c: cols[c].tolist() for c in names}
    idx = index.tolist()
    stats = shard_stats(cols, index)
    atomic.write_json(shard_path(out, command, j, "json"), stats)
    if fmt == "parquet":
        _write_parquet(shard_path(out, command, j, "parquet"), {"index": idx, **lists})
        return stats

    def rows(f):
        for i, r in enumerate(idx):
            rec = {"index": r}
            for c in names:
                rec[c] = lists[c][i]
            f.write(json.dumps(rec) + "\n")

    atomic.write_text(shard_path(out, command, j), rows)
    return stats


def _write_parquet(path: str, columns: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path))
    pq.write_table(pa.table(columns), tmp)
    os.replace(tmp, path)


# --- all shards --------------------------------------------------------------------------------------


def score_shards(source, todo: list[int], plan: ShardPlan, score, out: str, command: str, *,
                 progress: bool = False, on_shard=None) -> None:
    """Score and write shards ``todo`` of ``source`` in order, reading the next one in a background thread
    while the current one is scored (the device never waits on the input). ``score(ids) -> columns``;
    ``on_shard(j, lo, hi, seconds)`` is told after each one."""
    if not todo:
        return
    from tqdm.auto import tqdm

    total = sum(plan.bounds(j)[1] - plan.bounds(j)[0] for j in todo)
    bar = tqdm(total=total, unit="row", desc=command, disable=not progress, dynamic_ncols=True, smoothing=0.1)

    def load(j):
        lo, hi = plan.bounds(j)
        return source.read(lo, hi)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinymem-prefetch") as pool:
        nxt = pool.submit(load, todo[0])
        for i, j in enumerate(todo):
            ids = nxt.result()
            if i + 1 < len(todo):
                nxt = pool.submit(load, todo[i + 1])
            lo, hi = plan.bounds(j)
            t = time.perf_counter()
            cols = score(ids)
            index = torch.as_tensor(source.row_numbers(lo, hi))
            write_shard(out, command, j, cols, index, plan.fmt)
            if on_shard is not None:
                on_shard(j, lo, hi, time.perf_counter() - t)
            bar.update(hi - lo)
    bar.close()


def merge(out: str, command: str, plan: ShardPlan, summary: dict) -> dict:
    """Concatenate the shards into ``OUT/<command>.jsonl`` (a streamed byte copy), add up their sums into
    ``summary`` and write ``OUT/summary.json``; then remove the shards."""
    missing = sorted(set(range(plan.count)) - done_shards(out, command, plan))
    if missing:
        raise RuntimeError(f"cannot merge {out}: shards {missing[:5]} are not done")
    totals: dict = {"n": 0, "n_exact": 0}
    disagree: list[int] = []
    exact_rows: list[int] = []
    for j in range(plan.count):
        with open(shard_path(out, command, j, "json")) as f:
            s = json.load(f)
        disagree += s.pop("disagree", [])
        exact_rows += s.pop("exact_rows", [])
        for k, v in s.items():
            totals[k] = totals.get(k, 0) + v

    if plan.fmt == "parquet":
        # the shards are the result: a Parquet dataset folder, one file per shard in row order
        with atomic.folder(os.path.join(out, f"{command}.parquet")) as tmp:
            for j in range(plan.count):
                os.replace(shard_path(out, command, j, "parquet"), os.path.join(tmp, f"part-{j:08d}.parquet"))
    else:
        def concat(f):
            for j in range(plan.count):
                with open(shard_path(out, command, j), encoding="utf-8") as src:
                    shutil.copyfileobj(src, f, 1 << 20)

        atomic.write_text(os.path.join(out, f"{command}.jsonl"), concat)
    n = totals["n"]
    summary = {**summary, "n": n, "n_exact": totals["n_exact"],
               "pct_exact": 100.0 * totals["n_exact"] / max(1, n)}
    for key, name in (("sum_fractional", "mean_fractional"),
                      ("sum_fractional_tf", "mean_fractional_teacher_forced"), ("sum_nll", "mean_nll")):
        if key in totals:
            summary[name] = totals[key] / max(1, n)
    if "n_verified" in totals:
        summary.update(n_verified=totals["n_verified"], n_disagree=len(disagree), disagree=disagree)
    # the input rows memorized exactly, one per line: a --row-index for the next command (unlearning them,
    # scoring them under other checkpoints)
    atomic.write_text(os.path.join(out, "memorized_index.txt"),
                      lambda f: f.writelines(f"{r}\n" for r in exact_rows))
    atomic.write_json(os.path.join(out, "summary.json"), summary)
    shutil.rmtree(os.path.join(out, SHARDS), ignore_errors=True)
    return summary
