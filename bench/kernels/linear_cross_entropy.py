"""Fused linear + cross-entropy, forward + backward, at LM-training shapes: the fused op (cpp, and the
chunked torch backend) against ``F.linear`` + ``F.cross_entropy`` + backward on the same tensors.

Workload: a GPT-2-vocabulary head (V = 50,257) with d = 512 and d = 2,048, 4,096 rows (e.g. 8 sequences of
512 tokens), float32 and bfloat16, reduction "mean", gradients for the hidden states and the head. Each
row gives the median time (ratio = baseline time / this time) and the growth of the process's peak
resident memory during one step (``cpu_peak_mib``), in the note as a fraction of the baseline's. The
baseline materialises the ``[N, V]`` logits (and float32 copies / log-softmax / gradients of them);
the fused op never holds more than one chunk of rows.

``BENCH_SMALL=1`` shrinks the rows to 512 for a quick look; ``python -m bench.kernels.linear_cross_entropy``
prints the rows without saving them.
"""

from __future__ import annotations

import gc
import os

import torch
import torch.nn.functional as F

from bench.harness import Row, cpu_peak_mib, measure, with_ratios
from tinymem_fast.ops import registry
from tinymem_fast.ops.linear_cross_entropy import DISPATCH, fused_linear_cross_entropy

SUITE = "linear_cross_entropy"
VOCAB = 50257
BASELINE = "F.linear + F.cross_entropy"


def _problem(n: int, d: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g)).to(dtype).requires_grad_()
    w = (torch.randn(VOCAB, d, generator=g) * d ** -0.5).to(dtype).requires_grad_()
    y = torch.randint(0, VOCAB, (n,), generator=g)
    y[::97] = -100  # a little padding, as training batches have
    return h, w, y


def _step(loss_fn, h, w, y):
    def step():
        h.grad = w.grad = None
        loss_fn(h, w, y).backward()

    return step


def baseline(h, w, y):
    return F.cross_entropy(F.linear(h, w).float(), y)


def fused(backend: str):
    return lambda h, w, y: fused_linear_cross_entropy(h, w, y, backend=backend)


def _peak(step, h, w) -> float | None:
    # the previous step's gradients go before the reading starts: freed inside it they would offset the
    # growth by their own size
    h.grad = w.grad = None
    gc.collect()
    return cpu_peak_mib(step)


def bench_case(n: int, d: int, dtype, repeats: int, backends: list[str]) -> list[Row]:
    dt = str(dtype).replace("torch.", "")
    case = f"fwd+bwd {n} rows, V={VOCAB}, d={d}, {dt}"
    h, w, y = _problem(n, d, dtype)
    base_step = _step(baseline, h, w, y)
    base_step()
    with torch.no_grad():
        ref_loss = float(baseline(h, w, y))
    ref_gh, ref_gw = h.grad.float().clone(), w.grad.float().clone()
    base_peak = _peak(base_step, h, w)
    rows = [Row(SUITE, case, BASELINE, *measure(base_step, repeats=repeats)[:3], peak_mib=base_peak)]
    for b in backends:
        step = _step(fused(b), h, w, y)
        step()
        with torch.no_grad():
            loss = float(fused(b)(h, w, y))
        err_h = float((h.grad.float() - ref_gh).abs().max() / ref_gh.abs().max())
        err_w = float((w.grad.float() - ref_gw).abs().max() / ref_gw.abs().max())
        peak = _peak(step, h, w)
        t = measure(step, repeats=repeats)
        note = ""
        if peak is not None and base_peak:
            note = f"peak +{peak:.0f} MiB ({100 * peak / base_peak:.0f}% of the baseline's); "
        note += (f"loss diff {abs(loss - ref_loss):.1e}; grad max rel diff hidden {err_h:.1e}, "
                 f"weight {err_w:.1e}")
        rows.append(Row(SUITE, case, b, *t[:3], peak_mib=peak, note=note))
    with_ratios(rows, BASELINE, case)
    return rows


def run(device: str = "cpu", repeats: int = 5) -> list[Row]:
    if device != "cpu":
        return []  # the CPU kernel's suite; a GPU run would time the torch chunks against cuBLAS
    n = 512 if os.environ.get("BENCH_SMALL") == "1" else 4096
    fast = [b for b in ("cpp",) if not registry.backend_reasons(
        "fused_linear_cross_entropy", "cpu", **DISPATCH)[b]]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for d in (512, 2048):
            # the chunked torch backend for reference at the small width only: a step at d=2048 in float32
            # is ~25 s of GEMMs on 2 cores whoever runs it
            rows += bench_case(n, d, dtype, max(2, repeats // 2), fast + (["torch"] if d == 512 else []))
    return rows


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.kernels.linear_cross_entropy",
                                description="print, do not save")
    p.add_argument("--quick", action="store_true", help="BENCH_SMALL=1 sizes")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if args.quick:
        os.environ["BENCH_SMALL"] = "1"
    for r in run("cpu", args.repeats):
        ratio = f"{r.ratio:6.2f}x vs {r.baseline}" if r.ratio is not None else ""
        print(f"  {r.case:<45} {r.provider:<28} {r.median_ms:9.1f} ms {ratio}  {r.note}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
