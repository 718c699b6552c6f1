"""Memorization-scoring benchmarks: per-example exact match / first mismatch / matched count / mean NLL
from final hidden states, and the greedy-decoding ``lm_head + argmax`` of the last position.

Workloads: 1024 sequences x 50 scored tokens through (V=14, d=128) -- TinyMem math -- and
(V=50257, d=128) -- TinyMem language / GPT-2 vocabulary. Baseline: one plain forward of the LM head that
materialises all ``[B, T, V]`` logits, then ``log_softmax`` and ``argmax`` (what scoring code usually
does). On a CPU the language case uses fewer sequences: its baseline needs 2 x B*T*V*4 bytes (20 GB at
1024 x 50). ``BENCH_SMALL=1`` shrinks everything for a quick look.

On a CPU, also one greedy-decoding step of a Pythia-70M-shaped float32 head (V=50304, d=512) for 1, 64 and
128 rows: ``F.linear + argmax`` against the cpp kernel in float32 and screened in bf16 (``pack_head``, built
once per weight outside the timed region; its own time is in the note).

``bench_big_head`` (the ``memscore_head`` suite, GPU only): a Pythia-scale bf16 head (M=4096, d=4096,
V=50304), match + NLL per token, against the bare cuBLAS GEMM of that shape (the floor), F.linear + argmax
+ cross_entropy and its torch.compile; every fast backend, the cuda one on both of its paths (cuBLAS
blocks, SIMT tiles).

``python -m bench.kernels.memscore [--quick] [--head-only]`` prints the rows without saving them.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from bench.harness import Row, measure, with_ratios
from tinymem_fast.ops import registry
from tinymem_fast.ops.memscore import lm_head_argmax, memscore, memscore_examples, pack_head

SUITE = "memscore"
SEQ = 50
D = 128
BASELINE = "full logits + log_softmax + argmax"
HEAD_V, HEAD_D = 50304, 512  # Pythia-70M's embed_out


def _small() -> bool:
    return os.environ.get("BENCH_SMALL") == "1"


def fast_backends(device: str) -> list[str]:
    names = ["cpp"] if device == "cpu" else ["triton", "cuda"]
    return [b for b in names if not registry.unavailable_reason(b, torch.device(device))]


def _problem(bsz: int, vocab: int, dtype, device: str, seed: int = 0):
    """Random head and hidden states; about half the targets are the greedy token (hits), so rows mix
    exact matches and early mismatches as memorization scoring sees them."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(bsz, SEQ, D, generator=g).to(dtype).to(device)
    w = (torch.randn(vocab, D, generator=g) * (3.0 / D ** 0.5)).to(dtype).to(device)
    y = torch.randint(0, vocab, (bsz, SEQ), generator=g).to(device)
    greedy = lm_head_argmax(h.view(-1, D), w).view(bsz, SEQ)
    # whole rows of hits for a quarter of the examples (memorized), a coin flip per token elsewhere
    hit = torch.rand(bsz, SEQ, generator=g).to(device) < 0.5
    hit[: bsz // 4] = True
    return h, w, torch.where(hit, greedy, y)


def baseline(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor):
    logits = F.linear(h, w)  # [B, T, V]
    nll = -torch.log_softmax(logits.float(), -1).gather(-1, y[..., None]).squeeze(-1)
    match = logits.argmax(-1) == y
    first = torch.where(~match, torch.arange(y.shape[1], device=y.device), y.shape[1]).min(1).values
    return match.all(1), first, match.sum(1), nll.mean(1)


def bench_examples(device: str, repeats: int, vocab: int, bsz: int, dtype) -> list[Row]:
    h, w, y = _problem(bsz, vocab, dtype, device)
    tokens = bsz * SEQ
    dt = str(dtype).replace("torch.", "")
    case = f"score {bsz}x{SEQ} tokens, V={vocab}, d={D}, {dt}"
    logits_gb = tokens * vocab * 4 / 1e9
    rows = [Row(SUITE, case, BASELINE, *measure(lambda: baseline(h, w, y), device=device, repeats=repeats),
                note=f"materialises {logits_gb:.2f} GB of fp32 logits (x2 with log_softmax)")]
    ref = baseline(h, w, y)
    providers = [("torch", True, False)] + [(b, nll, ee) for b in fast_backends(device)
                                            for nll, ee in ((True, False), (False, False), (False, True))]
    for b, need_nll, early in providers:
        def fn(b=b, need_nll=need_nll, early=early):
            return memscore_examples(h, w, y, need_nll=need_nll, early_exit=early, backend=b)

        name = b + ("" if need_nll else (", no NLL, early exit" if early else ", no NLL"))
        t = measure(fn, device=device, repeats=repeats)
        ex = fn()
        diff = int((ex.matched != ref[2]).sum())
        note = f"matched counts differing from baseline: {diff}/{bsz}"
        if need_nll:
            note += f"; mean NLL max abs diff {float((ex.mean_nll - ref[3]).abs().max()):.1e}"
        rows.append(Row(SUITE, case, name, *t, note=note))
    with_ratios(rows, BASELINE, case)
    return rows


def bench_argmax(device: str, repeats: int, vocab: int, n: int, dtype) -> list[Row]:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(n, D, generator=g).to(dtype).to(device)
    w = (torch.randn(vocab, D, generator=g) * (3.0 / D ** 0.5)).to(dtype).to(device)
    case = f"lm_head+argmax {n} rows, V={vocab}, d={D}, {str(dtype).replace('torch.', '')}"
    base = "F.linear + argmax"
    rows = [Row(SUITE, case, base, *measure(lambda: F.linear(h, w).argmax(-1), device=device,
                                             repeats=repeats))]
    ref = F.linear(h, w).argmax(-1)
    for b in ["torch"] + fast_backends(device):
        t = measure(lambda b=b: lm_head_argmax(h, w, backend=b), device=device, repeats=repeats)
        same = int((lm_head_argmax(h, w, backend=b) != ref).sum())
        rows.append(Row(SUITE, case, b, *t, note=f"ids differing from F.linear+argmax: {same}/{n}"))
    with_ratios(rows, base, case)
    return rows


def bench_decode_head(device: str, repeats: int, n: int) -> list[Row]:
    """One greedy-decoding head step for ``n`` rows (a batch of sequences' last positions)."""
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(HEAD_V, HEAD_D, generator=g) * 0.02).to(device)  # Pythia's init scale
    h = torch.randn(n, HEAD_D, generator=g).to(device)
    case = f"lm_head_argmax, V={HEAD_V}, d={HEAD_D}, {n} rows, float32"
    base = "F.linear + argmax"
    rows = [Row(SUITE, case, base, *measure(lambda: F.linear(h, w).argmax(-1), device=device,
                                             repeats=repeats))]
    ref = F.linear(h, w).argmax(-1)
    exact = lm_head_argmax(h, w, backend="cpp")
    t = measure(lambda: lm_head_argmax(h, w, backend="cpp"), device=device, repeats=repeats)
    rows.append(Row(SUITE, case, "cpp", *t, note=f"ids differing from F.linear+argmax: "
                                                f"{int((exact != ref).sum())}/{n}"))
    pack_ms = measure(lambda: pack_head(w), device=device, warmup=0, repeats=3)[0]
    pack = pack_head(w)
    if pack is None:
        rows.append(Row(SUITE, case, "cpp, bf16-screened", float("nan"), float("nan"), float("nan"),
                        note="unavailable here (needs AVX512-BF16 and a current extension)"))
    else:
        t = measure(lambda: lm_head_argmax(h, w, backend="cpp", pack=pack), device=device, repeats=repeats)
        torch.ops.tinymem.head_screen_stats(True)
        got = lm_head_argmax(h, w, backend="cpp", pack=pack)
        _, screened, cands, fallback = torch.ops.tinymem.head_screen_stats(True)
        rows.append(Row(SUITE, case, "cpp, bf16-screened", *t, note=(
            f"pack_head once per weight: {pack_ms:.0f} ms; ids differing from the cpp float32 kernel: "
            f"{int((got != exact).sum())}/{n}; exact candidates per row {cands / max(1, screened):.1f}, "
            f"fallback rows {fallback}")))
    with_ratios(rows, base, case)
    return rows


