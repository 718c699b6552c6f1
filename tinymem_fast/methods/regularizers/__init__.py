"""The three training-time regularizers (SPEC 5.2) as mitigation methods: their settings dataclasses
and ``run`` (a regularized training run beside a trained one) in the method registry, and their result
rows (:func:`regularizer_row`: the unlearning table's schema, with the extra time per step). The hooks
themselves are part of the training loop: :mod:`tinymem_fast.tinymem.regularizers`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import torch

from ...tinymem.regularizers import (  # noqa: F401 (the regularizers' public names, here too)
    ALIASES,
    REGULARIZERS,
    SETTINGS,
    ExampleTiedDropout,
    ExampleTiedDropoutConfig,
    LossTruncation,
    LossTruncationConfig,
    RegularizerConfig,
    SpectralNorm,
    SpectralNormConfig,
    canonical_name,
    get_regularizer,
    make_regularizer,
)
from ...tinymem.training import COST_FILE, step_overhead  # noqa: F401
from ..registry import register

log = logging.getLogger(__name__)

# --- in the method registry: one settings dataclass each, run = a regularized training run ----------


def _run_regularized(name: str):
    def run(run_dir: str, cfg, out_dir: str, *, device: str = "cpu", seed: int | None = None,
            progress: bool = False, precision: str | None = None) -> dict:
        """Train the run's configuration again with this regularizer into ``out_dir``; its result row
        compares with the unregularized ``run_dir``. ``precision``: the training's, if not the run's."""
        from ...tinymem.training import train_run
        from ..finetune import load_run

        run_cfg, _ = load_run(run_dir)
        run_cfg.train = dataclasses.replace(run_cfg.train, device=device,
                                            precision=precision or run_cfg.train.precision)
        run_cfg.regularizer = dataclasses.replace(run_cfg.regularizer, name=name, **{name: cfg})
        if seed is not None:
            run_cfg.seed = seed
        run_cfg.regularizer.validate()
        train_run(run_cfg, out_dir, preset=f"sweep:{name}", progress=progress)
        return regularizer_row(out_dir, run_dir)

    return run


for _name, _settings in SETTINGS.items():
    register(_name, _settings, "regularizer",
             aliases=tuple(a for a, n in ALIASES.items() if n == _name))(_run_regularized(_name))


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
    from ...tinymem.presets import from_dict
    from ...tinymem.results import selection_score, utility

    info, binfo = _read(run_dir, "run.json"), _read(baseline_dir, "run.json")
    after, base = _read(run_dir, "final_metrics.json"), _read(baseline_dir, "final_metrics.json")
    run_cfg = from_dict(info["config"], f"{run_dir}/run.json")
    base_reg = from_dict(binfo["config"], f"{baseline_dir}/run.json").regularizer.name
    if not run_cfg.regularizer.name:
        raise ValueError(f"{run_dir!r} was trained without a regularizer")
    if base_reg:
        raise ValueError(f"baseline {baseline_dir!r} was itself trained with {base_reg}")
    if info.get("data_fingerprint") != binfo.get("data_fingerprint"):
        raise ValueError("the regularized run and the baseline were trained on different data "
                         f"({info.get('data_fingerprint')} vs {binfo.get('data_fingerprint')})")
    name, tcfg = run_cfg.regularizer.name, run_cfg.train
    hp = run_cfg.regularizer.hparams()
    hp.update({k: getattr(tcfg, k) for k in ("lr", "batch_size", "epochs", "max_steps", "loss_on_pad")})
    kind, artifact = info["config"]["data"]["kind"], info["config"]["data"]["artifact"]
    mem_key = "mem" if artifact == "noise" else "asr"
    seed = info["config"]["seed"]
    blob = json.dumps({"model": os.path.abspath(run_dir), "method": name, "cfg": hp, "seed": seed},
                      sort_keys=True, default=str)
    cost = after.get("regularizer_cost", {})
    device = tcfg.device
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


__all__ = ["REGULARIZERS", "ExampleTiedDropout", "LossTruncation", "RegularizerConfig", "SpectralNorm",
           "get_regularizer", "make_regularizer", "regularizer_row", "step_overhead"]
