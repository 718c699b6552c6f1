"""Training-time regularizers (SPEC 5.2), used through ``TrainConfig.regularizer`` / ``tinymem train
--regularizer NAME``:

* ``spectral_norm`` (reference ``spectral_reg``): + (lambda/2) sum sigma_max^power over weight blocks.
* ``loss_truncation`` (``truncate_loss``): sequences above a running loss percentile get weight 0.
* ``example_tied_dropout``: per-example fixed channel masks on the residual stream.

Each is a :class:`~tinymem_fast.tinymem.training.TrainHook`; :func:`get_regularizer` returns a factory
``(model, train_cfg, seed) -> hook``. :func:`step_overhead` times training steps with and without the
regularizer on copies of the model (same batches, interleaved), and :func:`regularizer_row` turns a
regularized run plus its unregularized baseline into a result row of the unlearning table's schema.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..registry import register
from .example_tied_dropout import ExampleTiedDropout
from .loss_truncation import LossTruncation
from .spectral_norm import SpectralNorm

log = logging.getLogger(__name__)

COST_FILE = "regularizer_cost.json"

# name -> (factory, the TrainConfig fields it reads)
REGULARIZERS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "spectral_norm": (lambda model, c, seed: SpectralNorm(model, c.spectral_lambda, c.spectral_power, seed),
                      ("spectral_lambda", "spectral_power")),
    "loss_truncation": (lambda model, c, seed: LossTruncation(c.trunc_drop_frac, c.trunc_buffer,
                                                              c.trunc_min_count),
                        ("trunc_drop_frac", "trunc_buffer", "trunc_min_count")),
    "example_tied_dropout": (lambda model, c, seed: ExampleTiedDropout(
        model, c.etd_p_fixed, c.etd_p_mem, seed, c.etd_per_row_ids),
                             ("etd_p_fixed", "etd_p_mem", "etd_per_row_ids")),
}
ALIASES = {"spectral_reg": "spectral_norm", "truncate_loss": "loss_truncation",
           "example_tied": "example_tied_dropout", "etd": "example_tied_dropout"}


# --- in the method registry: one settings dataclass each, run = a regularized training run ----------


@dataclass
class SpectralNormConfig:
    spectral_lambda: float = 0.01
    spectral_power: int = 1

    def __post_init__(self):
        if self.spectral_lambda < 0 or self.spectral_power not in (1, 2):
            raise ValueError(f"spectral_norm needs spectral_lambda >= 0 and spectral_power in {{1, 2}}, got "
                             f"{self.spectral_lambda}, {self.spectral_power}")


@dataclass
class LossTruncationConfig:
    trunc_drop_frac: float = 0.4
    trunc_buffer: int = 10000
    trunc_min_count: int = 10000

    def __post_init__(self):
        if not 0 <= self.trunc_drop_frac < 1 or self.trunc_buffer < 1 or self.trunc_min_count < 0:
            raise ValueError("loss_truncation needs 0 <= trunc_drop_frac < 1, trunc_buffer >= 1, "
                             f"trunc_min_count >= 0, got {self.trunc_drop_frac}, {self.trunc_buffer}, "
                             f"{self.trunc_min_count}")


@dataclass
class ExampleTiedDropoutConfig:
    etd_p_fixed: float = 0.2
    etd_p_mem: float = 0.1
    etd_per_row_ids: bool = False

    def __post_init__(self):
        if not (0 < self.etd_p_fixed <= 1 and 0 <= self.etd_p_mem <= 1):
            raise ValueError("example_tied_dropout needs 0 < etd_p_fixed <= 1 and 0 <= etd_p_mem <= 1, got "
                             f"{self.etd_p_fixed}, {self.etd_p_mem}")


def _run_regularized(name: str):
    def run(run_dir: str, cfg, out_dir: str, *, device: str = "cpu", seed: int | None = None,
            progress: bool = False) -> dict:
        """Train the run's configuration again with this regularizer into ``out_dir``; its result row
        compares with the unregularized ``run_dir``."""
        from ...tinymem.training import train_run
        from ..finetune import load_run

        run_cfg, _ = load_run(run_dir)
        run_cfg.train = dataclasses.replace(run_cfg.train, regularizer=name, device=device,
                                            **dataclasses.asdict(cfg))
        if seed is not None:
            run_cfg.seed = seed
        check_config(run_cfg.train)
        train_run(run_cfg, out_dir, preset=f"sweep:{name}", progress=progress)
        return regularizer_row(out_dir, run_dir)

    return run


for _name, _cls, _aliases in (("spectral_norm", SpectralNormConfig, ("spectral_reg",)),
                              ("loss_truncation", LossTruncationConfig, ("truncate_loss",)),
                              ("example_tied_dropout", ExampleTiedDropoutConfig, ("example_tied", "etd"))):
    register(_name, _cls, "regularizer", aliases=_aliases)(_run_regularized(_name))


def canonical_name(name: str) -> str:
    key = ALIASES.get(name, name)
    if key not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r}; choose one of {', '.join(sorted(REGULARIZERS))}")
    return key


def get_regularizer(name: str) -> Callable:
    """Factory ``(model, train_cfg, seed) -> TrainHook`` for a regularizer name (reference names accepted)."""
    return REGULARIZERS[canonical_name(name)][0]


def make_regularizer(name: str, model, cfg, seed: int = 0):
    return get_regularizer(name)(model, cfg, seed)


def check_config(cfg) -> None:
    """Fail before training on a bad name or value (and store the canonical name)."""
    cfg.regularizer = canonical_name(cfg.regularizer)
    bad = []
    if cfg.spectral_lambda < 0 or cfg.spectral_power not in (1, 2):
        bad.append(f"spectral_lambda >= 0 and spectral_power in {{1, 2}} (got {cfg.spectral_lambda}, "
                   f"{cfg.spectral_power})")
    if not 0 <= cfg.trunc_drop_frac < 1 or cfg.trunc_buffer < 1 or cfg.trunc_min_count < 0:
        bad.append(f"0 <= trunc_drop_frac < 1, trunc_buffer >= 1, trunc_min_count >= 0 (got "
                   f"{cfg.trunc_drop_frac}, {cfg.trunc_buffer}, {cfg.trunc_min_count})")
    if not (0 < cfg.etd_p_fixed <= 1 and 0 <= cfg.etd_p_mem <= 1):
        bad.append(f"0 < etd_p_fixed <= 1 and 0 <= etd_p_mem <= 1 (got {cfg.etd_p_fixed}, {cfg.etd_p_mem})")
    if bad:
        raise ValueError("regularizer settings out of range: need " + "; ".join(bad))


def hparams(cfg) -> dict:
    name = canonical_name(cfg.regularizer)
    return {k: getattr(cfg, k) for k in REGULARIZERS[name][1]}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def step_overhead(model, data, cfg, out_dir: str | None = None, seed: int = 0, steps: int = 8,
                  warmup: int = 2) -> dict | None:
    """Median training-step time with and without the regularizer, on two copies of ``model`` fed the
    same first batches of epoch 0, steps interleaved (alternating which goes first) so both see the same
    machine load. Global RNG states are restored, so the real run is unaffected. Cached in
    ``out_dir/regularizer_cost.json``. ``steps = 0`` skips the measurement (None)."""
    from ...tinymem.training import Trainer, epoch_order

    if steps <= 0:
        return None
    path = os.path.join(out_dir, COST_FILE) if out_dir else None
    if path and os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("regularizer") == cfg.regularizer and cached.get("hparams") == hparams(cfg):
            return cached
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    device = torch.device(cfg.device)
    order, copy_ids = epoch_order(data.copies, seed, 0, with_copy_ids=True)
    bs = cfg.batch_size
    n = warmup + steps
    batches = [(order[i * bs:(i + 1) * bs], copy_ids[i * bs:(i + 1) * bs]) for i in range(n)]
    batches = [b for b in batches if b[0].numel()] or [(order[:bs], copy_ids[:bs])]
    plain_cfg = dataclasses.replace(cfg, compile=False, regularizer=None)
    reg_cfg = dataclasses.replace(cfg, compile=False)
    m_plain, m_reg = copy.deepcopy(model).to(device), copy.deepcopy(model).to(device)
    hook = make_regularizer(cfg.regularizer, m_reg, reg_cfg, seed)
    trainers = {"plain": Trainer(m_plain, plain_cfg), "reg": Trainer(m_reg, reg_cfg, [hook])}
    times: dict[str, list[float]] = {"plain": [], "reg": []}
    try:
        for i in range(n):
            idx, cids = batches[i % len(batches)]
            x, pad = data.rows[idx].to(device), data.pad[idx].to(device)
            pair = list(trainers.items())
            for name, tr in (pair if i % 2 == 0 else pair[::-1]):
                _sync(device)
                t = time.perf_counter()
                tr.step(x, pad, i, idx, cids)
                _sync(device)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t)
    finally:
        hook.close()
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    plain, reg = statistics.median(times["plain"]), statistics.median(times["reg"])
    cost = {"regularizer": cfg.regularizer, "hparams": hparams(cfg), "step_ms_plain": 1e3 * plain,
            "step_ms_regularized": 1e3 * reg, "extra_ms_per_step": 1e3 * (reg - plain),
            "overhead_ratio": reg / plain, "timed_steps": steps, "device": str(device)}
    log.info("%s: %.1f ms/step vs %.1f ms unregularized (x%.2f)", cfg.regularizer,
             cost["step_ms_regularized"], cost["step_ms_plain"], cost["overhead_ratio"])
    if path:
        with open(path, "w") as f:
            json.dump(cost, f, indent=1)
    return cost


def _read(run_dir: str, name: str) -> dict:
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} does not exist (is {run_dir!r} a finished `tinymem train` run?)")
    with open(path) as f:
        return json.load(f)


def regularizer_row(run_dir: str, baseline_dir: str) -> dict:
    """A result row (the unlearning pipeline's schema) for a regularized training run: "before" is the
    unregularized baseline run of the same data, "after" the regularized run; the method's time is the
    regularized run's training time (evaluations excluded), with the baseline's and the per-step overhead
    beside it."""
    from ... import __version__
    from ...tinymem.results import selection_score, utility

    info, binfo = _read(run_dir, "run.json"), _read(baseline_dir, "run.json")
    after, base = _read(run_dir, "final_metrics.json"), _read(baseline_dir, "final_metrics.json")
    tcfg = info["config"]["train"]
    if not tcfg.get("regularizer"):
        raise ValueError(f"{run_dir!r} was trained without a regularizer")
    if binfo["config"]["train"].get("regularizer"):
        raise ValueError(f"baseline {baseline_dir!r} was itself trained with "
                         f"{binfo['config']['train']['regularizer']}")
    if info.get("data_fingerprint") != binfo.get("data_fingerprint"):
        raise ValueError("the regularized run and the baseline were trained on different data "
                         f"({info.get('data_fingerprint')} vs {binfo.get('data_fingerprint')})")
    name = canonical_name(tcfg["regularizer"])
    hp = {k: tcfg[k] for k in REGULARIZERS[name][1]}
    hp.update({k: tcfg[k] for k in ("lr", "batch_size", "epochs", "max_steps", "loss_on_pad")})
    kind, artifact = info["config"]["data"]["kind"], info["config"]["data"]["artifact"]
    mem_key = "mem" if artifact == "noise" else "asr"
    seed = info["config"]["seed"]
    blob = json.dumps({"model": os.path.abspath(run_dir), "method": name, "cfg": hp, "seed": seed},
                      sort_keys=True, default=str)
    cost = after.get("regularizer_cost", {})
    device = tcfg.get("device", "cpu")
    if device.startswith("cuda") and torch.cuda.is_available():
        device = torch.cuda.get_device_name(torch.device(device))
    return {
        "run_id": hashlib.sha256(blob.encode()).hexdigest()[:12], "model": os.path.abspath(run_dir),
        "method": name, "category": "regularizer", "seed": seed, "hparams": hp,
        "n_forget": None, "n_retain": None,
        "mem_metric": mem_key, "mem_before": base[mem_key], "mem_after": after[mem_key],
        "utility_before": utility(base, kind), "utility_after": utility(after, kind),
        **selection_score(base, after, kind, mem_key),
        "time_method_s": after.get("train_s"), "time_edit_s": after.get("train_s"),
        "time_eval_s": after.get("eval_s"),
        "method_info": {"baseline": os.path.abspath(baseline_dir), "wall_s": after.get("wall_s"),
                        "baseline_wall_s": base.get("wall_s"),
                        "baseline_train_s": base.get("train_s"),
                        "extra_train_s": (after["train_s"] - base["train_s"])
                        if "train_s" in after and "train_s" in base else None,
                        "steps": after.get("step"), **{k: v for k, v in cost.items() if k != "hparams"}},
        "device": device, "versions": {"tinymem_fast": __version__, "torch": torch.__version__},
        "base": base, "after": after,
    }


__all__ = ["REGULARIZERS", "ExampleTiedDropout", "LossTruncation", "SpectralNorm", "check_config",
           "get_regularizer", "make_regularizer", "regularizer_row", "step_overhead"]
