"""Second-Order Unlearning (OBS saliency): zero the MLP weights that an empirical-Fisher model of the forget
loss says matter most.

Per MLP tensor (weights and, by default, biases) the flattened entries are split into blocks of
``sou_block_size`` (the last block may be shorter) and each block gets the empirical Fisher
``F = damping * I + (1/m) * sum_j g_j g_j^T`` over ``m = sou_num_grads`` gradients of the forget loss.
Gradient ``j`` is that of the mean per-sequence loss of ``sou_grad_batch`` forget rows, taken in order
and cycling when the forget set is smaller than ``m * sou_grad_batch``. The saliency of entry ``i`` is
``w_i^2 / (2 [F^-1]_ii)`` and the top ``floor(ratio * numel)`` entries of each tensor are zeroed.

How, versus the reference (a Python loop of rank-1 Sherman-Morrison updates, one backward per gradient,
``.grad`` never cleared so every "sample" gradient was a running sum, Fishers built for every tensor
including embeddings):

* per-example gradients of the MLP tensors come from one batched backward: hooks keep each MLP module's
  input and output gradient, and ``g_b = sum_t dy_bt x_bt^T`` per row ``b``;
* with ``sou_grad_batch = 1`` a row that the cycling would use ``c`` times enters the Fisher once with
  weight ``c`` (the same matrix, without recomputing identical gradients);
* the block Fishers are accumulated with one batched outer product and inverted together in float64
  (``damping`` is tiny, so the blocks are nearly singular when there are fewer distinct gradients than
  the block size; float64 keeps ``[F^-1]_ii`` accurate), giving the same matrix the rank-1 route builds;
* the passes run with the fused attention on a CPU and, with ``precision = "bf16"``, bf16 GEMMs under
  autocast (the per-example gradients are formed in float32 from the hooked activations and output
  gradients); the block sums stay on the model's device until the inversion, so a pass waits for no
  read-back. A non-finite forget loss raises FloatingPointError (checked every pass on a CPU, every 50
  on a GPU, and before the inversion).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...integrations.adapters import mlp_layers
from ...integrations.mixed_precision import autocast, check_precision
from ...ops.masked_subnet import check_ratio, layout_of, num_dropped
from ...tinymem.training import token_loss
from ..registry import UnlearnInputs, register
from ..steps import LossWatch, to_device
from .durable import top_k_mask


@dataclass
class SecondOrderConfig:
    ratio: float = 0.01
    sou_block_size: int = 50
    sou_damping: float = 1e-7
    sou_num_grads: int = 512
    sou_grad_batch: int = 1
    include_bias: bool = True
    batch_size: int = 32          # rows per batched per-example-gradient pass
    loss_on_pad: bool = False
    seed: int = 0                 # unused (deterministic); kept for a uniform method interface
    precision: str = "fp32"       # fp32 | bf16 (bf16 GEMMs; float32 gradients, float64 Fisher)
    progress: bool = False

    def __post_init__(self):
        check_precision(self.precision)
        for name in ("sou_block_size", "sou_num_grads", "sou_grad_batch", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sou_damping <= 0:
            raise ValueError(f"sou_damping must be > 0, got {self.sou_damping}")


def gradient_groups(n: int, m: int, grad_batch: int) -> tuple[list[Tensor], Tensor]:
    """The ``m`` gradients as groups of forget-row indices (cycling), with a weight per distinct group."""
    if n == 0:
        raise ValueError("the forget set is empty")
    if grad_batch == 1:
        counts = torch.bincount(torch.arange(m) % n, minlength=n)
        keep = torch.nonzero(counts).flatten()
        return [keep[i: i + 1] for i in range(keep.numel())], counts[keep].double()
    idx = (torch.arange(m * grad_batch) % n).view(m, grad_batch)
    return list(idx), torch.ones(m, dtype=torch.float64)


class PerExampleGrads:
    """Hooks on the MLP modules that turn one backward of a summed loss into per-row parameter gradients."""

    def __init__(self, model, include_bias: bool):
        self.modules: list[nn.Module] = []
        for layer in mlp_layers(model):
            self.modules.extend(layer.matrices().values())
        self.include_bias = include_bias
        self.inputs: dict[int, Tensor] = {}
        self.grads: dict[int, Tensor] = {}
        self.handles = []

    def tensors(self) -> list[Tensor]:
        out = []
        for mod in self.modules:
            out.append(mod.weight)
            if self.include_bias and getattr(mod, "bias", None) is not None:
                out.append(mod.bias)
        return out

    def __enter__(self):
        for i, mod in enumerate(self.modules):
            def fwd(_m, args, out, i=i):
                self.inputs[i] = args[0].detach()
                if out.requires_grad:
                    out.register_hook(lambda g, i=i: self.grads.__setitem__(i, g.detach()))
            self.handles.append(mod.register_forward_hook(fwd))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.inputs.clear()
        self.grads.clear()

    def collect(self) -> list[Tensor]:
        """Per-row gradients ``[b, *param.shape]`` in :meth:`tensors` order, for the last backward."""
        out = []
        for i, mod in enumerate(self.modules):
            x, dy = self.inputs[i].float(), self.grads[i].float()
            if layout_of(mod) == "conv1d":
                out.append(torch.einsum("bti,bto->bio", x, dy))
            else:
                out.append(torch.einsum("bto,bti->boi", dy, x))
            if self.include_bias and getattr(mod, "bias", None) is not None:
                out.append(dy.sum(1))
        return out


def _blocks(flat: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """``[g, N]`` -> full blocks ``[g, N // size, size]`` and the tail ``[g, 1, N % size]``."""
    g, n = flat.shape
    full = n // size * size
    return flat[:, :full].reshape(g, -1, size), flat[:, full:].reshape(g, 1, n - full)


def fisher_inverse_diagonals(model, inputs: UnlearnInputs,
                             cfg: SecondOrderConfig) -> tuple[list[Tensor], list[Tensor]]:
    """The MLP tensors covered and, per tensor, ``diag(F^-1)`` (float64, the tensor's shape, on the CPU)."""
    check_precision(cfg.precision)
    device = next(model.parameters()).device
    groups, weights = gradient_groups(inputs.forget_ids.shape[0], cfg.sou_num_grads, cfg.sou_grad_batch)
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    hooks = PerExampleGrads(model, cfg.include_bias)
    tensors = hooks.tensors()
    for t in tensors:
        t.requires_grad_(True)
    bsz = cfg.sou_block_size
    f64 = dict(dtype=torch.float64, device=device)
    acc_full = [torch.zeros(t.numel() // bsz, bsz, bsz, **f64) for t in tensors]
    acc_tail = [torch.zeros(1, t.numel() % bsz, t.numel() % bsz, **f64) for t in tensors]
    per_pass = max(1, cfg.batch_size // cfg.sou_grad_batch)
    watch = LossWatch(device, what="forget loss", unit="gradient pass", hint="the Fisher is undefined")
    chunks = range(0, len(groups), per_pass)
    f_ids, f_pad = inputs.forget_ids.to(device), inputs.forget_pad.to(device)
    try:
        with hooks, torch.enable_grad():
            for ci, c in enumerate(tqdm(chunks, desc="second-order fisher", disable=not cfg.progress)):
                grp = groups[c: c + per_pass]
                rows = torch.cat(grp)
                ids, pad = f_ids[to_device(rows, device)], f_pad[to_device(rows, device)]
                with autocast(model, cfg.precision, device.type, fused_attention=True):
                    seq, _ = token_loss(model, ids, pad, cfg.loss_on_pad)
                total = seq.float().sum()
                watch.add(ci, total)
                total.backward()
                # group gradient = mean of its rows' gradients
                sizes = torch.tensor([g.numel() for g in grp])
                owner = torch.repeat_interleave(torch.arange(len(grp)), sizes)
                avg = torch.zeros(len(grp), rows.numel(), dtype=torch.float64)
                avg[owner, torch.arange(rows.numel())] = 1.0 / sizes[owner].double()
                avg = to_device(avg, device)
                wd = to_device(weights[c: c + per_pass], device)[:, None, None]
                for ti, g in enumerate(hooks.collect()):
                    gg = avg @ g.reshape(g.shape[0], -1).double()
                    full, tail = _blocks(gg, bsz)
                    acc_full[ti] += torch.einsum("gnk,gnl->nkl", full * wd, full)
                    if tail.shape[-1]:
                        acc_tail[ti] += torch.einsum("gnk,gnl->nkl", tail * wd, tail)
                for t in tensors:
                    t.grad = None
            watch.check(len(chunks) - 1)
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
            p.grad = None
        model.train(was_training)
    m = float(weights.sum())
    diags = []
    for t, full, tail in zip(tensors, acc_full, acc_tail, strict=True):
        parts = []
        for blk in (full.cpu(), tail.cpu()):
            if blk.shape[-1] == 0 or blk.shape[0] == 0:
                continue
            eye = torch.eye(blk.shape[-1], dtype=torch.float64)
            fisher = blk / m + cfg.sou_damping * eye
            chol = torch.linalg.cholesky(fisher)
            parts.append(torch.cholesky_inverse(chol).diagonal(dim1=-2, dim2=-1).reshape(-1))
        diags.append(torch.cat(parts).view(t.shape))
    return tensors, diags


@register("second_order", SecondOrderConfig, "weight", aliases=("obs", "sou"))
def run_second_order(model, inputs: UnlearnInputs, cfg: SecondOrderConfig) -> dict:
    check_ratio(cfg.ratio)
    t0 = time.perf_counter()
    tensors, diags = fisher_inverse_diagonals(model, inputs, cfg)
    zeroed = 0
    with torch.no_grad():
        for t, d in zip(tensors, diags, strict=True):
            k = num_dropped(t.numel(), cfg.ratio)
            if k == 0:
                continue
            saliency = t.detach().double().cpu() ** 2 / (2.0 * d)
            mask = top_k_mask(saliency, k).to(t.device)
            t.masked_fill_(mask, 0)
            zeroed += k
    return {"time_edit_s": time.perf_counter() - t0, "zeroed": zeroed}
