"""Utility metrics: teacher-forced accuracy and perplexity, each in the paper's and the standard form.

- ``acc_paper``: next-token argmax accuracy over every position, pads included, averaged over batches.
- ``acc``: the same over non-pad target positions, token-weighted.
- ``ppl_batchmean``: mean over batches of exp(batch-mean CE), pads included (depends on batch size).
- ``ppl_token``: exp(sum CE / count) over non-pad target positions.

With a plain linear LM head the hits and CE come from the final hidden states through the fused scoring
op (:func:`tinymem_fast.ops.memscore`): no ``[B, T, V]`` logits, one read of the results per call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def plain_head(model):
    """(base model, head) when the logits are exactly ``head(base_model(x))`` -- a plain linear head that no
    hook watches and no config setting transforms -- else None (callers then run the model itself)."""
    from ..integrations.adapters import UnsupportedArchitecture, head_transform, lm_backbone_and_head

    try:
        body, head = lm_backbone_and_head(model)
    except UnsupportedArchitecture:
        return None
    # hooks on the model or its head (second-order's input/gradient capture) would be bypassed
    if any(m._forward_hooks or m._forward_pre_hooks for m in (model, head)) or head_transform(model):
        return None
    return body, head


def _token_hits_and_ce(model, parts, x: torch.Tensor):
    """Next-token argmax hits and CE at every position of ``x`` (but the last). With a plain head they
    come from the hidden states through memscore (no [B, T, V] logits); a model that diverged (NaN/inf
    in its hidden states) goes through its logits, so its metrics come out NaN instead of raising."""
    tgt = x[:, 1:]
    if parts is not None:
        from ..ops.memscore import memscore

        body, head = parts
        out = body(input_ids=x, use_cache=False)
        hidden = (out[0] if isinstance(out, tuple) else out.last_hidden_state)[:, :-1]
        if bool(torch.isfinite(hidden).all()):
            s = memscore(hidden.to(head.weight.dtype).contiguous(), head.weight, tgt, bias=head.bias)
            return s.match, s.nll
    logits = model(x).logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                         reduction="none").view(tgt.shape)
    return logits.argmax(-1) == tgt, ce


@torch.no_grad()
def evaluate_lm(model, ids: torch.Tensor, pad: torch.Tensor, batch_size: int = 64) -> dict:
    device = next(model.parameters()).device
    parts = plain_head(model)
    acc_paper, ce_mean = [], []  # per batch, on the device: one read at the end
    correct = total = ce_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, ids.shape[0], batch_size):
        x = ids[i: i + batch_size].to(device)
        content = ~pad[i: i + batch_size, 1:].to(device)
        hit, ce = _token_hits_and_ce(model, parts, x)
        acc_paper.append(hit.float().mean())
        ce_mean.append(ce.mean())
        correct = correct + (hit & content).sum()
        total = total + content.sum()
        ce_sum = ce_sum + (ce.double() * content).sum()
    if not acc_paper:
        return {"acc_paper": 0.0, "acc": 0.0, "ppl_batchmean": 0.0, "ppl_token": 1.0, "loss": 0.0}
    acc_b = torch.stack(acc_paper).tolist()
    ce_b = torch.stack(ce_mean).tolist()
    correct, total, ce_sum = float(correct), float(total), float(ce_sum)
    return {
        "acc_paper": sum(acc_b) / len(acc_b),
        "acc": correct / max(1.0, total),
        "ppl_batchmean": sum(math.exp(min(c, 700.0)) for c in ce_b) / len(ce_b),
        "ppl_token": math.exp(min(ce_sum / max(1.0, total), 700.0)),
        "loss": ce_sum / max(1.0, total),
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
