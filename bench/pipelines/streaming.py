"""Scoring at scale on a CPU: rows/s, peak memory against the number of rows, the cost of streaming and
resuming, and byte-identical results after kills.

A tiny random GPT-NeoX (1 layer, d=32, vocabulary 512) scores 64-token rows (32 + 32) with
``tinymem score --mode exact --exact-only``, from a memory-mapped ``.npy`` and from a GPT-NeoX
``.bin``/``.idx`` pair (``--seq-len 64``), each run in a fresh process whose peak RSS is read from
``getrusage``.

* **memory**: peak RSS at 100k and 1M rows (flat in N: the target is within 100 MB).
* **overhead**: the streamed command (``tinymem_fast.cli.main``) against the same rows scored in memory by
  the same engine (the whole array loaded, ``score_exact`` over it, every column kept, one JSON Lines
  write at the end), both loading the model, in one process after a warm-up run of each, alternating;
  ratio = in-memory time / streamed time (target >= 0.95). Interpreter start-up and imports are left out:
  they are the same work for both, and their noise was larger than the difference measured.
* **resume**: the run killed 5 times at random moments and resumed, its merged file compared byte for
  byte with an uninterrupted run's.

``--smoke``: 20k / 100k rows instead of 100k / 1M.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.harness import HERE, Row

SEQ = 64
P = K = 32
CACHE = os.path.join(HERE, ".cache", "streaming")


def _model(path: str) -> None:
    if os.path.exists(os.path.join(path, "config.json")):
        return
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, bos_token_id=None,
                        eos_token_id=None)
    GPTNeoXForCausalLM(cfg).save_pretrained(path)


def _inputs(n: int) -> tuple[str, str]:
    from tinymem_fast.eval.sources import write_indexed

    npy, prefix = os.path.join(CACHE, f"rows-{n}.npy"), os.path.join(CACHE, f"docs-{n}")
    if not os.path.exists(npy):
        rng = np.random.default_rng(n)
        arr = np.lib.format.open_memmap(npy + ".tmp.npy", mode="w+", dtype=np.uint16, shape=(n, SEQ))
        for lo in range(0, n, 100_000):
            hi = min(n, lo + 100_000)
            arr[lo:hi] = rng.integers(0, 512, size=(hi - lo, SEQ), dtype=np.uint16)
        arr.flush()
        del arr
        os.replace(npy + ".tmp.npy", npy)
    if not os.path.exists(prefix + ".idx"):
        rows = np.load(npy, mmap_mode="r")
        # documents of uneven length, laid end to end: --seq-len cuts the stream back into rows
        cuts = np.sort(np.random.default_rng(1).choice(np.arange(1, n * SEQ), size=n // 4, replace=False))
        stream = rows.reshape(-1)
        write_indexed(prefix, (stream[a:b] for a, b in zip([0, *cuts], [*cuts, n * SEQ], strict=True)))
    return npy, prefix


# a fresh interpreter per measurement, reporting its own peak RSS and wall time
RUNNER = r"""
import json, resource, sys, time
t = time.perf_counter()
mode = sys.argv[1]
from tinymem_fast.cli import main


def in_memory(src, out, model_dir):  # the same rows in memory: all loaded, every column kept, one write
    import numpy as np, torch
    from tinymem_fast.eval import load_causal_lm, score_exact
    ids = torch.from_numpy(np.load(src).astype(np.int64))[:, :64]
    model = load_causal_lm(model_dir)
    s = score_exact(model, ids, 32, 32, batch_size=256, count_matched=False)
    exact, first = s.exact.tolist(), s.first_mismatch.tolist()
    with open(out, "w") as f:
        for i in range(len(exact)):
            f.write(json.dumps({"index": i, "exact": exact[i], "first_mismatch": first[i]}) + "\n")


if mode == "cli":
    rc = main(sys.argv[2:])
    res = {"seconds": time.perf_counter() - t}
else:  # compare: streamed and in memory, each warmed up once, then alternating
    src, out, model_dir, pairs = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    cli = sys.argv[6:]
    times = {"streamed": [], "in memory": []}
    for i in range(pairs + 1):
        for name in (["streamed", "in memory"] if i % 2 == 0 else ["in memory", "streamed"]):
            t = time.perf_counter()
            rc = main(cli) if name == "streamed" else in_memory(src, out, model_dir)
            if i:
                times[name].append(time.perf_counter() - t)
    res = {"times": times}
    rc = 0
