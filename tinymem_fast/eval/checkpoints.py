"""Memorization over training: score the same sequences under every saved checkpoint of a model.

Checkpoints are Hugging Face model folders; a `tinymem train` run folder expands to its
``checkpoints/step-N`` folders (and ``final``). Each is scored by one teacher-forced pass
(:func:`tinymem_fast.eval.scoring.score_exact`): % exactly memorized and the mean share of suffix tokens
predicted, per checkpoint, written as JSON Lines with a plot.
"""

from __future__ import annotations

import json
import os
import re
import time

import torch
from tqdm.auto import tqdm

from ..common.optional import pyplot

STEP_RE = re.compile(r"(?:step|checkpoint)[-_]?(\d+)$")


def expand_checkpoints(paths: list[str]) -> list[tuple[int | None, str]]:
    """(training step or None, folder) for every checkpoint, ordered by step (unknown steps last, in the
    order given). A run folder contributes its checkpoints/step-* folders."""
    found: list[tuple[int | None, str]] = []
    for p in paths:
        if not os.path.isdir(p):
            raise FileNotFoundError(f"checkpoint folder {p!r} does not exist")
        sub = os.path.join(p, "checkpoints")
        if os.path.isdir(sub) and not os.path.exists(os.path.join(p, "config.json")):
            for name in os.listdir(sub):
                m = STEP_RE.search(name)
                if m and os.path.exists(os.path.join(sub, name, "config.json")):
                    found.append((int(m.group(1)), os.path.join(sub, name)))
            continue
        if not os.path.exists(os.path.join(p, "config.json")):
            raise ValueError(f"{p!r} is neither a model folder (no config.json) nor a run with checkpoints/")
        m = STEP_RE.search(os.path.basename(os.path.normpath(p)))
        found.append((int(m.group(1)) if m else None, p))
    if not found:
        raise ValueError("no checkpoints found")
    known = sorted((s, p) for s, p in found if s is not None)
    return known + [(s, p) for s, p in found if s is None]


def score_checkpoints(checkpoints: list[tuple[int | None, str]], ids: torch.Tensor, prefix_len: int,
                      suffix_len: int, *, dtype: str = "float32", device: str | None = None,
                      batch_size: int = 64, progress: bool = True) -> list[dict]:
    from ..integrations.loading import load_causal_lm
    from ..ops.greedy import split_causal_lm
    from .scoring import score_exact, validate_ids

    records = []
    for step, path in tqdm(checkpoints, desc="checkpoints", disable=not progress):
        t0 = time.perf_counter()
        model = load_causal_lm(path, dtype, device=device)
        validate_ids(ids, split_causal_lm(model), prefix_len + suffix_len)
        res = score_exact(model, ids, prefix_len, suffix_len, batch_size=batch_size)
        exact = res.exact.cpu()
        matched = (res.matched.float() / suffix_len).cpu()
        records.append({"step": step, "checkpoint": os.path.abspath(path), "n": int(exact.numel()),
                        "n_exact": int(exact.sum()), "pct_exact": 100.0 * float(exact.float().mean()),
                        "mean_matched_frac": float(matched.mean()), "seconds": time.perf_counter() - t0})
        del model
    return records


def plot_over_training(records: list[dict], path: str) -> None:
    plt = pyplot()

    xs = [r["step"] if r["step"] is not None else i for i, r in enumerate(records)]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(xs, [r["pct_exact"] for r in records], marker="o", label="% exactly memorized")
    ax.plot(xs, [100 * r["mean_matched_frac"] for r in records], marker="s", ls="--",
            label="% of suffix tokens predicted (teacher-forced)")
    ax.set_xlabel("training step" if all(r["step"] is not None for r in records) else "checkpoint")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.set_title("memorization over training")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_outputs(records: list[dict], out: str) -> dict[str, str]:
    os.makedirs(out, exist_ok=True)
    paths = {"jsonl": os.path.join(out, "checkpoints.jsonl"),
             "png": os.path.join(out, "memorization_over_training.png")}
    with open(paths["jsonl"], "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    plot_over_training(records, paths["png"])
    return paths