@contextlib.contextmanager
def _cuda_head(path: str | None):
    """The cuda backend's head path (TINYMEM_CUDA_HEAD) for the duration; None leaves it alone."""
    old = os.environ.get("TINYMEM_CUDA_HEAD")
    if path:
        os.environ["TINYMEM_CUDA_HEAD"] = path
    try:
        yield
    finally:
        if path:
            if old is None:
                os.environ.pop("TINYMEM_CUDA_HEAD", None)
            else:
                os.environ["TINYMEM_CUDA_HEAD"] = old


def _extra_mib(fn, device: str, repeats: int) -> tuple:
    """measure(), with the peak reported as memory above what was allocated before (the inputs)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated() / 2**20
    med, p20, p80, peak = measure(fn, device=device, repeats=repeats)
    return med, p20, p80, peak - before


def bench_big_head(device: str, repeats: int, m: int = 4096, d: int = 4096, vocab: int = 50304) -> list[Row]:
    """A Pythia-scale head in bf16: per-token match + NLL for M rows, against the bare cuBLAS GEMM of the
    same shape (the arithmetic floor), F.linear + argmax + cross_entropy, and torch.compile of that. Peaks
    are memory above the inputs; the bf16 logits alone are M x V x 2 bytes."""
    import time

    g = torch.Generator(device=device).manual_seed(3)
    dt = torch.bfloat16
    h = torch.randn(m, d, generator=g, device=device).to(dt)
    w = (torch.randn(vocab, d, generator=g, device=device) * d ** -0.5).to(dt)
    y = torch.randint(0, vocab, (m,), generator=g, device=device)
    y[: m // 2] = F.linear(h[: m // 2], w).argmax(-1)  # half the tokens are hits
    case = f"head match+NLL, M={m}, d={d}, V={vocab}, bf16"
    logits_mib = m * vocab * 2 / 2**20
    gemm = "cuBLAS bf16 GEMM (no reduction)"

    def plain(h, w, y):
        logits = F.linear(h, w)
        return logits.argmax(-1) == y, F.cross_entropy(logits.float(), y, reduction="none")

    t0 = time.perf_counter()
    compiled = torch.compile(plain)
    compiled(h, w, y)
    compile_s = time.perf_counter() - t0
    ref_match, ref_nll = plain(h, w, y)
    rows = [Row(SUITE, case, gemm, *_extra_mib(lambda: F.linear(h, w), device, repeats),
                note=f"bf16 logits {logits_mib:.0f} MiB"),
            Row(SUITE, case, "F.linear + argmax + cross_entropy", *_extra_mib(lambda: plain(h, w, y), device,
                                                                            repeats)),
            Row(SUITE, case, "torch.compile(same)", *_extra_mib(lambda: compiled(h, w, y), device, repeats),
                note=f"compile {compile_s:.0f} s, outside the timing")]
    providers = [(b, None) for b in fast_backends(device) if b != "cuda"]
    if "cuda" in fast_backends(device):
        providers += [("cuda", "gemm"), ("cuda", "simt")]
    for b, head in providers:
        def fn(b=b):
            return memscore(h[None], w, y[None], backend=b)

        with _cuda_head(head):
            t = _extra_mib(fn, device, repeats)
            got = fn()
        miss = int((got.match[0] != ref_match).sum())
        nll_err = float((got.nll[0] - ref_nll).abs().max())
        name = b + (f" ({head})" if head else "")
        # bf16 logits can tie: a handful of flipped matches is rounding, more is a bug
        rows.append(Row(SUITE, case, name, *t, ok=miss <= m // 500 and nll_err < 0.1, note=(
            f"{t[3] / logits_mib:.0%} of the bf16 logits' memory; matches differing from F.linear: "
            f"{miss}/{m}; "
            f"NLL max abs diff {nll_err:.1e}")))
    with_ratios(rows, gemm, case)
    return rows


def run(device: str = "cpu", repeats: int = 5) -> list[Row]:
    small = _small()
    gpu = device != "cpu"
    math_b = 128 if small else 1024
    lang_b = 16 if small else (1024 if gpu else 128)
    rows = []  # the Pythia-scale GPU head is its own suite (memscore_head): it leads the GPU check
    dtypes = [torch.float32, torch.float16] if gpu else [torch.float32]
    for dtype in dtypes:
        rows += bench_examples(device, repeats, 14, math_b, dtype)
        rows += bench_examples(device, max(2, repeats // 2), 50257, lang_b, dtype)
        rows += bench_argmax(device, repeats, 50257, 64 if small else 1024, dtype)
    if not gpu and fast_backends(device):
        for n in (1, 64, 128):
            rows += bench_decode_head(device, repeats, n)
    return rows


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.kernels.memscore", description="print, do not save")
    p.add_argument("--quick", action="store_true", help="BENCH_SMALL=1 sizes and 2 repeats")
    p.add_argument("--head-only", action="store_true", help="only the greedy-decoding head cases")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if args.quick:
        os.environ["BENCH_SMALL"] = "1"
    repeats = 2 if args.quick else args.repeats
    if args.head_only:
        rows = [r for n in (1, 64, 128) for r in bench_decode_head("cpu", repeats, n)]
    else:
        rows = run("cpu", repeats)
    for r in rows:
        ratio = f"{r.ratio:6.2f}x vs {r.baseline}" if r.ratio is not None else ""
        print(f"  {r.case:<55} {r.provider:<22} {r.median_ms:9.2f} ms {ratio}  {r.note}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
