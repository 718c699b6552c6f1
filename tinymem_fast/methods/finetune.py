"""Fine-tuning mitigations (SPEC 5.3): Clean FT, Extra FT and Both FT.

Start from a training checkpoint **with its AdamW state** and continue the run's own recipe (lr, weight
decay, betas, batch size, pad handling) for ``epochs`` more epochs on:

* ``clean`` (``clean_ft``): the clean twins of exactly the artifact training rows -- the un-noised
  versions of the noised rows, or the un-poisoned versions of the poisoned rows -- once each;
* ``extra`` (``extra_ft``): every non-artifact training row (with its copy count);
* ``both`` (``both_ft``): the union.

The run is :func:`tinymem_fast.tinymem.training.train` itself (evaluation and a checkpoint every epoch, exact
resume) on a view of the dataset whose training rows are the fine-tuning rows; the artifact rows stay in
the view with zero copies, so the memorization metrics still see them. The result is one row of the
unlearning pipeline's schema (:func:`tinymem_fast.experiments.unlearning.unlearn`), with the fine-tuning time
(evaluations excluded) as the method's time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass

import torch

from .. import __version__
from ..tinymem.data import math as mathdata
from ..tinymem.data.dataset import TinyMemData, build, build_for_run
from ..tinymem.training import list_checkpoints, train
from .registry import register

log = logging.getLogger(__name__)

FT_DATA = ("clean", "extra", "both")
METHOD_NAMES = {"clean": "clean_ft", "extra": "extra_ft", "both": "both_ft"}


@dataclass
class FinetuneConfig:
    data: str = "clean"        # ft_data: clean | extra | both
    epochs: float = 5          # ft_epochs

    def validate(self) -> None:
        if self.data not in FT_DATA:
            raise ValueError(f"unknown fine-tuning data {self.data!r}; choose one of {', '.join(FT_DATA)}")
        if not self.epochs > 0:
            raise ValueError(f"fine-tuning epochs must be positive, got {self.epochs}")


# --- locating the run ---------------------------------------------------------------------------


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """(run folder, checkpoint folder) for a `tinymem train` folder (its newest checkpoint) or one of its
    ``checkpoints/step-*`` folders."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    if os.path.exists(os.path.join(path, "trainer_state.pt")):
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        ckpt = path
    else:
        run_dir = path
        cks = list_checkpoints(path)
        if not cks:
            raise FileNotFoundError(f"{path!r} holds no training checkpoint (checkpoints/step-*/ with "
                                    "trainer_state.pt); fine-tuning needs the optimizer state")
        ckpt = cks[-1][1]
    if not os.path.exists(os.path.join(run_dir, "run.json")):
        raise FileNotFoundError(f"{run_dir!r} has no run.json; pass a `tinymem train` output folder")
    return run_dir, ckpt


def load_run(run_dir: str):
    """The RunConfig (checked like a config file) and data fingerprint recorded by `tinymem train`."""
    from ..tinymem.presets import from_dict

    path = os.path.join(run_dir, "run.json")
    with open(path) as f:
        info = json.load(f)
    return from_dict(info["config"], path), info.get("data_fingerprint")


def load_run_data(run_dir: str):
    """(RunConfig, TinyMemData) of a `tinymem train` folder: the data rebuilt with the run's tokenizer and
    checked against the fingerprint recorded at training time."""
    run_cfg, fingerprint = load_run(run_dir)
    return run_cfg, build_for_run(run_dir, run_cfg.data, run_cfg.seed, fingerprint, "its run.json")


# --- data selection -----------------------------------------------------------------------------


def _row_key(row: torch.Tensor) -> bytes:
    return row.contiguous().numpy().tobytes()


