"""Training loop: AdamW on the causal-LM loss, evaluation at intervals, atomic checkpoints, exact resume.

The data order of epoch ``e`` is a permutation seeded by (seed, e), so a run resumed from the checkpoint
at step ``s`` replays exactly the batches an uninterrupted run would have seen; together with the saved
optimizer state this makes a killed-and-restarted run end on the same weights.

Regularizers plug in as hooks (:class:`TrainHook`): they may add to the loss or reweight sequences,
without flags threaded through the loop. ``TrainConfig.regularizer`` names one
(:mod:`tinymem_fast.methods.regularizers`); its state is saved in every checkpoint, so resume stays exact.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .memorization import memorization_stats
from .metrics import evaluate_tests
from .models import build_model, save_model
from .models.mixed_precision import autocast, check_precision
from .models.tinymem import save_pretrained_quietly

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
    # regularizers (SPEC 5.2): spectral_norm | loss_truncation | example_tied_dropout | None
    regularizer: str | None = None
    spectral_lambda: float = 0.01
    spectral_power: int = 1
    trunc_drop_frac: float = 0.4
    trunc_buffer: int = 10000
    trunc_min_count: int = 10000
    etd_p_fixed: float = 0.2
    etd_p_mem: float = 0.1
    etd_per_row_ids: bool = False     # duplicate copies get their own masks (default: one per sequence)
    reg_timing_steps: int = 8         # steps timed with and without the regularizer (its cost); 0 = skip

    def validate(self) -> None:
        check_precision(self.precision)
        if self.regularizer is not None:
            from .methods.regularizers import check_config

            check_config(self)


class TrainHook:
    """Extension point for regularizers: called around each step. ``row_ids`` are the batch's indices into
    ``data.rows`` (duplicate copies share one), ``copy_ids`` number every copy separately."""

    def begin_step(self, step: int, row_ids: torch.Tensor | None, copy_ids: torch.Tensor | None) -> None:
        return None

    def per_sequence_weights(self, step: int, seq_loss: torch.Tensor) -> torch.Tensor | None:
        return None

    def extra_loss(self, model, step: int) -> torch.Tensor | None:
        return None

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly (saved in each checkpoint)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None

    def close(self) -> None:
        """Detach from the model (module hooks)."""
        return None


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


def token_loss(model, x: torch.Tensor, pad: torch.Tensor, loss_on_pad: bool):
    """Per-sequence mean CE over counted targets, plus the counts (pads skipped unless loss_on_pad)."""
    logits = model(x).logits[:, :-1]
    tgt = x[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1),
                         reduction="none").view(tgt.shape)
    counted = torch.ones_like(tgt, dtype=torch.bool) if loss_on_pad else ~pad[:, 1:]
    ce = ce * counted
    n = counted.sum(1)
    return ce.sum(1) / n.clamp(min=1), n


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
    ck = os.path.join(out_dir, "checkpoints")
    os.makedirs(ck, exist_ok=True)
    final = os.path.join(ck, f"step-{step:09d}")
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=ck)
    try:
        save_pretrained_quietly(model, tmp)
        torch.save({"optimizer": opt.state_dict(), "step": step, "epoch": epoch,
                    "hooks": [h.state_dict() for h in hooks]}, os.path.join(tmp, "trainer_state.pt"))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _load_checkpoint(path: str, model, opt, hooks=()) -> int:
    from safetensors.torch import load_file

    state = load_file(os.path.join(path, "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied output embedding is stored once
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise ValueError(f"checkpoint {path} does not match the model (missing {missing}, "
                         f"unexpected {unexpected})")
    ts = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)
    opt.load_state_dict(ts["optimizer"])
    states = ts.get("hooks", [])
    if hooks and len(states) != len(hooks):
        raise ValueError(f"checkpoint {path} holds {len(states)} regularizer states, the run has "
                         f"{len(hooks)}; resume with the same regularizer or start over (--no-resume)")
    for h, st in zip(hooks, states, strict=False):
        h.load_state_dict(st)
    return int(ts["step"])


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
        with autocast(self.model, self.cfg.precision, x.device.type):
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
          hooks: list[TrainHook] | None = None, progress: bool = True, init_from: str | None = None) -> dict:
    """Train ``model`` on ``data``; returns the final evaluation. Checkpoints and ``metrics.jsonl`` go to
    ``out_dir``; the final model to ``out_dir/final``. ``init_from``: a checkpoint whose weights and
    optimizer state start the run when ``out_dir`` has none to resume (fine-tuning)."""
    os.makedirs(out_dir, exist_ok=True)
    device = torch.device(cfg.device)
    model.to(device).train()
    own_hooks = []
    cost = None
    if cfg.regularizer:
        from .methods.regularizers import make_regularizer, step_overhead

        cost = step_overhead(model, data, cfg, out_dir, seed, steps=cfg.reg_timing_steps)
        own_hooks = [make_regularizer(cfg.regularizer, model, cfg, seed)]
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
    step = 0
    if resume and (cks := list_checkpoints(out_dir)):
        step = _load_checkpoint(cks[-1][1], model, opt, hooks)
        log.info("resumed from %s (step %d)", cks[-1][1], step)
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


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)


def train_run(cfg, out: str, *, preset: str = "custom", resume: bool = True, progress: bool = True) -> dict:
    """A whole `tinymem train` run from a RunConfig: data (built into ``out``), run.json, model, training
    (resuming from the newest checkpoint), final_metrics.json. Returns the final metrics."""
    from .data.dataset import build

    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    data = build(cfg.data, seed=cfg.seed, workdir=out)
    run_info = {"preset": preset, "config": cfg.to_dict(), "data_fingerprint": data.fingerprint(),
                "data_meta": data.meta}
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump(run_info, f, indent=1)
    model = build_model_for(data, cfg.model, seed=cfg.seed)
    result = train(model, data, cfg.train, out, seed=cfg.seed, resume=resume, progress=progress)
    result["wall_s"] = time.perf_counter() - t0
    with open(os.path.join(out, "final_metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result
