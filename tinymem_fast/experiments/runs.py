"""Locating what a mitigation starts from: a `tinymem train` run, any of its checkpoints, or a bare model.

A run folder holds ``run.json`` (its config and the fingerprint of the data it was trained on),
``final/`` and ``checkpoints/step-NNNNNNNNN/``. Every model folder of a run is traced back to its
``run.json``, and the data rebuilt for it must have the recorded fingerprint: a mitigation measured on
other data than the model saw would report a memorization it never had.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from ..tinymem.training import CKPT_RE, list_checkpoints

FINAL = "final"


@dataclass(frozen=True)
class Checkpoint:
    run_dir: str | None   # the `tinymem train` folder (absolute), None for a bare model folder
    path: str             # the model folder (absolute)
    label: str            # "final", "step-000000150", or a bare folder's name

    @property
    def step(self) -> int | None:
        m = CKPT_RE.match(self.label)
        return int(m.group(1)) if m else None


def _is_run(d: str) -> bool:
    return os.path.isfile(os.path.join(d, "run.json"))


def locate(path: str) -> Checkpoint:
    """A run folder (its final model), its ``final/``, one of its ``checkpoints/step-*`` folders, or a bare
    Hugging Face model folder (no run: ``run_dir`` None)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} does not exist (pass a `tinymem train` folder, one of its "
                                "checkpoints/step-* folders, or a model folder)")
    path = os.path.abspath(path)
    parent, name = os.path.split(path.rstrip(os.sep))
    if _is_run(path):
        final = os.path.join(path, FINAL)
        if not os.path.isdir(final):
            cks = list_checkpoints(path)
            hint = f"; pass one of its checkpoints, e.g. {cks[-1][1]}" if cks else ""
            raise FileNotFoundError(f"{path!r} has no final/ model (training did not finish){hint}")
        return Checkpoint(path, final, FINAL)
    if name == FINAL and _is_run(parent):
        return Checkpoint(parent, path, FINAL)
    grand = os.path.dirname(parent)
    if CKPT_RE.match(name) and os.path.basename(parent) == "checkpoints" and _is_run(grand):
        return Checkpoint(grand, path, name)
    return Checkpoint(None, path, name)


def _one(run_dir: str, item: str, saved: dict[int, str]) -> Checkpoint:
    if item == FINAL:
        return locate(run_dir)
    m = re.fullmatch(r"(?:step-?)?(\d+)", item)
    if not m:
        raise ValueError(f"--checkpoints: {item!r} is not a step number, step-NNN, `final` or `all`")
    step = int(m.group(1))
    if step not in saved:
        have = ", ".join(str(s) for s in sorted(saved)) or "none"
        raise ValueError(f"{run_dir!r} has no checkpoint at step {step} (saved steps: {have})")
    return Checkpoint(run_dir, os.path.abspath(saved[step]), os.path.basename(saved[step]))


def run_checkpoints(run_dir: str, which: str = FINAL) -> list[Checkpoint]:
    """The model folders of a run that ``which`` names: ``final``, ``all`` (every saved checkpoint, in
    step order) or a comma-separated list of steps (``500,1500``, ``step-000000500``) and ``final``."""
    run_dir = os.path.abspath(run_dir)
    if not _is_run(run_dir):
        raise ValueError(f"{run_dir!r} is not a `tinymem train` run folder (no run.json)")
    saved = dict(list_checkpoints(run_dir))
    items = [w.strip() for w in str(which).split(",") if w.strip()]
    if not items:
        raise ValueError("--checkpoints names no checkpoint (use final, all, or steps like 500,1500)")
    if items == ["all"]:
        if not saved:
            raise ValueError(f"{run_dir!r} holds no checkpoints/step-* folders")
        return [Checkpoint(run_dir, os.path.abspath(p), os.path.basename(p))
                for _, p in sorted(saved.items())]
    out = [_one(run_dir, it, saved) for it in items]
    return list(dict.fromkeys(out))


def run_info(run_dir: str) -> dict:
    path = os.path.join(run_dir, "run.json")
    try:
        with open(path) as f:
            info = json.load(f)
        info["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from None
    return info


def run_config(run_dir: str, preset: str | None = None, sets: list[str] | None = None):
    """The RunConfig of a run: its run.json (or ``preset``, to be checked against it) plus ``sets``."""
    from ..tinymem.presets import apply_overrides, from_dict, get_preset

    cfg = get_preset(preset) if preset else from_dict(run_info(run_dir)["config"],
                                                       os.path.join(run_dir, "run.json"))
    return apply_overrides(cfg, sets)


def run_data(run_dir: str, cfg, what: str = "the settings given"):
    """The run's dataset rebuilt from ``cfg`` with the run's own tokenizer; refused in one line unless it
    is the data the run was trained on (same fingerprint)."""
    from ..tinymem.data.dataset import build_for_run

    return build_for_run(run_dir, cfg.data, cfg.seed, run_info(run_dir).get("data_fingerprint"), what)