def _backdoor_twins(data: TinyMemData) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean versions of the poisoned training rows: poison the clean candidates again with the same
    rule and match rows exactly (the dataset keeps only the poisoned versions)."""
    from ..tinymem.data import artifacts

    c = data.config
    if c.kind == "math":
        main = mathdata.family_numbers(c.family, c.main_const, c.num_main, c.seq_numbers, c.modulus)
        texts = [mathdata.to_text(n) for n in main]
        ids, pad = mathdata.pad_rows([mathdata.encode(t) for t in texts], c.max_ctx)
        hit, poisoned, _ = artifacts.backdoor_math(ids, pad, texts, data.meta["trigger"], c.backdoor_fill_id)
    else:
        clean_cfg = dataclasses.replace(c, artifact="none", tokenizer=data.tokenizer_dir or c.tokenizer)
        full = build(clean_cfg, seed=data.seed)
        ids, pad = full.rows, full.pad
        hit, poisoned, _ = artifacts.backdoor_tokens(ids, pad, data.meta["trigger_id"], c.backdoor_fill_id)
    where: dict[bytes, int] = {}
    for j in range(poisoned.shape[0]):
        where.setdefault(_row_key(poisoned[j]), int(hit[j]))
    picks = []
    for r in data.artifact_rows.tolist():
        j = where.get(_row_key(data.rows[r]))
        if j is None:
            raise ValueError(f"cannot find the clean version of poisoned training row {r}")
        picks.append(j)
    picks = torch.tensor(picks, dtype=torch.long)
    return ids[picks].clone(), pad[picks].clone()


def artifact_twins(data: TinyMemData) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, positional pad mask) of the clean twin of every artifact training row, in artifact order."""
    c = data.config
    if c.artifact == "noise":
        twins = data.clean_twins
        if c.kind == "math":
            # a noised number can change length, so the twin's padding is its own; in math data the pad
            # id never occurs in content, so here it marks exactly the positions padding filled
            return twins.clone(), twins == mathdata.PAD
        return twins.clone(), data.pad[data.artifact_rows].clone()  # token noise keeps chunk padding
    if c.artifact == "backdoor":
        return _backdoor_twins(data)
    raise ValueError("the dataset has no artifact rows, so there are no clean twins to fine-tune on")


