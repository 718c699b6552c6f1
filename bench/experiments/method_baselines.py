"""Greedy and Second-Order Unlearning against straightforward implementations of the same algorithms.

Baselines (written here, not in the package), as SPEC.md describes the reference running them:

* Greedy: per zeroed weight, one backward, then a host-side scan: every parameter tensor's ``w * grad``
  is copied to the host and its maximum compared with the running best in Python.
* Second-Order Unlearning: a Python loop over the ``m`` gradients, each from its own backward on one
  forget row (gradients cleared in between: the correct version, not the reference's running sums), each
  followed by a rank-1 Sherman-Morrison update of every MLP tensor's block Fisher inverses, in float32.

Both run on the quick math model (the ``tinymem_quick`` cache) with its real forget and retain sets.
Greedy's result must be bit-identical (same picks); SOU's zeroed sets are compared by overlap (the
float32 rank-1 route accumulates rounding that the float64 batched route does not).
"""

from __future__ import annotations

import copy
import os
import time

import torch

from bench.experiments.tinymem_quick import trained_run
from bench.harness import Row, sync
from tinymem_fast.experiments.unlearning import forget_set, retain_set
from tinymem_fast.methods import UnlearnInputs
from tinymem_fast.methods.weight.durable import top_k_mask
from tinymem_fast.methods.weight.greedy import GreedyBatches, GreedyConfig, greedy_unlearn
from tinymem_fast.methods.weight.second_order import PerExampleGrads, SecondOrderConfig, run_second_order
from tinymem_fast.ops.masked_subnet import num_dropped
from tinymem_fast.tinymem.data.dataset import build
from tinymem_fast.tinymem.models import load_model
from tinymem_fast.tinymem.presets import get_preset
from tinymem_fast.tinymem.training import token_loss

GREEDY_ITERS = 40


def greedy_host_scan(model, inputs: UnlearnInputs, cfg: GreedyConfig, iterations: int):
    model.eval()
    batches = GreedyBatches(inputs, cfg)
    params = list(dict.fromkeys(model.parameters()))
    for _ in range(iterations):
        ids, pad, y = batches.next()
        for p in params:
            p.grad = None
        seq, _ = token_loss(model, ids, pad, cfg.loss_on_pad)
        (-(y * seq).sum()).backward()
        best = None
        for pi, p in enumerate(params):
            s = (p.detach() * p.grad).float().cpu().reshape(-1)
            j = int(s.argmax())
            v = float(s[j])
            if best is None or v > best[0]:
                best = (v, pi, j)
        with torch.no_grad():
            params[best[1]].view(-1)[best[2]] = 0
    for p in params:
        p.grad = None
    return model


def sou_rank1(model, inputs: UnlearnInputs, cfg: SecondOrderConfig):
    model.eval()
    tensors = PerExampleGrads(model, cfg.include_bias).tensors()
    b, m = cfg.sou_block_size, cfg.sou_num_grads
    finv = []
    for t in tensors:
        full, tail = t.numel() // b, t.numel() % b
        finv.append((torch.eye(b).repeat(full, 1, 1) / cfg.sou_damping,
                     torch.eye(tail)[None] / cfg.sou_damping if tail else None))
    n = inputs.forget_ids.shape[0]
    for j in range(m):
        r = j % n
        seq, _ = token_loss(model, inputs.forget_ids[r: r + 1], inputs.forget_pad[r: r + 1], cfg.loss_on_pad)
        grads = torch.autograd.grad(seq.mean(), tensors)
        for fi, (full_inv, tail_inv) in enumerate(finv):
            g = grads[fi].reshape(-1).float()
            nf = full_inv.shape[0] * b
            for inv, v in ((full_inv, g[:nf].view(-1, b, 1)), (tail_inv, g[nf:].view(1, -1, 1))):
                if inv is None:
                    continue
                fg = inv @ v
                inv -= fg @ fg.transpose(1, 2) / (m + v.transpose(1, 2) @ fg)
    masks = []
    with torch.no_grad():
        for t, (full_inv, tail_inv) in zip(tensors, finv, strict=True):
            d = full_inv.diagonal(dim1=1, dim2=2).reshape(-1)
            if tail_inv is not None:
                d = torch.cat([d, tail_inv.diagonal(dim1=1, dim2=2).reshape(-1)])
            sal = t.detach().float().reshape(-1) ** 2 / (2 * d)
            mask = top_k_mask(sal, num_dropped(t.numel(), cfg.ratio)).view(t.shape)
            t.masked_fill_(mask, 0)
            masks.append(mask)
    return masks


