"""Integrated Gradients: attribute p(true next token) to MLP neurons along a straight path from zero.

For forget row ``r``, layer ``l`` and target position ``t`` (from ``start - 1``, the position predicting
the memorized window's first token, to the last position that has a non-pad next token), the activation
vector ``a`` of layer ``l`` at ``t`` is replaced by ``alpha * a`` for ``alpha`` in
``linspace(0, 1, ig_steps)``; the gradients of ``p(ids[r, t + 1])`` at ``t`` with respect to the scaled
activation are summed over the steps and ``IG = a * sum(grad) / ig_steps`` (zero baseline). IG is
averaged over the positions of each row, then over rows; the top ``floor(ratio * I)`` neurons of every
layer (largest mean IG) are ablated.

Batching (the reference ran one forward/backward per (row, layer, position, step)): scaling position
``t`` changes nothing before ``t``, so each replica is cut to ``t + 1`` tokens and only its last logit is
needed. All replicas that share ``t`` -- every row, every layer and every step -- run as one batch; the
MLP hook scales, in each layer, only the replicas assigned to that layer. The result equals the
one-at-a-time loop (tested). ``ig_steps`` is honoured (the reference hard-coded 20).

The passes run with the fused attention on a CPU; ``precision = "bf16"`` runs their GEMMs in bf16 under
autocast, the scaled activations are float32 leaves (cast to the activations' dtype in the model), and
the attribution sums are float64 on the model's device, read back once at the end.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ...integrations.adapters import mlp_layers
from ...integrations.mixed_precision import autocast, check_precision
from ...ops.masked_subnet import check_ratio
from ..registry import UnlearnInputs, register
from ..steps import to_device
from .ablation import ablate_neurons, mlp_activation_hook, top_neurons


@dataclass
class IntegratedGradientsConfig:
    ratio: float = 0.01
    ig_steps: int = 20
    batch_size: int = 512     # replicas (row x layer x step) per forward/backward
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


def _last_logits(model, x: torch.Tensor) -> torch.Tensor:
    """Logits at the last position only; skips the head on other positions where the model allows it."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return model(x, logits_to_keep=1).logits[:, -1]
    return model(x).logits[:, -1]


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
    inv_npos = to_device(1.0 / npos.double(), device)  # each row's position mean
    ids_dev = ids.to(device)
    state: dict = {}

    def scale(li, act):
        sel = state["by_layer"][li]
        if sel is None:
            return None
        rows, t = sel, state["t"]
        base = act[rows, t].detach().float()
        scaled = (base * state["alpha"][rows, None]).requires_grad_(True)  # float32 leaf, float32 grad
        state["leaves"][li] = (base, scaled, rows)
        out = act.clone()
        out[rows, t] = scaled.to(act.dtype)
        return out

    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    positions = range(int(lo[npos > 0].min()), int(hi.max()) + 1)
    try:
        with mlp_activation_hook(model, scale), torch.enable_grad():
            for t in tqdm(positions, desc="integrated gradients", disable=not cfg.progress):
                rows_ex = torch.nonzero((lo <= t) & (t <= hi)).flatten()
                if rows_ex.numel() == 0:
                    continue
                # replica j: (example, layer, alpha), example-major so a row's replicas stay together
                ex = rows_ex.repeat_interleave(n_layer * steps)
                lay = torch.arange(n_layer).repeat_interleave(steps).repeat(rows_ex.numel())
                alp = alphas.repeat(rows_ex.numel() * n_layer)
                for c in range(0, ex.numel(), cfg.batch_size):
                    e, la = ex[c: c + cfg.batch_size], lay[c: c + cfg.batch_size]
                    state.update(t=t, alpha=to_device(alp[c: c + cfg.batch_size], device), leaves={},
                                 by_layer=[(to_device(torch.nonzero(la == li).flatten(), device)
                                            if bool((la == li).any()) else None) for li in range(n_layer)])
                    e_dev = to_device(e, device)
                    x = ids_dev[e_dev, : t + 1]
                    y = ids_dev[e_dev, t + 1]
                    with autocast(model, cfg.precision, device.type, fused_attention=True):
                        logits = _last_logits(model, x)
                    prob = torch.softmax(logits.float(), -1)
                    p_true = prob.gather(1, y[:, None]).sum()
                    leaves = [state["leaves"][li] for li in sorted(state["leaves"])]
                    grads = torch.autograd.grad(p_true, [s for _, s, _ in leaves])
                    w_row = inv_npos[e_dev]
                    for (base, _, rows), g, li in zip(leaves, grads, sorted(state["leaves"]), strict=True):
                        contrib = base.double() * g.double() / steps
                        total[li] += (contrib * w_row[rows, None]).sum(0)
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    return (total.cpu() / int((npos > 0).sum())).float()


@register("integrated_gradients", IntegratedGradientsConfig, "neuron", aliases=("ig",))
def run_integrated_gradients(model, inputs: UnlearnInputs, cfg: IntegratedGradientsConfig) -> dict:
    check_ratio(cfg.ratio)
    t0 = time.perf_counter()
    attribution = ig_attribution(model, inputs, cfg)
    count = ablate_neurons(model, top_neurons(attribution, cfg.ratio))
    return {"time_edit_s": time.perf_counter() - t0, "ablated": count}
