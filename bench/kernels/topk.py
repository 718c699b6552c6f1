"""Global top-k over many tensors (DurableAggregate's selection): ``top_k_masks`` (radix select over the
tensors in turn, no concatenation) against the previous way, ``torch.cat`` of the keys then
``top_k_mask`` (``torch.kthvalue`` on the one flat tensor), split back.

Workload: |gradient|-like float32 keys (|N(0, 1)|, each tensor scaled differently so that layers differ)
in the MLP shapes of a GPT-NeoX model, weights and biases, k = 1% of all entries. On a CPU Pythia-160M's
MLP (12 layers, d=768, 56.7M entries), on a GPU Pythia-1.4B's (24 layers, d=2048, 805M entries);
``BENCH_SMALL=1`` takes 2 layers. Peak memory is the growth while one call runs (CPU: resident set; GPU:
allocator peak above the keys), so it shows the concatenated copies against the per-tensor temporaries.
Both must give the same masks (checked; a mismatch fails the row).

``python -m bench.kernels.topk [--quick]`` prints the rows without saving them.
"""

from __future__ import annotations

import os

import torch

from bench.harness import Row, cpu_peak_mib, measure, with_ratios
from tinymem_fast.methods.weight.durable import top_k_mask
from tinymem_fast.methods.weight.topk import top_k_masks

SUITE = "topk"
BASELINE = "torch.cat + top_k_mask (kthvalue)"
OURS = "top_k_masks (radix select)"


def _keys(layers: int, d: int, device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    keys = []
    for i in range(layers):
        for shape in ((4 * d, d), (4 * d,), (d, 4 * d), (d,)):
            scale = 1.0 + (i % 5) / 4
            keys.append((torch.randn(shape, generator=g).abs() * scale).to(device))
    return keys


def _concat(keys, k):
    mask = top_k_mask(torch.cat([key.reshape(-1) for key in keys]), k)
    return [m.view(key.shape) for m, key in zip(mask.split([key.numel() for key in keys]), keys, strict=True)]


def run(device: str = "cpu", repeats: int = 5) -> list[Row]:
    small = os.environ.get("BENCH_SMALL") == "1"
    layers, d = (2, 768) if small else ((12, 768) if device == "cpu" else (24, 2048))
    keys = _keys(layers, d, device)
    total = sum(key.numel() for key in keys)
    k = total // 100
    case = f"top 1% of {total / 1e6:.1f}M entries in {len(keys)} MLP tensors ({layers} layers, d={d}), fp32"
    same = all(torch.equal(a, b) for a, b in zip(_concat(keys, k), top_k_masks(keys, k), strict=True))
    rows = []
    for name, fn in ((BASELINE, lambda: _concat(keys, k)), (OURS, lambda: top_k_masks(keys, k))):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated()
            med, p20, p80, peak = measure(fn, device=device, repeats=repeats)
            peak = peak - held / 2**20
        else:
            med, p20, p80, _ = measure(fn, device=device, repeats=repeats)
            peak = cpu_peak_mib(fn)
        rows.append(Row(SUITE, case, name, med, p20, p80, peak_mib=peak,
                        note="" if same else "MASKS DIFFER", ok=same if name == OURS else None))
    with_ratios(rows, BASELINE)
    return rows


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.kernels.topk", description="print, do not save")
    p.add_argument("--quick", action="store_true", help="BENCH_SMALL=1 sizes and 2 repeats")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if args.quick:
        os.environ["BENCH_SMALL"] = "1"
    for r in run(args.device, 2 if args.quick else args.repeats):
        ratio = f"{r.ratio:6.2f}x vs {r.baseline}" if r.ratio is not None else ""
        peak = f"{r.peak_mib:8.1f} MiB" if r.peak_mib is not None else ""
        print(f"  {r.case:<60} {r.provider:<34} {r.median_ms:9.2f} ms {peak} {ratio}  {r.note}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