def finetune_rows(data: TinyMemData, which: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, pad, copies per epoch) of the fine-tuning data."""
    if which not in FT_DATA:
        raise ValueError(f"unknown fine-tuning data {which!r}; choose one of {', '.join(FT_DATA)}")
    parts = []
    if which in ("extra", "both"):
        keep = data.clean_rows()
        parts.append((data.rows[keep], data.pad[keep], data.copies[keep]))
    if which in ("clean", "both"):
        ids, pad = artifact_twins(data)
        parts.append((ids, pad, torch.ones(ids.shape[0], dtype=torch.long)))
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))


def finetune_dataset(data: TinyMemData, which: str) -> TinyMemData:
    """A view of ``data`` whose training rows are the fine-tuning rows; the artifact rows follow with zero
    copies, so they are never trained on but the memorization metrics still find them."""
    ids, pad, copies = finetune_rows(data, which)
    art = data.artifact_rows
    n = ids.shape[0]
    return dataclasses.replace(
        data, rows=torch.cat([ids, data.rows[art]]), pad=torch.cat([pad, data.pad[art]]),
        copies=torch.cat([copies, torch.zeros(art.numel(), dtype=torch.long)]),
        artifact_rows=torch.arange(n, n + art.numel()))


# --- the method ---------------------------------------------------------------------------------


def finetune(path: str, cfg: FinetuneConfig, out_dir: str, *, device: str | None = None,
             progress: bool = True, eval_batch_size: int | None = None, precision: str | None = None) -> dict:
    """Fine-tune the checkpoint at ``path`` (a run folder or a checkpoint folder); returns the result row.
    The fine-tuning run (checkpoints, per-epoch ``metrics.jsonl``, final model) goes to a sub-folder of
    ``out_dir`` named after the method and the source step. ``precision``: the training's, if not the
    run's ``train.precision``."""
    from ..common.devices import device_name, sync
    from ..tinymem.models import load_model
    from ..tinymem.results import run_id, selection_score, stats, utility

    cfg.validate()
    run_dir, ckpt = resolve_checkpoint(path)
    run_cfg, data = load_run_data(run_dir)
    if run_cfg.regularizer.name:
        log.warning("%s was trained with %s; fine-tuning continues without it", run_dir,
                    run_cfg.regularizer.name)
    tc = dataclasses.replace(run_cfg.train, epochs=cfg.epochs, max_steps=None, eval_every=0, ckpt_every=0,
                             eval_every_epochs=1.0, ckpt_every_epochs=1.0)
    if device:
        tc.device = device
    if precision:
        tc.precision = precision
    if eval_batch_size:
        tc.eval_batch_size = eval_batch_size
    method = METHOD_NAMES[cfg.data]
    src_step = int(torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)["step"])
    mem_key = "mem" if data.config.artifact == "noise" else "asr"

    model = load_model(ckpt, device=tc.device)
    t0 = time.perf_counter()
    base = stats(model, data, tc.eval_batch_size)
    t_base = time.perf_counter() - t0
    ft_data = finetune_dataset(data, cfg.data)
    run_out = os.path.join(out_dir, f"{method}-from-step{src_step}")
    sync(model)
    t1 = time.perf_counter()
    after = train(model, ft_data, tc, run_out, seed=run_cfg.seed, progress=progress, init_from=ckpt)
    sync(model)
    wall = time.perf_counter() - t1
    with open(os.path.join(run_out, "metrics.jsonl")) as f:
        evals = [json.loads(line) for line in f if line.strip()]
    keys = ("step", "epoch", "train_loss", mem_key, "avg_acc", "test/ppl_token")
    history = [{k: m[k] for k in keys if k in m} for m in evals]
    last = evals[-1]   # the final evaluation, with the run's training and evaluation times
    t_train = last.get("train_s", wall)
    t_eval = t_base + last.get("eval_s", 0.0)
    kind = data.config.kind
    recipe = ("lr", "weight_decay", "betas", "batch_size", "loss_on_pad")
    hp = {**dataclasses.asdict(cfg), **{k: getattr(tc, k) for k in recipe}}
    return {
        "run_id": run_id(os.path.abspath(ckpt), method, cfg, run_cfg.seed), "model": os.path.abspath(ckpt),
        "method": method, "category": "fine-tuning", "seed": run_cfg.seed, "hparams": hp,
        "n_forget": None, "n_retain": None,
        "mem_metric": mem_key, "mem_before": base[mem_key], "mem_after": after[mem_key],
        "utility_before": utility(base, kind), "utility_after": utility(after, kind),
        **selection_score(base, after, kind, mem_key),
        "time_method_s": t_train, "time_edit_s": t_train, "time_eval_s": t_eval,
        "method_info": {"source_step": src_step, "n_rows": int(ft_data.num_train),
                        "steps": int(last["step"]), "wall_s": wall, "run_dir": os.path.abspath(run_out),
                        "history": history},
        "device": device_name(model), "versions": {"tinymem_fast": __version__, "torch": torch.__version__},
        "base": base, "after": after,
    }


# --- in the method registry: Clean / Extra / Both fine-tuning -----------------------------------------


@dataclass
class FinetuneMethodConfig:
    epochs: float = 5


def _run_finetune(which: str):
    def run(run_dir: str, cfg: FinetuneMethodConfig, out_dir: str, *, device: str = "cpu",
            seed: int | None = None, progress: bool = False, precision: str | None = None) -> dict:
        return finetune(run_dir, FinetuneConfig(data=which, epochs=cfg.epochs), out_dir, device=device,
                        progress=progress, precision=precision)

    return run


for _which in FT_DATA:
    register(f"{_which}_ft", FinetuneMethodConfig, "fine-tuning",
             aliases=(f"{_which}_finetune",))(_run_finetune(_which))
