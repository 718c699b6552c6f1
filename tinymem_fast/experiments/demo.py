"""``tinymem demo``: the main job end to end on a 2-core CPU in minutes.

Trains (or reuses) the quick TinyMem math model with noise, measures memorization, removes it with
BalancedSubnet and Subnet, and writes a before/after table, result rows and a plot.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time

from ..common.optional import MissingExtra, pyplot
from ..common.validation import parse_device
from ..integrations.mixed_precision import resolve_precision
from ..tinymem.data.dataset import build
from ..tinymem.models import load_model
from ..tinymem.presets import get_preset
from ..tinymem.training import train_run
from .unlearning import append_row, forget_set, stats, unlearn

log = logging.getLogger(__name__)

# The paper's score lr (0.1) and alpha (0.9) assume thousands of steps; a quick model gets a few hundred,
# so the quick settings use a larger score lr (and BalancedSubnet a larger retain weight). Measured
# results: README.
QUICK_METHODS = {
    "balanced_subnet": dict(ratio=0.15, lr=1.0, loss_weight=0.95, epochs=10, batch_size=64),
    "subnet": dict(ratio=0.05, lr=1.0, epochs=5, batch_size=64),
}
def _model_ready(model_dir: str, fingerprint: str) -> bool:
    info = os.path.join(model_dir, "run.json")
    if not os.path.exists(os.path.join(model_dir, "final", "model.safetensors")) or not os.path.exists(info):
        return False
    with open(info) as f:
        return json.load(f).get("data_fingerprint") == fingerprint


def run_demo(out_dir: str, *, preset: str = "quick-math-noise", methods: dict | None = None,
             retrain: bool = False, progress: bool = True, say=print, cfg=None,
             precision: str = "auto") -> list[dict]:
    """``cfg`` (a RunConfig) replaces the preset's configuration when given (tests use tiny ones).
    ``precision``: of training and of the methods' steps (``auto``: bf16 where this machine runs it
    natively, else fp32). A model already trained in the folder is reused whatever its precision."""
    methods = methods or QUICK_METHODS
    t_start = time.perf_counter()
    cfg = copy.deepcopy(cfg) if cfg is not None else get_preset(preset)
    cfg.train.precision = resolve_precision(precision, parse_device(cfg.train.device, "train.device").type)
    os.makedirs(out_dir, exist_ok=True)
    model_dir = os.path.join(out_dir, "model")
    data = build(cfg.data, seed=cfg.seed, workdir=model_dir)
    fp = data.fingerprint()
    if retrain or not _model_ready(model_dir, fp):
        say(f"[1/3] training the {preset} model ({cfg.description}; {cfg.train.precision}) ...")
        # a whole `tinymem train` run folder (run.json, checkpoints, final_metrics.json): `tinymem sweep`,
        # `unlearn` and `finetune` take it as it is; a partial run of other settings is started over
        info = os.path.join(model_dir, "run.json")
        same = False
        if os.path.exists(info):
            with open(info) as f:
                same = json.load(f).get("config") == cfg.to_dict()
        train_run(cfg, model_dir, preset=preset, resume=same and not retrain, progress=progress)
    else:
        with open(os.path.join(model_dir, "run.json")) as f:
            trained = json.load(f).get("config", {}).get("train", {}).get("precision", "fp32")
        say(f"[1/3] reusing the trained model in {model_dir} (trained in {trained})")
    base_model = load_model(os.path.join(model_dir, "final"))
    say("[2/3] measuring memorization ...")
    t0 = time.perf_counter()
    base = stats(base_model, data)
    forget = forget_set(base_model, data)
    t_base = time.perf_counter() - t0
    if forget[0].numel() == 0:
        say("nothing is memorized by this model, so there is nothing to unlearn")
        return []
    mem_key = "mem" if data.config.artifact == "noise" else "asr"
    say(f"      {base[mem_key]:.1f}% of eligible noised sequences memorized ({forget[0].numel()} rows), "
        f"accuracy {base.get('avg_acc', float('nan')):.4f}")
    rows = []
    say("[3/3] unlearning ...")
    for name, hp in methods.items():
        model = copy.deepcopy(base_model)
        row = unlearn(model, data, name, {**hp, "progress": progress, "precision": cfg.train.precision},
                      base=base, forget=forget,
                      model_tag=f"{preset}/seed{cfg.seed}", retain_size=2000)
        row["time_eval_s"] = t_base + row["time_eval_s"]
        append_row(row, out_dir)
        rows.append(row)
        say(f"      {name}: memorization {row['mem_before']:.1f}% -> {row['mem_after']:.1f}% in "
            f"{row['time_method_s']:.1f} s")
    table = format_table(base, rows, mem_key)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    wrote = "table.md, results.jsonl, results.csv"
    try:
        plot(base, rows, mem_key, os.path.join(out_dir, "memorization_vs_accuracy.png"))
        wrote += ", memorization_vs_accuracy.png"
    except MissingExtra as exc:  # the results stand without the figure
        say(f"no plot: {exc}")
    say("")
    say(table)
    say("")
    say(f"total {time.perf_counter() - t_start:.0f} s; wrote {out_dir}/{wrote}")
    return rows


def _acc(m: dict) -> float:
    return m.get("avg_acc", m.get("test/acc", float("nan")))


def _ppl(m: dict) -> float:
    if "test/ppl_token" in m:
        return m["test/ppl_token"]
    vals = [v for k, v in m.items() if k.endswith("/ppl_token")]
    return sum(vals) / len(vals) if vals else float("nan")


def format_table(base: dict, rows: list[dict], mem_key: str) -> str:
    lines = ["| model | memorized % | accuracy | perplexity | seconds |", "|---|---|---|---|---|",
             f"| base | {base[mem_key]:.2f} | {_acc(base):.4f} | {_ppl(base):.3f} | - |"]
    for r in rows:
        a = r["after"]
        name = f"{r['method']} (ratio {r['hparams']['ratio']:g})"
        secs = r["time_method_s"]
        lines.append(f"| {name} | {a[mem_key]:.2f} | {_acc(a):.4f} | {_ppl(a):.3f} | {secs:.1f} |")
    return "\n".join(lines)


def plot(base: dict, rows: list[dict], mem_key: str, path: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    bx, by = _acc(base) * 100, base[mem_key]
    ax.scatter([bx], [by], s=80, color="black", zorder=3, label="base model")
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for r, c in zip(rows, colors * 5, strict=False):
        x, y = _acc(r["after"]) * 100, r["after"][mem_key]
        ax.annotate("", xy=(x, y), xytext=(bx, by), arrowprops=dict(arrowstyle="->", color=c, lw=1.5))
        ax.scatter([x], [y], s=70, color=c, zorder=3, label=f"{r['method']} ({r['time_method_s']:.0f} s)")
    ax.set_xlabel("test accuracy, clean sequences (%)")
    ax.set_ylabel("memorized noised sequences (%)" if mem_key == "mem" else "backdoor attack success (%)")
    ax.set_title("Unlearning memorized sequences: before -> after")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def load_rows(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "results.jsonl")) as f:
        return [json.loads(line) for line in f]


__all__ = ["run_demo", "QUICK_METHODS", "load_rows"]
