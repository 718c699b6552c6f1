"""Result rows shared by every mitigation (unlearning, fine-tuning, regularizers): TinyMem's metrics
before and after, the utility variant, relative changes and the selection score (SPEC 6.4), the run id,
and appending a row to ``results.jsonl`` / ``results.csv``."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os

from .training import evaluate


def stats(model, data, batch_size: int = 256) -> dict:
    """Utility metrics of every test set plus memorization (the training loop's evaluation)."""
    return evaluate(model, data, batch_size)


def utility(m: dict, kind: str) -> dict:
    if kind == "math":
        accs = {k: v for k, v in m.items() if k.startswith("acc") and k.endswith("/acc")}
        return {"acc": m.get("avg_acc", next(iter(accs.values()), float("nan"))),
                "acc_paper": m.get("avg_acc_paper", float("nan")), "per_task": accs}
    return {"ppl_token": m["test/ppl_token"], "ppl_batchmean": m["test/ppl_batchmean"]}


def selection_score(before: dict, after: dict, kind: str, mem_key: str) -> dict:
    """SPEC 6.4: relative changes and score (lower is better; +100 when memorization did not move)."""
    mb, ma = before[mem_key], after[mem_key]
    d_mem = (ma - mb) / mb if mb else 0.0
    if kind == "math":
        tasks = [k for k in before if k.startswith("acc") and k.endswith("/acc")]
        d_util = sum((after[k] - before[k]) / before[k] for k in tasks) / max(1, len(tasks))
        score = d_mem - d_util
    else:
        d_util = (after["test/ppl_token"] - before["test/ppl_token"]) / before["test/ppl_token"]
        score = d_mem + d_util
    if d_mem == 0.0:
        score += 100.0
    return {"d_mem": d_mem, "d_util": d_util, "score": score}


def run_id(model_tag: str, method: str, cfg, seed: int) -> str:
    hp = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "progress"}  # display only
    blob = json.dumps({"model": model_tag, "method": method, "cfg": hp, "seed": seed}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


CSV_FIELDS = ["run_id", "model", "method", "seed", "ratio", "mem_metric", "mem_before", "mem_after", "d_mem",
              "util_before", "util_after", "d_util", "score", "time_method_s", "n_forget", "n_retain"]


def append_row(row: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.jsonl"), "a") as f:
        f.write(json.dumps(row, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())
    path = os.path.join(out_dir, "results.csv")
    new = not os.path.exists(path)
    ub, ua = row["utility_before"], row["utility_after"]
    ukey = "acc" if "acc" in ub else "ppl_token"
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
