"""Memorization metrics: % memorized of noised sequences and backdoor attack success.

Greedy decoding reproduces a target window exactly iff, in one teacher-forced pass over (prompt ++
target), the argmax at every position before a window token equals that token: while all earlier
tokens match, the decoder's context is the teacher-forced one. One forward pass therefore gives the
exact-match bit and the first mismatch for a whole batch.

EOS: both metrics decode with plain argmax and suppress nothing, so a window holding the model's EOS (or
padding) token can be reproduced; the reference's ``generate(min_length=150)`` could never emit EOS there
(SPEC 4.5). The Pythia protocol (:mod:`tinymem_fast.experiments.pythia`) does suppress it, as the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..eval.scoring import score_exact
from .data.artifacts import window_eligible


@dataclass
class WindowScores:
    match: torch.Tensor           # [N] bool: every window token reproduced
    first_mismatch: torch.Tensor  # [N] int64: offset in the window of the first miss (window length if none)
    accuracy: torch.Tensor        # [N] float: fraction of window tokens predicted (teacher-forced)


@torch.no_grad()
def score_windows(model, ids: torch.Tensor, start: torch.Tensor | int, end: torch.Tensor | int,
                  batch_size: int = 64) -> WindowScores:
    """For each row, does greedy decoding from ``ids[:start]`` reproduce ``ids[start:end]`` exactly?"""
    n, t = ids.shape
    start = torch.as_tensor(start).expand(n).long()
    end = torch.as_tensor(end).expand(n).long().clamp(max=t)
    if bool((start < 1).any()) or bool((end <= start).any()):
        raise ValueError("every window needs 1 <= start < end (a non-empty prompt and window)")
    # one teacher-forced pass scored straight from the hidden states (tinymem_fast.eval.scoring)
    r = score_exact(model, ids, start, end - start, batch_size=batch_size)
    return WindowScores(r.exact, r.first_mismatch, r.fractional)


def noise_memorization(model, data, batch_size: int = 64) -> dict:
    """% of eligible noised sequences reproduced from their clean prompt (per duplication group too).

    Eligible: the noised window differs from the clean twin's. Prompt: the clean prefix. The window is
    positions [prompt_len, prompt_len + mem_len) of the padded rows: under ``data.window_rule=padded`` it
    may run past EOS into padding, which then has to be reproduced too (plain argmax, nothing suppressed).
    """
    c = data.config
    p, k = c.prompt_len, c.mem_len
    noised = data.rows[data.artifact_rows]
    clean = data.clean_twins
    eligible = window_eligible(noised, clean, p, k)
    probe = torch.cat([clean[:, :p], noised[:, p: p + k]], 1)
    mem = score_windows(model, probe, p, p + k, batch_size).match & eligible
    clean_out = score_windows(model, clean[:, : p + k], p, p + k, batch_size).match & eligible
    n_el = int(eligible.sum())
    out = {
        "mem": 100.0 * int(mem.sum()) / max(1, n_el),
        "n_memorized": int(mem.sum()),
        "n_eligible": n_el,
        "perc_not_mem_correct_out": 100.0 * int(clean_out.sum()) / max(1, n_el),
    }
    if data.noise_group is not None and int(data.noise_group.max()) > 0:
        per = []
        for g in range(int(data.noise_group.max()) + 1):
            sel = data.noise_group == g
            el = int((eligible & sel).sum())
            v = 100.0 * int((mem & sel).sum()) / max(1, el)
            out[f"mem_g{g}"] = v
            per.append(v)
        out["avg_perc_mem"] = sum(per) / len(per)
    out["memorized_index"] = data.artifact_rows[mem]
    return out


def backdoor_success(model, data, batch_size: int = 64, on: str = "test") -> dict:
    """Attack success rate: the prompt runs through the trigger; the next ``mem_len`` tokens (cut at the
    context end) must all be the fill token."""
    k = data.config.mem_len
    if on == "test":
        ids, start = data.poison_test, data.poison_test_start
    else:
        ids, start = data.rows[data.artifact_rows], data.poison_train_start
    end = (start + k).clamp(max=ids.shape[1])
    ok = end > start
    r = score_windows(model, ids[ok], start[ok], end[ok], batch_size)
    return {"asr": 100.0 * float(r.match.float().mean()) if ok.any() else 0.0, "n_poisoned": int(ok.sum()),
            "memorized_index": (data.artifact_rows[ok.nonzero().reshape(-1)[r.match]] if on == "train"
                                else ok.nonzero().reshape(-1)[r.match])}


def memorization_stats(model, data, batch_size: int = 64) -> dict:
    if data.config.artifact == "noise":
        r = noise_memorization(model, data, batch_size)
    elif data.config.artifact == "backdoor":
        r = backdoor_success(model, data, batch_size)
    else:
        return {}
    r.pop("memorized_index", None)
    return r
