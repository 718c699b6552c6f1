"""The unlearning pipeline: base stats -> forget set -> retain set -> method -> re-evaluation -> one row.

Rows are appended to ``results.jsonl`` (and ``results.csv``) with every hyperparameter, base and after
metrics in both utility variants, relative changes, the selection score and the timings.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import platform
import time

import torch

from . import __version__
from .memorization import backdoor_success, noise_memorization
from .methods.registry import UnlearnInputs, get_method, make_config
from .training import evaluate

log = logging.getLogger(__name__)


class NothingMemorized(ValueError):
    """The model reproduces none of its artifact sequences: there is nothing to unlearn."""


def _device_name(model) -> str:
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(model) -> None:
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()


def stats(model, data, batch_size: int = 256) -> dict:
    """Utility metrics of every test set plus memorization (the training loop's evaluation)."""
    return evaluate(model, data, batch_size)


def forget_set(model, data, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Training rows the model reproduces now: (row indices into ``data.rows``, window starts)."""
    if data.config.artifact == "noise":
        idx = noise_memorization(model, data, batch_size)["memorized_index"]
        return idx, torch.full((idx.numel(),), data.config.prompt_len, dtype=torch.long)
    if data.config.artifact == "backdoor":
        r = backdoor_success(model, data, batch_size, on="train")
        idx = r["memorized_index"]
        pos = {int(v): i for i, v in enumerate(data.artifact_rows.tolist())}
        start = data.poison_train_start[[pos[int(i)] for i in idx.tolist()]]
        return idx, start
    raise ValueError("the dataset has no artifact, so there is no memorized set to forget")


def check_model_fits_data(model, data, where: str = "the model") -> None:
    """The model embeds every token id of the data and every position of its rows (else its forward
    pass fails midway, or indexes out of range)."""
    vocab = model.get_input_embeddings().num_embeddings
    if vocab < data.vocab_size:
        raise ValueError(f"{where} has a vocabulary of {vocab} ids but the data uses {data.vocab_size}: it "
                         "was trained on other data (pass the run folder it came from, or --preset/--set to "
                         "match)")
    ctx = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if ctx is not None and ctx < data.rows.shape[1]:
        raise ValueError(f"{where} handles {ctx} positions but the data's rows have {data.rows.shape[1]}")


def retain_set(data, forget_idx: torch.Tensor, size: int | None, seed: int) -> torch.Tensor:
    """Clean training rows (no artifact, none of the forget rows), sampled without replacement."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"retain_size must be a whole number >= 1 (None: every clean row), got {size!r}")
    pool = data.clean_rows()
    overlap = torch.isin(pool, forget_idx)
    if overlap.any():
        log.warning("dropping %d forget rows from the retain pool", int(overlap.sum()))
        pool = pool[~overlap]
    if size is not None and size < pool.numel():
        pool = pool[torch.randperm(pool.numel(), generator=torch.Generator().manual_seed(seed))[:size]]
    return pool.sort().values


def _utility(m: dict, kind: str) -> dict:
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


def unlearn(model, data, method: str, overrides: dict | None = None, *, retain_size: int | None = 2000,
            seed: int = 0, model_tag: str = "", base: dict | None = None, eval_batch_size: int = 256,
            forget: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Run one method on ``model`` (edited in place) and return its result row."""
    m = get_method(method)
    cfg = make_config(m, overrides)
    if hasattr(cfg, "seed"):
        cfg.seed = seed
    mem_key = "mem" if data.config.artifact == "noise" else "asr"
    t0 = time.perf_counter()
    if base is None:
        base = stats(model, data, eval_batch_size)
    if forget is None:
        forget = forget_set(model, data, eval_batch_size)
    f_idx, f_start = forget
    t_eval_before = time.perf_counter() - t0
    if f_idx.numel() == 0:
        raise NothingMemorized(f"nothing is memorized ({mem_key} = {base[mem_key]:.1f}%): the forget set is "
                               "empty, so there is nothing to unlearn")
    r_idx = retain_set(data, f_idx, retain_size, seed)
    inputs = UnlearnInputs(data.rows[f_idx], data.pad[f_idx], data.rows[r_idx], data.pad[r_idx], f_start)
    _sync(model)
    t1 = time.perf_counter()
    info = m.run(model, inputs, cfg)
    _sync(model)
    t_method = time.perf_counter() - t1
    t2 = time.perf_counter()
    after = stats(model, data, eval_batch_size)
    t_eval_after = time.perf_counter() - t2
    kind = data.config.kind
    row = {
        "run_id": run_id(model_tag, m.name, cfg, seed), "model": model_tag, "method": m.name,
        "category": m.category, "seed": seed, "hparams": dataclasses.asdict(cfg),
        "n_forget": int(f_idx.numel()), "n_retain": int(r_idx.numel()),
        "mem_metric": mem_key, "mem_before": base[mem_key], "mem_after": after[mem_key],
        "utility_before": _utility(base, kind), "utility_after": _utility(after, kind),
        **selection_score(base, after, kind, mem_key),
        "time_method_s": t_method, "time_edit_s": info.get("time_edit_s", t_method),
        "time_eval_s": t_eval_before + t_eval_after, "method_info": info,
        "device": _device_name(model), "versions": {"tinymem_fast": __version__, "torch": torch.__version__},
        "base": base, "after": after,
    }
    return row


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
