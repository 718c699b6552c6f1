"""Masked-subnet benchmarks: threshold selection, one full Subnet training step, the fused score update.

Shapes are those of a Pythia-2.8B MLP matrix (2560 x 10240) and a batch of 32 sequences x 80 tokens.
Baselines: what the paper's code does (a full ``torch.sort`` of every score tensor on every forward,
the mask materialised, ``torch.optim.SGD``), the bare ``torch.kthvalue``, and our plain-PyTorch
``torch`` backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.harness import Row, measure, with_ratios
from tinymem_fast.ops import masked_subnet as ms
from tinymem_fast.ops import registry

OUT_F, IN_F = 10240, 2560
TOKENS = 32 * 80
RATIO = 0.05


def fast_backends(device: str) -> list[str]:
    names = ["cpp"] if device == "cpu" else ["triton", "cuda"]
    return [b for b in names if not registry.unavailable_reason(b, torch.device(device))]


# --- threshold --------------------------------------------------------------------------------


def _sort_threshold_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The paper's way: full sort of |S|, drop the first k (stable, so ties go by flat index)."""
    key = scores.abs().flatten()
    idx = torch.sort(key, stable=True).indices
    keep = torch.ones_like(key, dtype=torch.bool)
    keep[idx[:k]] = False
    return keep.view_as(scores)


