"""Utility metrics: teacher-forced accuracy and perplexity, each in the paper's and the standard form.

- ``acc_paper``: next-token argmax accuracy over every position, pads included, averaged over batches.
- ``acc``: the same over non-pad target positions, token-weighted.
- ``ppl_batchmean``: mean over batches of exp(batch-mean CE), pads included (depends on batch size).
- ``ppl_token``: exp(sum CE / count) over non-pad target positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate_lm(model, ids: torch.Tensor, pad: torch.Tensor, batch_size: int = 64) -> dict:
    device = next(model.parameters()).device
    acc_paper, ppl_bm = [], []
    correct = total = 0
    ce_sum = 0.0
    for i in range(0, ids.shape[0], batch_size):
        x = ids[i: i + batch_size].to(device)
        content = ~pad[i: i + batch_size, 1:].to(device)
        logits = model(x).logits[:, :-1].float()
        tgt = x[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                             reduction="none").view(tgt.shape)
        hit = logits.argmax(-1) == tgt
        acc_paper.append(hit.float().mean().item())
        ppl_bm.append(math.exp(min(ce.mean().item(), 700.0)))
        correct += int((hit & content).sum())
        total += int(content.sum())
        ce_sum += float((ce * content).sum())
    return {
        "acc_paper": sum(acc_paper) / max(1, len(acc_paper)),
        "acc": correct / max(1, total),
        "ppl_batchmean": sum(ppl_bm) / max(1, len(ppl_bm)),
        "ppl_token": math.exp(min(ce_sum / max(1, total), 700.0)),
        "loss": ce_sum / max(1, total),
    }


def evaluate_tests(model, tests: dict[str, tuple[torch.Tensor, torch.Tensor]], batch_size: int = 64) -> dict:
    """Per test set metrics, plus ``avg_acc``/``avg_acc_paper`` means over sets (the paper's math avg)."""
    out: dict = {}
    for name, (ids, pad) in tests.items():
        r = evaluate_lm(model, ids, pad, batch_size)
        for k, v in r.items():
            out[f"{name}/{k}"] = v
    if len(tests) > 1:
        for k in ("acc", "acc_paper"):
            vals = [out[f"{n}/{k}"] for n in tests]
            out[f"avg_{k}"] = sum(vals) / len(vals)
    return out
