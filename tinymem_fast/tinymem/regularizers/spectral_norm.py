"""Spectral-norm regularization (SPEC 5.2 (1)): loss += (lambda / 2) * sum over blocks of sigma_max(W)^power.

Covered: every weight matrix of the transformer layers except norms, embeddings, the output head and
biases. Attention is split per head: the fused or separate Q/K/V projections into one block per head per
Q/K/V (rows of the head's output features), the attention output projection into one block per head
along its input axis; MLP matrices stay whole. Head counts come from the model config.

sigma is estimated by one power iteration per step from persistent vectors (u, v): the update runs
without gradient, and sigma = u^T W v carries the gradient ``u v^T`` into W. Blocks of equal shape (after
transposing every block to rows >= columns, which leaves sigma unchanged) are stacked and iterated with
one batched matmul, so a 4-layer model costs a handful of small kernels per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...integrations.adapters import FAMILIES, _get, family_of
from .base import TrainHook


@dataclass
class _Block:
    name: str
    param: nn.Parameter
    view: Callable[[torch.Tensor], torch.Tensor]   # weight -> [n_blocks, rows, cols] (a view when possible)
    count: int
    shape: tuple[int, int]


def _blocks_gpt2(model) -> list[_Block]:
    c = model.config
    if getattr(c, "add_cross_attention", False):
        raise TypeError("spectral_norm: GPT-2 with cross-attention is not supported (decoder-only only)")
    d, h = c.n_embd, c.n_head
    hd = d // h
    out = []
    for i, blk in enumerate(model.transformer.h):
        # Conv1D stores (in, out); c_attn's output features are [Q | K | V], each head-major
        out.append(_Block(f"h.{i}.attn.c_attn", blk.attn.c_attn.weight,
                          lambda w: w.view(d, 3, h, hd).permute(1, 2, 0, 3).reshape(3 * h, d, hd),
                          3 * h, (d, hd)))
        out.append(_Block(f"h.{i}.attn.c_proj", blk.attn.c_proj.weight,
                          lambda w: w.view(h, hd, d), h, (hd, d)))       # input rows grouped by head
        for n in ("c_fc", "c_proj"):
            w = getattr(blk.mlp, n).weight
            out.append(_Block(f"h.{i}.mlp.{n}", w, lambda w: w.unsqueeze(0), 1, tuple(w.shape)))
    return out


def _blocks_neox(model) -> list[_Block]:
    c = model.config
    d, h = c.hidden_size, c.num_attention_heads
    hd = d // h
    out = []
    for i, layer in enumerate(model.gpt_neox.layers):
        a = layer.attention
        # HF GPTNeoX views the fused output as [heads, 3 * head_size]: per head, its q, k and v rows
        out.append(_Block(f"layers.{i}.attention.query_key_value", a.query_key_value.weight,
                          lambda w: w.view(h, 3, hd, d).reshape(3 * h, hd, d), 3 * h, (hd, d)))
        out.append(_Block(f"layers.{i}.attention.dense", a.dense.weight,
                          lambda w: w.view(d, h, hd).permute(1, 0, 2), h, (d, hd)))  # input columns by head
        for n in ("dense_h_to_4h", "dense_4h_to_h"):
            w = getattr(layer.mlp, n).weight
            out.append(_Block(f"layers.{i}.mlp.{n}", w, lambda w: w.unsqueeze(0), 1, tuple(w.shape)))
    return out


def _blocks_llama(model) -> list[_Block]:
    c = model.config
    d, h = c.hidden_size, c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or h
    hd = getattr(c, "head_dim", None) or d // h
    out = []
    for i, layer in enumerate(_get(model, FAMILIES["llama"].layers)):
        a = layer.self_attn
        for n, heads in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            out.append(_Block(f"layers.{i}.self_attn.{n}", getattr(a, n).weight,
                              lambda w, heads=heads: w.view(heads, hd, -1), heads, (hd, d)))
        out.append(_Block(f"layers.{i}.self_attn.o_proj", a.o_proj.weight,
                          lambda w: w.view(w.shape[0], h, hd).permute(1, 0, 2), h, (d, hd)))
        for n in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(layer.mlp, n).weight
            out.append(_Block(f"layers.{i}.mlp.{n}", w, lambda w: w.unsqueeze(0), 1, tuple(w.shape)))
    return out


def covered_blocks(model) -> list[_Block]:
    """The blocks of ``model`` the regularizer covers. A 2-D weight inside the layers that is not covered
    means an unknown layout, and raises rather than being skipped."""
    fam = family_of(model)
    if fam == "gpt2":
        blocks = _blocks_gpt2(model)
    elif fam == "gpt_neox":
        blocks = _blocks_neox(model)
    elif FAMILIES[fam] is FAMILIES["llama"]:
        try:
            blocks = _blocks_llama(model)
        except AttributeError as exc:
            raise TypeError(f"spectral_norm: {type(model).__name__} does not have separate q/k/v/o and "
                            f"gate/up/down projections ({exc}); its attention split is unknown") from None
    else:
        raise TypeError(f"spectral_norm: no attention layout for model_type {fam!r}")
    seen = {id(b.param) for b in blocks}
    for name, p in _get(model, FAMILIES[fam].layers).named_parameters():
        if p.dim() >= 2 and id(p) not in seen:  # norms and biases are 1-D
            raise TypeError(f"spectral_norm: {type(model).__name__} has a weight matrix {name!r} "
                            "that the head/matrix split does not know; refusing to silently skip it")
    for b in blocks:
        got = tuple(b.view(b.param.detach()).shape)
        if got != (b.count, *b.shape):
            raise TypeError(f"spectral_norm: {b.name} splits into {got}, expected {(b.count, *b.shape)}")
    return blocks


class SpectralNorm(TrainHook):
    def __init__(self, model, lam: float = 0.01, power: int = 1, seed: int = 0):
        if lam < 0 or power not in (1, 2):
            raise ValueError(f"spectral_norm needs spectral_lambda >= 0 and spectral_power 1 or 2, got "
                             f"{lam}, {power}")
        self.lam, self.power = lam, power
        self.blocks = covered_blocks(model)
        groups: dict[tuple[int, int], list[tuple[_Block, bool]]] = {}
        for b in self.blocks:
            m, n = b.shape
            key, flip = ((m, n), False) if m >= n else ((n, m), True)
            groups.setdefault(key, []).append((b, flip))
        self.groups = list(groups.items())
        dev = self.blocks[0].param.device
        gen = torch.Generator().manual_seed(seed * 7919 + 17)
        self.u, self.v = [], []
        for (m, n), members in self.groups:
            k = sum(b.count for b, _ in members)
            self.u.append(F.normalize(torch.randn(k, m, generator=gen), dim=1).to(dev))
            self.v.append(F.normalize(torch.randn(k, n, generator=gen), dim=1).to(dev))

    def stacked(self, g: int) -> torch.Tensor:
        """All blocks of group ``g`` as one [k, m, n] tensor (differentiable w.r.t. the weights)."""
        parts = []
        for b, flip in self.groups[g][1]:
            w = b.view(b.param)
            parts.append(w.transpose(1, 2) if flip else w)
        return torch.cat(parts).float() if len(parts) > 1 else parts[0].float()

    def sigmas(self, iterate: bool = True) -> list[torch.Tensor]:
        """sigma of every block (grouped), after one power-iteration update of (u, v) if ``iterate``."""
        out = []
        for g in range(len(self.groups)):
            w = self.stacked(g)
            if iterate:
                with torch.no_grad():
                    wd = w.detach()
                    v = F.normalize(torch.bmm(wd.transpose(1, 2), self.u[g].unsqueeze(2)).squeeze(2), dim=1)
                    u = F.normalize(torch.bmm(wd, v.unsqueeze(2)).squeeze(2), dim=1)
                    self.u[g], self.v[g] = u, v
            out.append(torch.bmm(self.u[g].unsqueeze(1), torch.bmm(w, self.v[g].unsqueeze(2))).reshape(-1))
        return out

    def penalty(self, iterate: bool = True) -> torch.Tensor:
        sig = torch.cat(self.sigmas(iterate))
        return 0.5 * self.lam * (sig if self.power == 1 else sig * sig).sum()

    def extra_loss(self, model, step: int) -> torch.Tensor | None:
        return self.penalty()

    def state_dict(self) -> dict:
        return {"u": [t.cpu() for t in self.u], "v": [t.cpu() for t in self.v]}

    def load_state_dict(self, state: dict) -> None:
        shapes = [t.shape for t in state["u"]]
        if shapes != [t.shape for t in self.u]:
            raise ValueError("spectral_norm state does not match this model's blocks")
        dev = self.u[0].device
        self.u = [t.to(dev) for t in state["u"]]
        self.v = [t.to(dev) for t in state["v"]]