def bench_threshold(device: str, repeats: int) -> list[Row]:
    gen = torch.Generator(device=device).manual_seed(0)
    s = torch.randn(OUT_F, IN_F, device=device, generator=gen)
    k = ms.num_dropped(s.numel(), RATIO)
    case = f"threshold {OUT_F}x{IN_F} fp32 ratio {RATIO}"
    rows = []
    t = measure(lambda: _sort_threshold_mask(s, k), device=device, repeats=max(2, repeats // 2))
    rows.append(Row("masked_subnet", case, "torch.sort (paper)", *t))
    t = measure(lambda: torch.kthvalue(s.abs().flatten(), k), device=device, repeats=repeats)
    rows.append(Row("masked_subnet", case, "torch.kthvalue", *t, note="value only, no tie handling"))
    t = measure(lambda: ms.subnet_threshold(s, RATIO, backend="torch"), device=device, repeats=repeats)
    rows.append(Row("masked_subnet", case, "torch backend", *t))
    oracle = _sort_threshold_mask(s, k)
    for b in fast_backends(device):
        t = measure(lambda b=b: ms.subnet_threshold(s, RATIO, backend=b), device=device, repeats=repeats)
        same = torch.equal(ms.subnet_keep_mask(s, ms.subnet_threshold(s, RATIO, backend=b)), oracle)
        rows.append(Row("masked_subnet", case, b, *t, note=f"same mask as sort: {same}", ok=same))
    extra = [Row(r.suite, r.case, r.provider, r.median_ms, r.p20_ms, r.p80_ms, note=r.note, ok=r.ok)
             for r in rows if r.provider not in ("torch.sort (paper)",)]
    with_ratios(rows, "torch.sort (paper)")
    with_ratios(extra, "torch.kthvalue")
    for r in extra:
        if r.provider != "torch.kthvalue":
            r.case = case + " (vs kthvalue)"
            rows.append(r)
    return rows


# --- one full training step -------------------------------------------------------------------


class _PaperSTE(torch.autograd.Function):
    """Mask from a full sort, gradient straight through with the sign of the score."""

    @staticmethod
    def forward(ctx, scores, k):
        ctx.save_for_backward(scores)
        return _sort_threshold_mask(scores.detach(), k).to(scores.dtype)

    @staticmethod
    def backward(ctx, g):
        (scores,) = ctx.saved_tensors
        return g * torch.sign(scores), None


def _paper_step_factory(w, s0, x, dy, k):
    s = torch.nn.Parameter(s0.clone())
    opt = torch.optim.SGD([s], lr=0.1, momentum=0.9, weight_decay=5e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        y = F.linear(x, w * _PaperSTE.apply(s, k))
        y.backward(dy)
        opt.step()

    return step, s


def _our_step_factory(w, s0, x, dy, backend):
    layer = torch.nn.Linear(IN_F, OUT_F, bias=False, device=w.device)
    layer.weight.data = w
    m = ms.MaskedSubnet(layer, RATIO, backend=backend)
    m.scores.data = s0.clone()
    opt = ms.SubnetSGD([m.scores], lr=0.1, momentum=0.9, weight_decay=5e-4, backend=backend)

    def step():
        opt.zero_grad(set_to_none=True)
        m(x).backward(dy)
        opt.step()

    return step, m.scores


def bench_step(device: str, repeats: int) -> list[Row]:
    gen = torch.Generator(device=device).manual_seed(1)
    w = torch.randn(OUT_F, IN_F, device=device, generator=gen) / IN_F**0.5
    s0 = torch.rand(OUT_F, IN_F, device=device, generator=gen) * 2 - 1
    x = torch.randn(TOKENS, IN_F, device=device, generator=gen)
    dy = torch.randn(TOKENS, OUT_F, device=device, generator=gen) / TOKENS
    k = ms.num_dropped(s0.numel(), RATIO)
    case = f"Subnet step {OUT_F}x{IN_F}, {TOKENS} tokens, fp32"
    rows = []
    step, _ = _paper_step_factory(w, s0, x, dy, k)
    rows.append(Row("masked_subnet", case, "eager, paper-style (sort)", *measure(step, device=device,
                                                                                  repeats=repeats)))
    finals = {}
    for b in ["torch"] + fast_backends(device):
        step, _ = _our_step_factory(w, s0, x, dy, b)
        rows.append(Row("masked_subnet", case, f"{b} backend" if b == "torch" else b,
                        *measure(step, device=device, repeats=repeats)))
        # equal results: 10 steps from the same start
        step, scores = _our_step_factory(w, s0, x, dy, b)
        for _ in range(10):
            step()
        finals[b] = scores.detach().clone()
    for b in fast_backends(device):
        rel = ((finals[b] - finals["torch"]).abs().max() / finals["torch"].abs().max()).item()
        for r in rows:
            if r.provider == b:
                r.note = f"scores after 10 steps vs torch backend: max rel diff {rel:.1e}"

    def gemms():
        y = x @ w.t()
        return dy.t() @ x, y

    rows.append(Row("masked_subnet", case, "GEMM floor (2 matmuls)", *measure(gemms, device=device,
                                                                               repeats=repeats),
                    note="lower bound for any backend: forward + score-gradient matmuls"))
    vs_torch = [Row(r.suite, case + " (vs torch backend)", r.provider, r.median_ms, r.p20_ms, r.p80_ms,
                    note=r.note) for r in rows if r.provider in ["torch backend"] + fast_backends(device)]
    with_ratios(rows, "eager, paper-style (sort)")
    with_ratios(vs_torch, "torch backend")
    return rows + [r for r in vs_torch if r.provider != "torch backend"]


# --- fused score update -----------------------------------------------------------------------


def bench_sgd(device: str, repeats: int) -> list[Row]:
    n = OUT_F * IN_F * (4 if device != "cpu" else 1)
    s = torch.randn(n, device=device)
    g = torch.randn(n, device=device)
    buf = torch.zeros(n, device=device)
    case = f"score SGD step, {n / 1e6:.0f}M fp32"
    bytes_moved = n * 4 * 5  # read s, g, buf; write s, buf
    rows = []
    src = torch.randn(n * 5 // 2, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device=device, repeats=repeats)
    copy_gbs = bytes_moved / (t[0] / 1e3) / 1e9
    rows.append(Row("masked_subnet", case, "copy (same bytes)", *t, note=f"{copy_gbs:.0f} GB/s"))
    p = torch.nn.Parameter(s.clone())
    p.grad = g
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt.step()
    t = measure(opt.step, device=device, repeats=repeats)
    rows.append(Row("masked_subnet", case, "torch.optim.SGD", *t,
                    note=f"{bytes_moved / (t[0] / 1e3) / 1e9:.0f} GB/s"))
    for b in ["torch"] + fast_backends(device):
        t = measure(lambda b=b: ms.subnet_sgd_step_(s, g, buf, lr=1e-9, backend=b), device=device,
                    repeats=repeats)
        gbs = bytes_moved / (t[0] / 1e3) / 1e9
        rows.append(Row("masked_subnet", case, f"{b} backend" if b == "torch" else b, *t,
                        note=f"{gbs:.0f} GB/s = {100 * gbs / copy_gbs:.0f}% of copy"))
    with_ratios(rows, "torch.optim.SGD")
    return rows


def run(device: str = "cpu", repeats: int = 5) -> list[Row]:
    return bench_threshold(device, repeats) + bench_step(device, max(3, repeats // 2)) + bench_sgd(
        device, repeats)
