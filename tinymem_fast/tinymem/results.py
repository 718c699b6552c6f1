"""Result rows shared by every mitigation (unlearning, fine-tuning, regularizers): TinyMem's metrics
before and after, the utility variant, relative changes and the selection score (SPEC 6.4), the run id,
and appending a row to ``results.jsonl`` / ``results.csv``."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

from ..common.validation import at_least
from .training import evaluate

# utility variants (SPEC 4.3) the selection score can use, per data kind; the first is the default
UTILITY_METRICS = {"math": ("acc", "acc_paper"), "language": ("ppl_token", "ppl_batchmean")}
# noise memorization the score uses: the pooled % over every eligible row, or the unweighted mean of the
# per-duplication-group % (the paper's avg_perc_mem; equal to the pooled % without groups)
MEM_METRICS = ("mem", "avg_perc_mem")


@dataclass
class ProtocolConfig:
    """How a trained run is unlearned and its runs selected (SPEC 6.2, 6.4); recorded in run.json, so
    ``tinymem unlearn``/``sweep``/``report`` follow the run's preset unless told otherwise.

    ``retain_size``: clean retain rows drawn without replacement (None: every clean training row).
    ``utility_metric``: the utility in the score (None: ``acc`` for math, ``ppl_token`` for language).
    ``mem_metric``: ``mem`` (pooled) or ``avg_perc_mem`` (group mean); backdoors always use ``asr``.
    """

    retain_size: int | None = 2000
    utility_metric: str | None = None
    mem_metric: str = "mem"

    def validate(self, kind: str | None = None) -> None:
        at_least("protocol", self, 1, "retain_size", optional=True)
        check_selection(kind, self.utility_metric, self.mem_metric, "protocol.")


def check_selection(kind: str | None, utility_metric: str | None, mem_metric: str | None,
                    prefix: str = "") -> None:
    """One-line errors for a utility or memorization variant that does not exist (for this data kind)."""
    if mem_metric is not None and mem_metric not in MEM_METRICS:
        raise ValueError(f"unknown {prefix}mem_metric {mem_metric!r}; choose one of {', '.join(MEM_METRICS)}")
    if utility_metric is None:
        return
    allowed = UTILITY_METRICS.get(kind) if kind else tuple(v for vs in UTILITY_METRICS.values() for v in vs)
    if utility_metric not in (allowed or ()):
        where = f"{kind} data" if kind else "any data"
        raise ValueError(f"{prefix}utility_metric {utility_metric!r} does not apply to {where}; choose one "
                         f"of {', '.join(allowed or ())}")


def utility_key(kind: str, utility_metric: str | None = None) -> str:
    return utility_metric or UTILITY_METRICS[kind][0]


def mem_metric_key(artifact: str, mem_metric: str | None = "mem", stats: dict | None = None) -> str:
    """The memorization figure a run is scored on: ``asr`` for backdoors; for noise ``mem`` or the group
    mean (which falls back to ``mem`` where the data has a single group: the two are then equal)."""
    if artifact != "noise":
        return "asr"
    if mem_metric == "avg_perc_mem" and (stats is None or "avg_perc_mem" in stats):
        return "avg_perc_mem"
    return "mem"


def stats(model, data, batch_size: int = 256) -> dict:
    """Utility metrics of every test set plus memorization (the training loop's evaluation)."""
    return evaluate(model, data, batch_size)


def utility(m: dict, kind: str) -> dict:
    if kind == "math":
        accs = {k: v for k, v in m.items() if k.startswith("acc") and k.endswith("/acc")}
        return {"acc": m.get("avg_acc", next(iter(accs.values()), float("nan"))),
                "acc_paper": m.get("avg_acc_paper", float("nan")), "per_task": accs}
    return {"ppl_token": m["test/ppl_token"], "ppl_batchmean": m["test/ppl_batchmean"]}


def selection_score(before: dict, after: dict, kind: str, mem_key: str,
                    utility_metric: str | None = None) -> dict:
    """SPEC 6.4: relative changes and score (lower is better; +100 when memorization did not move).

    ``utility_metric``: math ``acc`` (pad-masked, default) or ``acc_paper`` (pads included), each the mean
    over the per-task relative changes; language ``ppl_token`` (default) or ``ppl_batchmean``."""
    check_selection(kind, utility_metric, None)
    ukey = utility_key(kind, utility_metric)
    mb, ma = before[mem_key], after[mem_key]
    d_mem = (ma - mb) / mb if mb else 0.0
    if kind == "math":
        tasks = [k for k in before if k.startswith("acc") and k.endswith(f"/{ukey}")]
        d_util = sum((after[k] - before[k]) / before[k] for k in tasks) / max(1, len(tasks))
        score = d_mem - d_util
    else:
        name = f"test/{ukey}"
        d_util = (after[name] - before[name]) / before[name]
        score = d_mem + d_util
    if d_mem == 0.0:
        score += 100.0
    return {"d_mem": d_mem, "d_util": d_util, "score": score}


def rescore(row: dict, utility_metric: str | None = None, mem_metric: str | None = None) -> dict:
    """``row`` scored again from its full before/after metrics with other selection variants (None keeps
    the row's own): memorization figure, relative changes, score and ``selection`` are replaced."""
    if utility_metric is None and mem_metric is None:
        return row
    if "base" not in row or "after" not in row:
        raise ValueError(f"result row {row.get('run_id', '?')} ({row.get('method', '?')}) lacks its before/"
                         "after metrics, so it cannot be scored with another utility or memorization figure")
    kind = "math" if "acc" in row["utility_before"] else "language"
    sel = row.get("selection") or {}
    utility_metric = utility_metric or sel.get("utility_metric") or utility_key(kind)
    check_selection(kind, utility_metric, mem_metric)
    artifact = "backdoor" if row["mem_metric"] == "asr" else "noise"
    key = mem_metric_key(artifact, mem_metric or row["mem_metric"], row["base"])
    before, after = row["base"], row["after"]
    return {**row, "mem_metric": key, "mem_before": before[key], "mem_after": after[key],
            **selection_score(before, after, kind, key, utility_metric),
            "selection": {"utility_metric": utility_metric, "mem_metric": key}}


def run_id(model_tag: str, method: str, cfg, seed: int) -> str:
    hp = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "progress"}  # display only
    blob = json.dumps({"model": model_tag, "method": method, "cfg": hp, "seed": seed}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


CSV_FIELDS = ["run_id", "model", "method", "seed", "ratio", "mem_metric", "mem_before", "mem_after", "d_mem",
              "util_before", "util_after", "d_util", "score", "time_method_s", "n_forget", "n_retain"]


def row_utility_key(row: dict) -> str:
    """The utility a result row was selected on (older rows: the pad-masked accuracy / token perplexity)."""
    chosen = (row.get("selection") or {}).get("utility_metric")
    if chosen in row["utility_before"]:
        return chosen
    return "acc" if "acc" in row["utility_before"] else "ppl_token"


def append_row(row: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.jsonl"), "a") as f:
        f.write(json.dumps(row, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())
    path = os.path.join(out_dir, "results.csv")
    new = not os.path.exists(path)
    ub, ua = row["utility_before"], row["utility_after"]
    ukey = row_utility_key(row)  # the CSV's utility columns are the ones d_util was computed from
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        w.writerow({"run_id": row["run_id"], "model": row["model"], "method": row["method"],
                    "seed": row["seed"], "ratio": row["hparams"].get("ratio"),
                    "mem_metric": row["mem_metric"],
                    "mem_before": row["mem_before"], "mem_after": row["mem_after"], "d_mem": row["d_mem"],
                    "util_before": ub[ukey], "util_after": ua[ukey], "d_util": row["d_util"],
                    "score": row["score"], "time_method_s": row["time_method_s"],
                    "n_forget": row["n_forget"], "n_retain": row["n_retain"]})