res.update(rc=rc, peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(json.dumps(res))
"""


def _run(args: list[str]) -> dict:
    import json

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def _score_args(model: str, inp: str, out: str, *extra: str) -> list[str]:
    return ["score", model, "--input", inp, "--prefix-len", str(P), "--suffix-len", str(K), "--mode", "exact",
            "--exact-only", "--batch-size", "256", "--quiet", "--out", out, *extra]


def _kill_and_resume(model: str, npy: str, work: str, kills: int = 5) -> tuple[bool, int]:
    from tinymem_fast.eval import streaming

    whole, cut = os.path.join(work, "whole"), os.path.join(work, "cut")
    _run(["cli", *_score_args(model, npy, whole, "--shard-rows", "2048")])
    n = np.load(npy, mmap_mode="r").shape[0]
    plan = streaming.ShardPlan(n, 2048)
    rng, done_kills = random.Random(0), 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for attempt in range(kills):
        args = _score_args(model, npy, cut, "--shard-rows", "2048", *(["--resume"] if attempt else []))
        p = subprocess.Popen([sys.executable, "-m", "tinymem_fast", *args], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = len(streaming.done_shards(cut, "score", plan))
        while p.poll() is None and len(streaming.done_shards(cut, "score", plan)) <= before:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 1.0))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            done_kills += 1
        p.wait()
    _run(["cli", *_score_args(model, npy, cut, "--shard-rows", "2048", "--resume")])
    same = open(os.path.join(whole, "score.jsonl"), "rb").read() == open(os.path.join(cut, "score.jsonl"),
                                                                         "rb").read()
    return same, done_kills


def run(device: str = "cpu", repeats: int = 1) -> list[Row]:
    if device != "cpu":
        return []  # the figures asked for are a CPU's; the GPU path is the same code
    smoke = os.environ.get("BENCH_SMOKE") == "1"
    small, big = (20_000, 100_000) if smoke else (100_000, 1_000_000)
    os.makedirs(CACHE, exist_ok=True)
    model = os.path.join(CACHE, "model")
    _model(model)
    rows: list[Row] = []
    peaks = {}
    with tempfile.TemporaryDirectory() as work:
        for n in (small, big):
            npy, prefix = _inputs(n)
            for kind, inp, extra in (("npy", npy, ()), ("bin/idx", prefix + ".bin", ("--seq-len", str(SEQ)))):
                r = _run(["cli", *_score_args(model, inp, os.path.join(work, f"{kind}-{n}".replace("/", "")),
                                              *extra)])
                peaks[(kind, n)] = r["peak_mib"]
                rows.append(Row("streaming", f"tinymem score, {n:,} rows x {SEQ} tokens, {kind}", "streamed",
                                1e3 * r["seconds"], 1e3 * r["seconds"], 1e3 * r["seconds"],
                                note=f"{n / r['seconds']:,.0f} rows/s; peak RSS {r['peak_mib']:.0f} MiB"))
        for kind in ("npy", "bin/idx"):
            growth = peaks[(kind, big)] - peaks[(kind, small)]
            rows[-1 if kind == "bin/idx" else -2].note += f"; +{growth:.0f} MiB from {small:,} rows"
        # streaming against in memory, the same rows, the same engine, alternating order
        npy, _ = _inputs(small)
        pairs = max(3, repeats)
        times = _run(["compare", npy, os.path.join(work, "mem.jsonl"), model, str(pairs),
                      *_score_args(model, npy, os.path.join(work, "cmp"))])["times"]
        base = min(times["in memory"])
        for name, ts in times.items():
            t = min(ts)
            rows.append(Row("streaming", f"{small:,} rows: streamed vs in memory (one process, warm, best "
                            f"of {len(ts)})", name, 1e3 * t, 1e3 * min(ts), 1e3 * max(ts),
                            baseline="in memory" if name == "streamed" else "",
                            ratio=base / t if name == "streamed" else None,
                            note=f"{small / t:,.0f} rows/s"))
        same, kills = _kill_and_resume(model, npy, work)
        rows.append(Row("streaming", f"{small:,} rows killed {kills} times (SIGKILL) and resumed", "streamed",
                        0.0, 0.0, 0.0, note=f"merged file byte-identical to an uninterrupted run: {same}"))
    return rows
