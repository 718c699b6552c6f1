"""Timing and reporting helpers shared by the benchmark suites.

Every figure is a median over repeats with its 20th/80th percentiles, and every speed figure is a ratio
to a baseline measured in the same run on the same machine.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
RESULTS_MD = os.path.join(HERE, "RESULTS.md")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn, *, device: str = "cpu", warmup: int = 1, repeats: int = 5, min_time: float = 0.0):
    """Run ``fn`` ``warmup`` times, then at least ``repeats`` times (and ``min_time`` seconds).

    Returns (median, p20, p80) in milliseconds, and peak GPU memory in MiB (None on CPU).
    """
    for _ in range(warmup):
        fn()
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - t_start) < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 1000:
            break
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return statistics.median(times), q[0], q[3], peak


def cpu_peak_mib(fn) -> float | None:
    """Growth of the process's peak resident memory while ``fn`` runs, in MiB (Linux: the peak is reset
    through /proc/self/clear_refs first). None where that is not available. Counts every allocation,
    whatever the allocator, but also anything else the process touches meanwhile: run it alone."""

    def field(name):
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{name}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024

    try:
        import ctypes

        # hand freed heap memory back first, so that reusing it counts as growth again
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = field("VmRSS")
    except (OSError, AttributeError):
        return None
    fn()
    return field("VmHWM") - base


@dataclass
class Row:
    suite: str
    case: str
    provider: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mib: float | None = None  # so that Row(suite, case, provider, *measure(...)) lines up
    baseline: str = ""
    ratio: float | None = None  # baseline time / this time (>1 = faster than the baseline)
    note: str = ""
    extra: dict = field(default_factory=dict)
    # a correctness check made alongside the timing (None: none made); False fails `python -m bench`
    ok: bool | None = None


def cpu_model() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return cpu


def machine_key(device: str) -> str:
    """One results file per machine kind: CPUs of other vendors or families at the same core count are
    different machines (their figures are not comparable), so the model goes into the name."""
    if device.startswith("cuda"):
        return "gpu-" + torch.cuda.get_device_name(0).replace(" ", "_")
    words = re.sub(r"\(R\)|\(TM\)|CPU|Processor|\d+-Core", " ", cpu_model()).split()
    family = "_".join(w.lower() for w in words[:2]) or "unknown"
    return f"cpu-{family}-{os.cpu_count()}cores"


def machine_description(device: str) -> dict:
    cpu = cpu_model()
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = "not installed"
    desc = {
        "cpu": f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": triton_v,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if device.startswith("cuda"):
        desc["gpu"] = torch.cuda.get_device_name(0)
    return desc


def save(device: str, suite: str, rows: list[Row]) -> str:
    """Store one suite's rows for this machine, then rebuild RESULTS.md from every stored file."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    key = machine_key(device)
    path = os.path.join(RESULTS_DIR, f"{key}.json")
    data = {"machine": machine_description(device), "suites": {}}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        data["suites"] = old.get("suites", {})
    data["suites"][suite] = {"machine": machine_description(device), "rows": [asdict(r) for r in rows]}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    write_markdown()
    return path


def _fmt(x, nd=2):
    return "" if x is None else f"{x:.{nd}f}"


def write_markdown() -> None:
    parts = ["# Benchmark results", "",
             "Written by `python -m bench` (and `bench/gpu_check.sh` on GPU machines). Times are medians "
             "with 20th-80th percentiles in ms; **ratio = baseline time / this time** (above 1 = faster), "
             "the baseline measured in the same run on the same machine.", ""]
    files = sorted(f for f in os.listdir(RESULTS_DIR) if f.endswith(".json")) if os.path.isdir(
        RESULTS_DIR) else []
    for fname in files:
        with open(os.path.join(RESULTS_DIR, fname)) as f:
            data = json.load(f)
        parts.append(f"## {fname[:-5]}")
        parts.append("")
        for suite, body in data["suites"].items():
            m = body["machine"]
            parts.append(f"### {suite}")
            parts.append("")
            parts.append("Machine: " + "; ".join(f"{k} {v}" for k, v in m.items()))
            parts.append("")
            parts.append("| case | provider | median ms | p20-p80 ms | baseline | ratio | peak MiB | note |")
            parts.append("|---|---|---|---|---|---|---|---|")
            for r in body["rows"]:
                parts.append(
                    f"| {r['case']} | {r['provider']} | {_fmt(r['median_ms'])} | "
                    f"{_fmt(r['p20_ms'])}-{_fmt(r['p80_ms'])} | {r['baseline'] or ''} | "
                    f"{_fmt(r['ratio'])}{'x' if r['ratio'] is not None else ''} | "
                    f"{_fmt(r['peak_mib'], 1)} | {r['note']} |")
            parts.append("")
    with open(RESULTS_MD + ".tmp", "w") as f:
        f.write("\n".join(parts))
    os.replace(RESULTS_MD + ".tmp", RESULTS_MD)


def with_ratios(rows: list[Row], baseline_provider: str, case: str | None = None) -> None:
    """Fill ``ratio`` for every row of ``case`` (all cases if None) against the named provider's row."""
    by_case: dict[str, Row] = {r.case: r for r in rows if r.provider == baseline_provider}
    for r in rows:
        if case is not None and r.case != case:
            continue
        base = by_case.get(r.case)
        if base is not None and r.provider != baseline_provider:
            r.baseline = baseline_provider
            r.ratio = base.median_ms / r.median_ms
