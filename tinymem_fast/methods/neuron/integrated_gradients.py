"""Integrated Gradients: attribute p(true next token) to MLP neurons along a straight path from zero.

For forget row ``r``, layer ``l`` and target position ``t`` (from ``start - 1``, the position predicting
the memorized window's first token, to the last position that has a non-pad next token), the activation
vector ``a`` of layer ``l`` at ``t`` is replaced by ``alpha * a`` for ``alpha`` in
``linspace(0, 1, ig_steps)``; the gradients of ``p(ids[r, t + 1])`` at ``t`` with respect to the scaled
activation are summed over the steps and ``IG = a * sum(grad) / ig_steps`` (zero baseline). IG is
averaged over the positions of each row, then over rows; the top ``floor(ratio * I)`` neurons of every
layer (largest mean IG) are ablated.

Batching (the reference ran one forward/backward per (row, layer, position, step)): scaling position
``t`` changes nothing before ``t``, and only the logit at ``t`` is read, so every replica of a row --
each position, layer and step -- is a one-token branch off the row's clean prefix
(:mod:`~tinymem_fast.integrations.branch_attention`): one forward of ``[prefix | replicas]`` per row
(in chunks of ``batch_size`` replicas) costs one token per replica instead of ``t + 1``; the MLP hook
scales, in each layer, only the replicas assigned to that layer. The result equals the one-at-a-time
loop (tested). ``ig_steps`` is honoured (the reference hard-coded 20).

Attention runs in float32; ``precision = "bf16"`` runs the other GEMMs in bf16 under autocast, the
scaled activations are float32 leaves (cast to the activations' dtype in the model), and the attribution
sums are float64 on the model's device, read back once at the end.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ...integrations.adapters import mlp_layers
from ...integrations.branch_attention import check_branches_ran, shared_prefix_branches
from ...integrations.mixed_precision import autocast, check_precision
from ...ops.masked_subnet import check_ratio
from ..registry import UnlearnInputs, register
from ..steps import to_device
from .ablation import ablate_neurons, mlp_activation_hook, top_neurons


@dataclass
class IntegratedGradientsConfig:
    ratio: float = 0.01
    ig_steps: int = 20
    batch_size: int = 1024    # replicas (position x layer x step of one row; a token each) per pass
    seed: int = 0             # unused (deterministic); kept for a uniform method interface
    precision: str = "fp32"   # fp32 | bf16 (bf16 GEMMs; float32 scaled activations and gradients)
    progress: bool = False

    def __post_init__(self):
        check_precision(self.precision)
        if self.ig_steps < 1:
            raise ValueError(f"ig_steps must be >= 1, got {self.ig_steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def target_positions(ids: torch.Tensor, pad: torch.Tensor, start: torch.Tensor | None):
    """Per row, the inclusive range ``[lo, hi]`` of positions whose next-token probability is attributed."""
    n, t = ids.shape
    start = torch.ones(n, dtype=torch.long) if start is None else torch.as_tensor(start).long().expand(n)
    nonpad = ~pad.bool()
    pos = torch.arange(t)
    last = torch.where(nonpad.any(1), (nonpad * pos).amax(1), torch.full((n,), -1))
    return (start - 1).clamp(min=0), last - 1


def _branch_logits(model, x: torch.Tensor, position_ids: torch.Tensor, n: int) -> torch.Tensor:
    """Logits of the last ``n`` positions; skips the head elsewhere where the model allows it."""
    kwargs = dict(position_ids=position_ids, use_cache=False)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = n
    return model(x, **kwargs).logits[0, -n:]


def ig_attribution(model, inputs: UnlearnInputs, cfg: IntegratedGradientsConfig) -> torch.Tensor:
    """``[n_layer, I]`` mean integrated gradients of p(next token) per MLP neuron (float32, CPU)."""
    check_precision(cfg.precision)
    device = next(model.parameters()).device
    layers = mlp_layers(model)
    n_layer, width = len(layers), layers[0].intermediate_size
    ids = inputs.forget_ids
    lo, hi = target_positions(ids, inputs.forget_pad, inputs.forget_start)
    npos = (hi - lo + 1).clamp(min=0)
    if not bool((npos > 0).any()):
        raise ValueError("no forget row has a target position (window start beyond its last token?)")
    steps = cfg.ig_steps
    alphas = torch.linspace(0.0, 1.0, steps)
    total = torch.zeros(n_layer, width, dtype=torch.float64, device=device)
    state: dict = {}

    def scale(li, act):
        sel = state["by_layer"][li]
        if sel is None:
            return None
        base = act[0, sel].detach().float()
        scaled = (base * state["alpha"][li][:, None]).requires_grad_(True)  # float32 leaf, float32 grad
        state["leaves"][li] = (base, scaled)
        out = act.clone()
        out[0, sel] = scaled.to(act.dtype)
        return out

    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    rows = torch.nonzero(npos > 0).flatten().tolist()
    bar = tqdm(total=int(npos.sum()) * n_layer * steps, desc="integrated gradients", unit="replica",
               disable=not cfg.progress)
    try:
        with (mlp_activation_hook(model, scale), torch.enable_grad(),
              shared_prefix_branches(model) as layout):
            for r in rows:
                # replica j of row r: (position, layer, alpha), position-major; the prefix ends at the
                # last attributed position, the only one any replica's attention reaches
                prefix = int(hi[r]) + 1
                pos = torch.arange(int(lo[r]), prefix).repeat_interleave(n_layer * steps)
                lay = torch.arange(n_layer).repeat_interleave(steps).repeat(int(npos[r]))
                alp = alphas.repeat(int(npos[r]) * n_layer)
                row = ids[r].to(device)
                for c in range(0, pos.numel(), cfg.batch_size):
                    chunk = slice(c, c + cfg.batch_size)
                    t, la, al = pos[chunk], lay[chunk], alp[chunk]
                    n = t.numel()
                    layout.set(prefix, t)
                    sel = [torch.nonzero(la == li).flatten() for li in range(n_layer)]
                    state.update(leaves={}, by_layer=[to_device(prefix + s, device) if s.numel() else None
                                                      for s in sel],
                                 alpha=[to_device(al[s], device) for s in sel])
                    t_dev = to_device(t, device)
                    x = torch.cat([row[:prefix], row[t_dev]])[None]
                    position_ids = torch.cat([torch.arange(prefix, device=device), t_dev])[None]
                    with autocast(model, cfg.precision, device.type):
                        logits = _branch_logits(model, x, position_ids, n)
                    check_branches_ran(model, layout)
                    prob = torch.softmax(logits.float(), -1)
                    p_true = prob.gather(1, row[t_dev + 1][:, None]).sum()
                    done = sorted(state["leaves"])
                    grads = torch.autograd.grad(p_true, [state["leaves"][li][1] for li in done])
                    for li, g in zip(done, grads, strict=True):
                        base = state["leaves"][li][0]
                        total[li] += (base.double() * g.double()).sum(0) / (steps * int(npos[r]))
                    bar.update(n)
    finally:
        bar.close()
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    return (total.cpu() / len(rows)).float()


@register("integrated_gradients", IntegratedGradientsConfig, "neuron", aliases=("ig",))
def run_integrated_gradients(model, inputs: UnlearnInputs, cfg: IntegratedGradientsConfig) -> dict:
    check_ratio(cfg.ratio)
    t0 = time.perf_counter()
    attribution = ig_attribution(model, inputs, cfg)
    count = ablate_neurons(model, top_neurons(attribution, cfg.ratio))
    return {"time_edit_s": time.perf_counter() - t0, "ablated": count}
