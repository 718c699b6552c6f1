"""Training loop: AdamW on the causal-LM loss, evaluation at intervals, atomic checkpoints, exact resume.

The data order of epoch ``e`` is a permutation seeded by (seed, e), so a run resumed from the checkpoint
at step ``s`` replays exactly the batches an uninterrupted run would have seen; together with the saved
optimizer state this makes a killed-and-restarted run end on the same weights.

Regularizers plug in as hooks (:class:`TrainHook`): they may add to the loss or reweight sequences,
without flags threaded through the loop. A run config's ``regularizer`` section
(:class:`~tinymem_fast.tinymem.regularizers.RegularizerConfig`) names one; its state is saved in every
checkpoint, so resume stays exact.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..common import atomic
from ..common.devices import sync
from ..common.validation import at_least, check_device, parse_device
from ..integrations.mixed_precision import autocast, check_precision
from .memorization import memorization_stats
from .metrics import evaluate_tests, plain_head
from .models import build_model, save_model
from .models.tinymem import save_pretrained_quietly
from .regularizers import RegularizerConfig, TrainHook, make_regularizer, upgrade_tree

log = logging.getLogger(__name__)
CKPT_RE = re.compile(r"^step-(\d{9})$")


@dataclass
class TrainConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    batch_size: int = 128
    epochs: float = 1.0
    max_steps: int | None = None      # stop early (overrides epochs when smaller)
    eval_every: int = 0               # steps; 0 = only at the end
    ckpt_every: int = 0               # steps; 0 = only at the end
    eval_every_epochs: float = 0.0    # alternative to eval_every, in epochs
    ckpt_every_epochs: float = 0.0    # alternative to ckpt_every, in epochs
    keep_checkpoints: int = 0         # 0 = keep all
    loss_on_pad: bool = False
    eval_batch_size: int = 256
    device: str = "cpu"
    compile: bool = False             # torch.compile the loss (pays off on GPUs, where steps are tiny)
    # "bf16": matmuls in bfloat16 under autocast, float32 weights/optimizer/loss (models/mixed_precision.py)
    precision: str = "fp32"

    def validate(self) -> None:
        check_precision(self.precision)
        parse_device(self.device, "train.device")  # presence is checked when a run starts on it
        at_least("train", self, 1, "batch_size", "eval_batch_size")
        at_least("train", self, 1, "max_steps", optional=True)
        at_least("train", self, 0, "weight_decay", "eval_every", "ckpt_every", "eval_every_epochs",
                 "ckpt_every_epochs", "keep_checkpoints")
        if not (isinstance(self.epochs, int | float) and self.epochs > 0):
            raise ValueError(f"train.epochs must be > 0, got {self.epochs!r}")
        if not (isinstance(self.lr, int | float) and self.lr > 0):
            raise ValueError(f"train.lr must be > 0, got {self.lr!r}")
        if not (isinstance(self.betas, list | tuple) and len(self.betas) == 2
                and all(isinstance(b, int | float) and 0 <= b < 1 for b in self.betas)):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {self.betas!r}")


def build_model_for(data, model_cfg, seed: int = 0):
    """A fresh TinyMem model sized for ``data``. The config names BOS/EOS but no pad token: pads are
    handled by positional masks, and a pad id would make every forward warn about missing attention masks."""
    from .data import math as mathdata

    if data.config.kind == "math":
        ids = dict(bos_id=mathdata.BOS, eos_id=mathdata.EOS)
    else:
        ids = dict(bos_id=data.pad_id, eos_id=data.pad_id)
    vocab = data.vocab_size
    if model_cfg.vocab_size is not None:
        if model_cfg.vocab_size < vocab:
            raise ValueError(f"model.vocab_size {model_cfg.vocab_size} is smaller than the data's vocabulary "
                             f"({vocab} tokens)")
        vocab = model_cfg.vocab_size
    return build_model(model_cfg, vocab, data.config.max_ctx, seed=seed, **ids)


# heads with at least this many rows take the fused linear cross-entropy in token_loss: at GPT-2's 50,257
# the [B, T, V] float32 logits (and their log-softmax and gradient) dominate a small model's step memory
FUSED_CE_MIN_VOCAB = 16384


def token_loss(model, x: torch.Tensor, pad: torch.Tensor, loss_on_pad: bool, fused: bool | None = None):
    """Per-sequence mean CE over counted targets, plus the counts (pads skipped unless loss_on_pad).

    ``fused``: compute the CE from the final hidden states with the fused linear cross-entropy
    (:func:`~tinymem_fast.ops.fused_linear_cross_entropy`, no ``[B, T, V]`` logits; same values within
    float rounding); None = when the head has at least ``FUSED_CE_MIN_VOCAB`` rows and is a plain linear
    head over the base model, False = never, True = always (a model without such a head raises).
    """
    tgt = x[:, 1:]
    counted = torch.ones_like(tgt, dtype=torch.bool) if loss_on_pad else ~pad[:, 1:]
    parts = plain_head(model) if fused is not False else None
    if fused and parts is None:
        raise ValueError(f"token_loss(fused=True): {type(model).__name__} has no plain linear LM head over "
                         "its base model (or a hook/logit transform on it); use fused=None or False")
    if parts is not None and (fused or parts[1].weight.shape[0] >= FUSED_CE_MIN_VOCAB):
        ce = _fused_token_ce(parts, x, tgt, counted)
    else:
        logits = model(x).logits[:, :-1]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1),
                             reduction="none").view(tgt.shape)
    ce = ce * counted
    n = counted.sum(1)
    return ce.sum(1) / n.clamp(min=1), n


def _fused_token_ce(parts, x: torch.Tensor, tgt: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    from ..ops.linear_cross_entropy import fused_linear_cross_entropy

    body, head = parts
    out = body(input_ids=x, use_cache=False)
    hidden = (out[0] if isinstance(out, tuple) else out.last_hidden_state)[:, :-1]
    weight, bias = head.weight, head.bias
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        # what autocast does to the head's F.linear: both sides in its dtype, so the logits round the same
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    # the model ran already: a diverged one must give the NaN/inf loss the callers check for, not a raise
    return fused_linear_cross_entropy(hidden, weight, tgt.masked_fill(~counted, -100), bias,
                                      reduction="none", validate=False)


def epoch_order(copies: torch.Tensor, seed: int, epoch: int, with_copy_ids: bool = False):
    """Shuffled row indices of one epoch; with ``with_copy_ids`` also each entry's copy number (its place
    in the unshuffled list of copies, the same every epoch)."""
    idx = torch.repeat_interleave(torch.arange(copies.numel()), copies)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(idx.numel(), generator=gen)
    return (idx[perm], perm) if with_copy_ids else idx[perm]


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    ck = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(ck):
        return []
    found = []
    for name in os.listdir(ck):
        m = CKPT_RE.match(name)
        if m and os.path.exists(os.path.join(ck, name, "trainer_state.pt")):
            found.append((int(m.group(1)), os.path.join(ck, name)))
    return sorted(found)


def _save_checkpoint(out_dir: str, model, opt, step: int, epoch: int, hooks=()) -> str:
    final = os.path.join(out_dir, "checkpoints", f"step-{step:09d}")
    with atomic.folder(final) as tmp:
        save_pretrained_quietly(model, tmp)
        torch.save({"optimizer": opt.state_dict(), "step": step, "epoch": epoch,
                    "hooks": [h.state_dict() for h in hooks]}, os.path.join(tmp, "trainer_state.pt"))
    return final


class CheckpointMismatch(ValueError):
    """A readable checkpoint of another model or regularizer than the run's."""