def _inputs(device: str):
    cfg = get_preset("quick-math-noise")
    run_dir = trained_run("quick-math-noise", [])
    data = build(cfg.data, seed=cfg.seed, workdir=run_dir)
    model = load_model(os.path.join(run_dir, "final"), device=device)
    f_idx, f_start = forget_set(model, data)
    r_idx = retain_set(data, f_idx, 2000, 0)
    to = dict(device=device)
    inputs = UnlearnInputs(data.rows[f_idx].to(**to), data.pad[f_idx].to(**to), data.rows[r_idx].to(**to),
                           data.pad[r_idx].to(**to), f_start)
    return model, inputs


def _timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, (time.perf_counter() - t) * 1e3


def run(device: str = "cpu", repeats: int = 1) -> list[Row]:
    base, inputs = _inputs(device)
    rows = []
    n = sum(p.numel() for p in dict.fromkeys(base.parameters()))
    gcfg = GreedyConfig(ratio=GREEDY_ITERS / n + 1e-12, batch_size=64)
    ours_model = copy.deepcopy(base)
    _, t_ours = _timed(lambda: greedy_unlearn(ours_model, inputs, gcfg), device)
    ref_model = copy.deepcopy(base)
    _, t_ref = _timed(lambda: greedy_host_scan(ref_model, inputs, gcfg, GREEDY_ITERS), device)
    pairs = zip(ours_model.parameters(), ref_model.parameters(), strict=True)
    same = all(torch.equal(a, b) for a, b in pairs)
    rows.append(Row("method_baselines", f"greedy, quick math, {GREEDY_ITERS} weights ({n:,} params)",
                    "tinymem", t_ours, t_ours, t_ours, baseline="host-side scan per weight",
                    ratio=t_ref / t_ours, note=f"baseline {t_ref:.0f} ms; identical weights: {same}"))
    rows.append(Row("method_baselines", f"greedy, quick math, {GREEDY_ITERS} weights ({n:,} params)",
                    "host-side scan per weight", t_ref, t_ref, t_ref))

    scfg = SecondOrderConfig(ratio=0.01)
    ours_model = copy.deepcopy(base)
    _, t_ours = _timed(lambda: run_second_order(ours_model, inputs, scfg), device)
    ref_model = copy.deepcopy(base)
    ref_masks, t_ref = _timed(lambda: sou_rank1(ref_model, inputs, scfg), device)
    ours_masks = [(t == 0) & (t0 != 0) for t, t0 in zip(PerExampleGrads(ours_model, True).tensors(),
                                                       PerExampleGrads(base, True).tensors(), strict=True)]
    inter = sum(int((a & b).sum()) for a, b in zip(ours_masks, ref_masks, strict=True))
    total = sum(int(b.sum()) for b in ref_masks)
    case = f"second_order, quick math, m={scfg.sou_num_grads}, {inputs.forget_ids.shape[0]} forget rows"
    rows.append(Row("method_baselines", case, "tinymem", t_ours, t_ours, t_ours,
                    baseline="rank-1 Sherman-Morrison loop", ratio=t_ref / t_ours,
                    note=f"baseline {t_ref:.0f} ms; zeroed-set overlap {inter}/{total}"))
    rows.append(Row("method_baselines", case, "rank-1 Sherman-Morrison loop", t_ref, t_ref, t_ref))
    return rows
