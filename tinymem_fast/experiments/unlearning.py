"""The unlearning pipeline: base stats -> forget set -> retain set -> method -> re-evaluation -> one row.

Rows are appended to ``results.jsonl`` (and ``results.csv``) with every hyperparameter, base and after
metrics in both utility variants, relative changes, the selection score and the timings.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from .. import __version__
from ..common.devices import device_name, sync
from ..methods.registry import UnlearnInputs, get_unlearning_method, make_config
from ..tinymem.memorization import backdoor_success, noise_memorization
from ..tinymem.results import (  # noqa: F401
    CSV_FIELDS,
    append_row,
    check_selection,
    mem_metric_key,
    run_id,
    selection_score,
    stats,
    utility,
    utility_key,
)

log = logging.getLogger(__name__)


class NothingMemorized(ValueError):
    """The model reproduces none of its artifact sequences: there is nothing to unlearn."""


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


def unlearn(model, data, method: str, overrides: dict | None = None, *, retain_size: int | None = 2000,
            seed: int = 0, model_tag: str = "", base: dict | None = None, eval_batch_size: int = 256,
            forget: tuple[torch.Tensor, torch.Tensor] | None = None, utility_metric: str | None = None,
            mem_metric: str = "mem", checkpoint: str = "final") -> dict:
    """Run one method on ``model`` (edited in place) and return its result row.

    ``retain_size``: clean retain rows (None: all). ``utility_metric`` / ``mem_metric``: the selection
    score's utility and memorization variants (:class:`~tinymem_fast.tinymem.results.ProtocolConfig`).
    ``checkpoint``: which model of the run this is (``final``, ``step-...``), recorded in the row."""
    m = get_unlearning_method(method)
    cfg = make_config(m, overrides)
    if hasattr(cfg, "seed"):
        cfg.seed = seed
    kind = data.config.kind
    check_selection(kind, utility_metric, mem_metric)
    t0 = time.perf_counter()
    if base is None:
        base = stats(model, data, eval_batch_size)
    mem_key = mem_metric_key(data.config.artifact, mem_metric, base)
    if forget is None:
        forget = forget_set(model, data, eval_batch_size)
    f_idx, f_start = forget
    t_eval_before = time.perf_counter() - t0
    if f_idx.numel() == 0:
        raise NothingMemorized(f"nothing is memorized ({mem_key} = {base[mem_key]:.1f}%): the forget set is "
                               "empty, so there is nothing to unlearn")
    r_idx = retain_set(data, f_idx, retain_size, seed)
    inputs = UnlearnInputs(data.rows[f_idx], data.pad[f_idx], data.rows[r_idx], data.pad[r_idx], f_start)
    sync(model)
    t1 = time.perf_counter()
    info = m.run(model, inputs, cfg)
    sync(model)
    t_method = time.perf_counter() - t1
    t2 = time.perf_counter()
    after = stats(model, data, eval_batch_size)
    t_eval_after = time.perf_counter() - t2
    row = {
        "run_id": run_id(model_tag, m.name, cfg, seed), "model": model_tag, "method": m.name,
        "category": m.category, "seed": seed, "hparams": dataclasses.asdict(cfg),
        "checkpoint": checkpoint, "n_forget": int(f_idx.numel()), "n_retain": int(r_idx.numel()),
        "retain_size": retain_size, "retain_pool": int(data.clean_rows().numel()),
        "selection": {"utility_metric": utility_metric or utility_key(kind), "mem_metric": mem_key},
        "mem_metric": mem_key, "mem_before": base[mem_key], "mem_after": after[mem_key],
        "utility_before": utility(base, kind), "utility_after": utility(after, kind),
        **selection_score(base, after, kind, mem_key, utility_metric),
        "time_method_s": t_method, "time_edit_s": info.get("time_edit_s", t_method),
        "time_eval_s": t_eval_before + t_eval_after, "method_info": info,
        "device": device_name(model), "versions": {"tinymem_fast": __version__, "torch": torch.__version__},
        "base": base, "after": after,
    }
    return row