def _load_checkpoint(path: str, model, opt, hooks=()) -> int:
    """Load a checkpoint into ``model``, ``opt`` and ``hooks``. Both files are read completely before
    anything is changed, so a checkpoint that fails to read leaves the run as it was."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(path, "model.safetensors"))
    ts = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)
    step = int(ts["step"])
    names = set(model.state_dict())
    missing = sorted(names - set(state) - {"lm_head.weight"})  # a tied output embedding is stored once
    unexpected = sorted(set(state) - names)
    shapes = sorted(k for k in set(state) & names if state[k].shape != model.state_dict()[k].shape)
    if missing or unexpected or shapes:
        raise CheckpointMismatch(f"checkpoint {path} is of another model (missing {missing[:3]}, unexpected "
                                 f"{unexpected[:3]}, other shapes {shapes[:3]}); start over with --no-resume")
    states = ts.get("hooks", [])
    if hooks and len(states) != len(hooks):
        raise CheckpointMismatch(f"checkpoint {path} holds {len(states)} regularizer states, the run has "
                                 f"{len(hooks)}; resume with the same regularizer or start over "
                                 "(--no-resume)")
    model.load_state_dict(state, strict=False)
    opt.load_state_dict(ts["optimizer"])
    for h, st in zip(hooks, states, strict=False):
        h.load_state_dict(st)
    return step


def _resume_newest(out_dir: str, total: int, model, opt, hooks) -> int:
    """Resume from the newest checkpoint at or before step ``total`` that reads back whole; a corrupt one
    (a disk that filled, a copy cut short) is skipped with a warning. Returns the step (0: none)."""
    for step, path in reversed([c for c in list_checkpoints(out_dir) if c[0] <= total]):
        try:
            got = _load_checkpoint(path, model, opt, hooks)
        except CheckpointMismatch:
            raise
        except Exception as exc:  # noqa: BLE001 - any read failure means this checkpoint is unusable
            log.warning("checkpoint %s is unreadable (%s: %s); trying the one before it", path,
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            continue
        if got != step:
            log.warning("checkpoint %s says step %d; trying the one before it", path, got)
            continue
        return step
    return 0


def _truncate_history(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def evaluate(model, data, batch_size: int) -> dict:
    was = model.training
    model.eval()
    out = evaluate_tests(model, data.test, batch_size)
    out.update(memorization_stats(model, data, batch_size))
    model.train(was)
    return out


class Trainer:
    """One optimizer step at a time: loss (pad-masked unless ``loss_on_pad``), hooks, AdamW."""

    def __init__(self, model, cfg: TrainConfig, hooks: list[TrainHook] | None = None):
        check_precision(cfg.precision)
        self.model, self.cfg, self.hooks = model, cfg, hooks or []
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     betas=tuple(cfg.betas))
        loss_fn = lambda x, pad: token_loss(self.model, x, pad, cfg.loss_on_pad)  # noqa: E731
        self._loss = torch.compile(loss_fn) if cfg.compile else loss_fn

    def step(self, x: torch.Tensor, pad: torch.Tensor, step: int = 0, row_ids: torch.Tensor | None = None,
             copy_ids: torch.Tensor | None = None) -> torch.Tensor:
        self.model.train()
        for h in self.hooks:
            h.begin_step(step, row_ids, copy_ids)
        if not self.cfg.loss_on_pad and not self.cfg.compile:
            # Right padding + causal attention: positions after the longest content never influence a
            # counted target, so dropping them changes nothing but the work done.
            width = int((~pad).sum(1).max())
            x, pad = x[:, :width], pad[:, :width]
        with autocast(self.model, self.cfg.precision, x.device.type, fused_attention=True):
            seq_loss, counts = self._loss(x, pad)
        weights = None
        for h in self.hooks:
            w = h.per_sequence_weights(step, seq_loss.detach())
            if w is not None:
                weights = w if weights is None else weights * w
        if weights is not None:
            loss = (seq_loss * weights).mean()
        else:
            loss = (seq_loss * counts).sum() / counts.sum().clamp(min=1)
        for h in self.hooks:
            extra = h.extra_loss(self.model, step)
            if extra is not None:
                loss = loss + extra
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


def train(model, data, cfg: TrainConfig, out_dir: str, *, seed: int = 0, resume: bool = True,
          hooks: list[TrainHook] | None = None, progress: bool = True, init_from: str | None = None,
          regularizer: RegularizerConfig | None = None) -> dict:
    """Train ``model`` on ``data``; returns the final evaluation. Checkpoints and ``metrics.jsonl`` go to
    ``out_dir``; the final model to ``out_dir/final``. ``init_from``: a checkpoint whose weights and
    optimizer state start the run when ``out_dir`` has none to resume (fine-tuning). ``regularizer``:
    the run's regularizer (its cost per step is measured first, then it joins ``hooks``)."""
    os.makedirs(out_dir, exist_ok=True)
    device = check_device(cfg.device, "train.device")
    model.to(device).train()
    own_hooks = []
    cost = None
    if regularizer is not None and regularizer.name:
        regularizer.validate()
        cost = step_overhead(model, data, cfg, regularizer, out_dir, seed, steps=regularizer.timing_steps)
        own_hooks = [make_regularizer(regularizer.name, model, regularizer.settings(), seed)]
    hooks = list(hooks or []) + own_hooks
    trainer = Trainer(model, cfg, hooks)
    opt = trainer.opt
    n_train = data.num_train
    spe = math.ceil(n_train / cfg.batch_size)
    total = math.ceil(cfg.epochs * spe)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    eval_every = cfg.eval_every or _epochs_to_steps(cfg.eval_every_epochs, spe)
    ckpt_every = cfg.ckpt_every or _epochs_to_steps(cfg.ckpt_every_epochs, spe)
    hist_path = os.path.join(out_dir, "metrics.jsonl")
    step = _resume_newest(out_dir, total, model, opt, hooks) if resume else 0
    if step:
        log.info("resumed from step %d", step)
        _truncate_history(hist_path, step)
    else:
        if os.path.exists(hist_path):
            os.remove(hist_path)
        if init_from:
            _load_checkpoint(init_from, model, opt)  # the step counter restarts; AdamW's own counts go on
            log.info("initialized from %s", init_from)

    def record(metrics: dict) -> None:
        with open(hist_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")

    order, copy_ids, order_epoch = None, None, -1
    t0 = time.perf_counter()
    eval_s = 0.0
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    last_eval: dict = {}
    while step < total:
        epoch, b = divmod(step, spe)
        if epoch != order_epoch:
            (order, copy_ids), order_epoch = epoch_order(data.copies, seed, epoch, with_copy_ids=True), epoch
        sl = slice(b * cfg.batch_size, (b + 1) * cfg.batch_size)
        idx = order[sl]
        loss = trainer.step(data.rows[idx].to(device), data.pad[idx].to(device), step, idx, copy_ids[sl])
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", epoch=f"{step / spe:.2f}")
        is_last = step == total
        if (eval_every and step % eval_every == 0) or is_last:
            te = time.perf_counter()
            last_eval = {"step": step, "epoch": step / spe, "train_loss": loss.item(),
                         "elapsed_s": te - t0, "train_s": te - t0 - eval_s,
                         **evaluate(model, data, cfg.eval_batch_size)}
            eval_s += time.perf_counter() - te
            last_eval["eval_s"] = eval_s
            if cost:
                last_eval["regularizer_cost"] = cost
            record(last_eval)
            bar.write(_summary(last_eval))
        if (ckpt_every and step % ckpt_every == 0) or is_last:
            _save_checkpoint(out_dir, model, opt, step, epoch, hooks)
            _prune(out_dir, cfg.keep_checkpoints)
    bar.close()
    save_model(model, os.path.join(out_dir, "final"))
    if not last_eval:  # resumed at the very end
        last_eval = {"step": step, **evaluate(model, data, cfg.eval_batch_size)}
        if cost:
            last_eval["regularizer_cost"] = cost
    for h in own_hooks:
        h.close()
    return last_eval


def _epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    return max(1, round(epochs * steps_per_epoch)) if epochs else 0


def _prune(out_dir: str, keep: int) -> None:
    if keep <= 0:
        return
    for _, path in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def _summary(m: dict) -> str:
    names = ("avg_acc", "acc7", "test/acc", "test/ppl_token", "mem", "avg_perc_mem", "asr")
    keys = [k for k in names if k in m]
    acc_keys = [k for k in m if k.endswith("/acc")]
    parts = [f"step {m['step']}", f"loss {m.get('train_loss', float('nan')):.4f}"]
    for k in keys:
        parts.append(f"{k} {m[k]:.3f}")
    if "avg_acc" not in m and acc_keys:
        parts.append(f"{acc_keys[0]} {m[acc_keys[0]]:.3f}")
    return " | ".join(parts)



# Settings a resumed run may change: they decide how long it runs, where, and what it records, not what
# any step computes (the data order of each epoch is seeded by the epoch alone).
RESUMABLE = {"description", "train.max_steps", "train.epochs", "train.eval_every", "train.ckpt_every",
             "train.eval_every_epochs", "train.ckpt_every_epochs", "train.keep_checkpoints",
             "train.eval_batch_size", "train.device", "train.compile", "regularizer.timing_steps",
             "protocol.retain_size", "protocol.utility_metric", "protocol.mem_metric"}
# settings added after runs were recorded without them, with the value those runs had in effect
ADDED = {"data.window_rule": "content"}
# what a run folder holds besides its data cache; --no-resume removes all of it
RUN_OUTPUTS = ("checkpoints", "final", "metrics.jsonl", "final_metrics.json", "run.json")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _claim_run_folder(out: str, config: dict, resume: bool) -> dict | None:
    """Make ``out`` this configuration's run folder before any work: with ``resume``, a folder that holds
    another configuration's run is refused in one line; without, the old run's outputs are removed.
    Returns the old run.json when the folder holds a run to resume (else None)."""
    path = os.path.join(out, "run.json")
    if not resume:
        for name in RUN_OUTPUTS:
            p = os.path.join(out, name)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
        return None
    has_run = bool(list_checkpoints(out)) or os.path.isdir(os.path.join(out, "final"))
    if not os.path.exists(path):
        if has_run:
            raise ValueError(f"{out} holds checkpoints but no run.json, so they cannot be matched to this "
                             "configuration: start over with --no-resume, or choose another --out")
        return None
    try:
        with open(path) as f:
            old = json.load(f)
        old_cfg = _flat(upgrade_tree(old["config"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is unreadable ({type(exc).__name__}: {exc}): start over with --no-resume, "
                         "or choose another --out") from None
    if not has_run:
        return None  # a record without checkpoints or model: nothing to resume, nothing to protect
    new_cfg = _flat(config)
    changed = [k for k in sorted(set(old_cfg) | set(new_cfg))
               if k not in RESUMABLE
               and old_cfg.get(k, ADDED.get(k, "<unset>")) != new_cfg.get(k, ADDED.get(k, "<unset>"))]
    if changed:
        what = ", ".join(f"{k} {old_cfg.get(k, '<unset>')!r} -> {new_cfg.get(k, '<unset>')!r}"
                         for k in changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise ValueError(f"{out} holds a run of another configuration ({what}); resuming it under these "
                         "settings would mix the two: start over with --no-resume, or choose another --out")
    return old


def train_run(cfg, out: str, *, preset: str = "custom", resume: bool = True, progress: bool = True) -> dict:
    """A whole `tinymem train` run from a RunConfig: data (built into ``out``), run.json, model, training
    (resuming from the newest checkpoint of the same configuration), final_metrics.json. Returns the final
    metrics."""
    from .data.dataset import build

    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    old = _claim_run_folder(out, cfg.to_dict(), resume)
    data = build(cfg.data, seed=cfg.seed, workdir=out)
    fp = data.fingerprint()
    if old is not None and old.get("data_fingerprint") not in (None, fp):
        raise ValueError(f"{out} holds a run trained on other data (fingerprint "
                         f"{old['data_fingerprint'][:12]} vs {fp[:12]}: a changed corpus or tokenizer file): "
                         "start over with --no-resume, or choose another --out")
    run_info = {"preset": preset, "config": cfg.to_dict(), "data_fingerprint": fp, "data_meta": data.meta}
    atomic.write_json(os.path.join(out, "run.json"), run_info)
    model = build_model_for(data, cfg.model, seed=cfg.seed)
    result = train(model, data, cfg.train, out, seed=cfg.seed, resume=resume, progress=progress,
                   regularizer=cfg.regularizer)
    result["wall_s"] = time.perf_counter() - t0
    atomic.write_json(os.path.join(out, "final_metrics.json"), result)
    return result


# --- what a regularizer costs per step ------------------------------------------------------------

COST_FILE = "regularizer_cost.json"


def step_overhead(model, data, cfg: TrainConfig, reg: RegularizerConfig, out_dir: str | None = None,
                  seed: int = 0, steps: int = 8, warmup: int = 2) -> dict | None:
    """Median training-step time with and without the regularizer, on two copies of ``model`` fed the
    same first batches of epoch 0, steps interleaved (alternating which goes first) so both see the same
    machine load. Global RNG states are restored, so the real run is unaffected. Cached in
    ``out_dir/regularizer_cost.json``. ``steps = 0`` skips the measurement (None)."""
    if steps <= 0:
        return None
    path = os.path.join(out_dir, COST_FILE) if out_dir else None
    if path and os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("regularizer") == reg.name and cached.get("hparams") == reg.hparams():
            return cached
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    device = torch.device(cfg.device)
    order, copy_ids = epoch_order(data.copies, seed, 0, with_copy_ids=True)
    bs = cfg.batch_size
    n = warmup + steps
    batches = [(order[i * bs:(i + 1) * bs], copy_ids[i * bs:(i + 1) * bs]) for i in range(n)]
    batches = [b for b in batches if b[0].numel()] or [(order[:bs], copy_ids[:bs])]
    step_cfg = dataclasses.replace(cfg, compile=False)
    m_plain, m_reg = copy.deepcopy(model).to(device), copy.deepcopy(model).to(device)
    hook = make_regularizer(reg.name, m_reg, reg.settings(), seed)
    trainers = {"plain": Trainer(m_plain, step_cfg), "reg": Trainer(m_reg, step_cfg, [hook])}
    times: dict[str, list[float]] = {"plain": [], "reg": []}
    try:
        for i in range(n):
            idx, cids = batches[i % len(batches)]
            x, pad = data.rows[idx].to(device), data.pad[idx].to(device)
            pair = list(trainers.items())
            for name, tr in (pair if i % 2 == 0 else pair[::-1]):
                sync(device)
                t = time.perf_counter()
                tr.step(x, pad, i, idx, cids)
                sync(device)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t)
    finally:
        hook.close()
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    t_plain, t_reg = statistics.median(times["plain"]), statistics.median(times["reg"])
    cost = {"regularizer": reg.name, "hparams": reg.hparams(), "step_ms_plain": 1e3 * t_plain,
            "step_ms_regularized": 1e3 * t_reg, "extra_ms_per_step": 1e3 * (t_reg - t_plain),
            "overhead_ratio": t_reg / t_plain, "timed_steps": steps, "device": str(device)}
    log.info("%s: %.1f ms/step vs %.1f ms unregularized (x%.2f)", reg.name,
             cost["step_ms_regularized"], cost["step_ms_plain"], cost["overhead_ratio"])
    if path:
        with open(path, "w") as f:
            json.dump(cost, f, indent=1)
    return cost
