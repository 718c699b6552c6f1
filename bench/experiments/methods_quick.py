"""All 11 unlearning methods on the quick math model: the quick grid (experiments.grids.QUICK), best run
per method by SPEC.md's selection score, one table for the README.

Each configuration runs on a fresh copy of the quick math model (the ``tinymem_quick`` cache) with one
shared base evaluation and forget set. Finished runs are kept in bench/.cache/methods_quick/rows.jsonl
(keyed by run id), so an interrupted run of this suite resumes; delete the file to re-measure.
Writes bench/methods_quick.md (the table) beside RESULTS.md.
"""

from __future__ import annotations

import copy
import json
import os

from bench.experiments.tinymem_quick import trained_run
from bench.harness import HERE, Row
from tinymem_fast.experiments.grids import QUICK
from tinymem_fast.experiments.unlearning import forget_set, run_id, stats, unlearn
from tinymem_fast.methods import get_method
from tinymem_fast.methods.registry import make_config
from tinymem_fast.tinymem.data.dataset import build
from tinymem_fast.tinymem.models import load_model
from tinymem_fast.tinymem.presets import get_preset

PRESET = "quick-math-noise"
CACHE = os.path.join(HERE, ".cache", "methods_quick")

# SPEC.md 7.3, TinyMem math noise (mult, 4 layers): best runs as the paper's result files report them
PAPER = {
    "balanced_subnet": (0.05, 0.00, -0.06), "greedy": (0.001, 1.65, -1.14), "durable": (0.01, 0.50, -2.73),
    "durable_aggregate": (0.01, 1.16, -2.62), "subnet": (0.10, 0.17, -4.39),
    "second_order": (0.05, 0.00, -5.11),
    "hard_concrete": (0.05, 3.31, -3.30), "slimming": (0.05, 0.66, -3.60), "activations": (0.05, 0.00, -6.94),
    "integrated_gradients": (0.01, 0.00, -10.73), "zero_out": (0.05, 24.46, -5.04),
}
PAPER_BASE_MEM = 29.1


def _load_done(path: str) -> dict[str, dict]:
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    done[row["run_id"]] = row
    return done


def best_rows(rows: list[dict], perp_cutoff: float = 500.0, mem_cutoff: float = 100.0) -> dict[str, dict]:
    best: dict[str, dict] = {}
    for row in rows:
        if row["mem_after"] >= mem_cutoff:
            continue
        if "test/ppl_token" in row["after"] and row["after"]["test/ppl_token"] >= perp_cutoff:
            continue
        cur = best.get(row["method"])
        if cur is None or row["score"] < cur["score"]:
            best[row["method"]] = row
    return best


def markdown(best: dict[str, dict], n_runs: dict[str, int]) -> str:
    any_row = next(iter(best.values()))
    lines = [
        f"Quick math model (`{PRESET}`, 4 layers): base {any_row['mem_before']:.1f}% of eligible noised "
        f"sequences memorized ({any_row['n_forget']} forget rows), clean accuracy "
        f"{100 * any_row['base']['avg_acc']:.2f}%. Best run per method of the quick grid "
        "(`experiments.grids.QUICK`) by SPEC's selection score; seconds = the method itself on 2 CPU cores. "
        f"Paper: TinyMem math noise (mult, 4 layers, A100), base {PAPER_BASE_MEM}% memorized.",
        "",
        "| method | runs | best settings | mem % after | Δmem | accuracy % | Δacc | seconds "
        "| paper: ratio, mem %, Δacc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(best, key=lambda m: best[m]["score"])
    for m in order:
        r = best[m]
        hp = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in r["grid_point"].items())
        p = PAPER.get(m)
        paper = f"{p[0]:g}, {p[1]:.2f}, {p[2]:+.2f}%" if p else "—"
        lines.append(
            f"| {m} | {n_runs[m]} | {hp} "
            f"| {r['mem_after']:.1f} | {100 * r['d_mem']:+.0f}% | {100 * r['after']['avg_acc']:.2f} "
            f"| {100 * (r['after']['avg_acc'] - r['base']['avg_acc']) / r['base']['avg_acc']:+.2f}% "
            f"| {r['time_method_s']:.1f} | {paper} |")
    return "\n".join(lines) + "\n"


def run(device: str = "cpu", repeats: int = 1, methods: list[str] | None = None) -> list[Row]:
    cfg = get_preset(PRESET)
    run_dir = trained_run(PRESET, [])
    data = build(cfg.data, seed=cfg.seed, workdir=run_dir)
    base_model = load_model(os.path.join(run_dir, "final"), device=device)
    base = stats(base_model, data)
    forget = forget_set(base_model, data)
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, "rows.jsonl")
    done = _load_done(path)
    rows, n_runs = [], {}
    from tinymem_fast.methods import method_names

    for method, grid in QUICK.items():
        if (methods and method not in methods) or method not in method_names():
            continue  # regularizers and fine-tuning: a full training run each (tinymem sweep runs them)
        n_runs[method] = len(grid)
        for point in grid:
            rid = run_id(PRESET, method, make_config(get_method(method), point), 0)
            if rid in done:
                rows.append(done[rid])
                continue
            model = copy.deepcopy(base_model)
            row = unlearn(model, data, method, point, base=base, forget=forget, retain_size=2000,
                          model_tag=PRESET)
            row["grid_point"] = point
            with open(path, "a") as f:
                f.write(json.dumps(row, default=float) + "\n")
            rows.append(row)
            print(f"    {method} {point}: mem {row['mem_before']:.1f} -> {row['mem_after']:.1f}, "
                  f"acc {row['base']['avg_acc']:.4f} -> {row['after']['avg_acc']:.4f}, "
                  f"{row['time_method_s']:.1f} s", flush=True)
    best = best_rows(rows)
    with open(os.path.join(HERE, "methods_quick.md"), "w") as f:
        f.write(markdown(best, n_runs))
    out = []
    for m, r in sorted(best.items(), key=lambda kv: kv[1]["score"]):
        ms = 1e3 * r["time_method_s"]
        note = (f"best of {n_runs[m]}: {r['grid_point']}; "
                f"mem {r['mem_before']:.1f}% -> {r['mem_after']:.1f}%, "
                f"acc {100 * r['base']['avg_acc']:.2f} -> {100 * r['after']['avg_acc']:.2f}, "
                f"score {r['score']:.3f}")
        if "stop_rule" in r["hparams"]:  # Slimming, Hard Concrete: which stop schedule the figures follow
            note += (f"; stop_rule {r['hparams']['stop_rule']}, {r['method_info']['steps']} steps, "
                     f"epochs cut {r['method_info'].get('epochs_cut') or 'none'}")
        out.append(Row("methods_quick", f"{m}, {PRESET}", "tinymem (cpp)", ms, ms, ms, note=note))
    return out
