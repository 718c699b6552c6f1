"""Memorization scoring at Pythia scale: ``score_exact`` and ``extract`` on a 1.4B-parameter model, bf16, GPU.

Workload: a GPTNeoX with random weights and Pythia-1.4B's shape (hidden 2048, 24 layers, 16 heads,
intermediate 8192, V=50304, rotary_pct 0.25, parallel residual, untied embeddings, 2048 positions;
``BENCH_SCALE_MODEL=6.9b``: Pythia-6.9B's, hidden 4096, 32 layers, 32 heads, intermediate 16384), built
directly on the GPU in bf16 (no fp32 copy anywhere), on 1,024 random rows (``BENCH_SCALE_N``) of 72
tokens with the Pythia protocol's windows: prefix 32, suffix 40; batch 64 (``BENCH_SCORING_BATCH``).

Random weights make every row fail at its first suffix token, which would flatter any early exit, so
``score_exact`` runs with ``count_matched=True``: no row leaves after its first miss, every suffix position
is scored (the teacher-forced matched count). That alone does not stop the triton kernel's token-level
pruning (a token stops being scored once some logit provably beats its target; with random targets that
happens within the first few vocabulary tiles), so ``score_exact`` is also timed on memorized rows: the
subset's prefixes with generate's own continuation as their suffix, repeated to N rows, where every
target is the argmax and no token can be pruned -- the unflattered figure. (The cuda backend's cuBLAS
path never prunes.) ``extract`` is timed on random rows, its worst case: every row is decoded step by
step (memorized rows would be accepted as drafts in one pass).

Rows (ratio column: ``generate (KV cache, k tokens)`` time / this time, measured in the same run):

* ``generate (KV cache, k tokens)``: ``model.generate(max_new_tokens=k, min_new_tokens=k)`` greedy with
  its cache, the baseline. Timed once on a leading subset (128 rows, ``BENCH_SCALE_SUBSET``, rounded up
  to whole batches) and scaled linearly in rows for the all-rows case (noted).
* ``forward, all logits (floor)``: one plain forward materialising ``[B, T, V]`` logits + argmax, all rows.
* ``score_exact [backend]`` (random rows) and ``score_exact [backend], memorized rows`` for each GPU
  backend available (triton, cuda), all N rows: the note gives the time relative to the floor (target
  <= 1.1x), sequences/s and the model FLOP utilisation.
* ``extract [backend]`` on the generate baseline's subset, against generate on that subset (target
  >= 1.5x).

FLOPs are 2 x parameters x tokens: the body's non-embedding parameters over the tokens it runs on and
the output head's over the positions it scores (score_exact, extract, generate: body 71 = p + k - 1 and
head 40 = k per row; the floor: 72 and 72). Attention's own FLOPs (QK^T, AV) are ignored. MFU is against
the GPU's dense bf16 peak (H100 SXM / H200: 989.4 TFLOPS, H100 PCIe: 756); other GPUs get achieved
TFLOPS only.

Correctness (``Row.ok``; False fails ``python -m bench``):

* bf16: on random rows, ``score_exact``'s and ``extract``'s exact bits equal those derived from
  generate's tokens on the subset (they are all False). Noted but not required in bf16, where the stock
  model's own logits can tie within bf16 rounding (a full-sequence and a KV-cache pass round differently):
  extract's token agreement with generate, and how many memorized rows the teacher-forced pass finds exact.
* fp32, after the bf16 timings (``model.float()``): on 32 rows (``BENCH_SCALE_CHECK``), half of them
  given the model's own greedy continuation as their suffix (so that both exact outcomes occur),
  ``extract``'s tokens must equal generate's token for token, and ``score_exact``'s and ``extract``'s
  exact bits and first mismatches must equal those derived from generate's tokens.

Budget: expected about 30-60 s on an H200 for 1.4B with ``--repeats 5`` (not yet measured), about twice
that for 6.9B. It is dominated by the step-by-step decoders (generate and extract: 40 Hugging Face forward
steps per batch, bound by per-step overhead rather than FLOPs) and by the Triton kernels' first-call
compilation; the all-row passes take well under a second each at 1.4B.

``python -m bench --only scoring_scale`` on a GPU. ``--smoke`` (``BENCH_SMOKE=1``): a tiny GPTNeoX
(hidden 64, 2 layers, V=50304) on 16 rows with suffix 8, fp32 on the CPU (torch and cpp backends), to
check the code paths; on a CPU without ``--smoke`` the suite returns a single row saying it needs a GPU.
"""

from __future__ import annotations

import os
import time

import torch

from bench.harness import Row, measure, sync, with_ratios
from bench.pipelines.scoring import forward_floor, generate_cached
from tinymem_fast.eval.scoring import DEFAULT_TIE_MARGIN, extract, score_exact
from tinymem_fast.ops import registry

SUITE = "scoring_scale"
BASE = "generate (KV cache, k tokens)"
FLOOR = "forward, all logits (floor)"
PREFIX, SUFFIX = 32, 40
TARGET_FLOOR = 1.1  # score_exact time / the floor's, at most
TARGET_EXTRACT = 1.5  # generate time / extract's, at least

SHAPES = {  # Pythia's shapes (EleutherAI/pythia-1.4b, -6.9b); the rest is in build_model
    "1.4b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, intermediate_size=8192),
    "6.9b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=16384),
}
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)


def _smoke() -> bool:
    return os.environ.get("BENCH_SMOKE") == "1"


def peak_tflops(device_name: str) -> float | None:
    """Dense (no sparsity) bf16 tensor-core peak of the GPU, or None where this table does not know it."""
    name = device_name.upper()
    if "NVL" in name:  # H100 NVL / H200 NVL: other clocks and power limits; not in this table
        return None
    if "H200" in name:
        return 989.4
    if "H100" in name:
        return 756.0 if "PCIE" in name else 989.4 if ("SXM" in name or "HBM3" in name) else None
    return None


def build_model(shape: str | None, device: str, dtype: torch.dtype):
    """A random-weight GPTNeoXForCausalLM of the named Pythia shape (None: the tiny smoke model), made
    directly on ``device`` in ``dtype``."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    dims = TINY if shape is None else SHAPES[shape]
    cfg = GPTNeoXConfig(vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25,
                        use_parallel_residual=True, tie_word_embeddings=False, **dims)
    cfg.bos_token_id = cfg.eos_token_id = None
    torch.manual_seed(0)
    with torch.device(device):  # parameters are created (and initialised) there, in dtype
        model = GPTNeoXForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval()


def param_counts(model) -> tuple[int, int]:
    """(body parameters without the input embedding, output head parameters)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(q.numel() for q in model.parameters())
    if head is emb:  # tied: the one matrix is the head
        return total - emb.numel(), head.numel()
    return total - emb.numel() - head.numel(), head.numel()


def _backends(device: str) -> list[str]:
    dev = torch.device(device)
    cands = ("torch", "cpp") if dev.type == "cpu" else ("triton", "cuda")
    return [b for b in cands if not registry.unavailable_reason(b, dev)]


def _bits(tokens, ids, p, k):
    return (tokens == ids[:, p: p + k]).all(1)


def _first_miss(tokens, ids, p, k):
    """Offset of the first generated token that differs from the reference suffix (k when none)."""
    miss = tokens != ids[:, p: p + k]
    return torch.where(miss.any(1), miss.int().argmax(1), torch.full_like(miss[:, 0], k, dtype=torch.long))


class _Rate:
    """Sequences/s and FLOP rate of a timing, as a note and as Row.extra."""

    def __init__(self, body: int, head: int, peak: float | None):
        self.body, self.head, self.peak = body, head, peak

    def __call__(self, rows: int, ms: float, body_tokens: int, head_tokens: int) -> tuple[str, dict]:
        flops = 2.0 * rows * (self.body * body_tokens + self.head * head_tokens)
        tflops = flops / (ms * 1e-3) / 1e12
        extra = {"seq_per_s": rows / (ms * 1e-3), "tflops": tflops}
        note = f"{extra['seq_per_s']:.0f} seq/s; {tflops:.1f} TFLOPS"
        if self.peak:
            extra["mfu"] = tflops / self.peak
            note += f" = {100 * extra['mfu']:.1f}% MFU of {self.peak:g}"
        return note, extra


def _once(fn, device):
    """(result, ms) of one call."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, (time.perf_counter() - t0) * 1e3


def _needs_gpu_row(shape: str) -> Row:
    nan = float("nan")
    return Row(SUITE, f"GPTNeoX {shape}-shape random, p/k {PREFIX}/{SUFFIX}", "(not run)", nan, nan, nan,
               note="needs a GPU: a 1.4B model on 1,024 rows would take hours on CPU; --smoke runs a tiny "
                    "model here")


def run(device: str = "cpu", repeats: int = 3, say=print) -> list[Row]:
    smoke = _smoke()
    gpu = device.startswith("cuda")
    shape = os.environ.get("BENCH_SCALE_MODEL", "1.4b").lower()
    if shape not in SHAPES:
        raise ValueError(f"BENCH_SCALE_MODEL must be one of {', '.join(SHAPES)}, got {shape!r}")
    if not gpu and not smoke:
        return [_needs_gpu_row(shape)]
    n = int(os.environ.get("BENCH_SCALE_N", 16 if smoke else 1024))
    batch = int(os.environ.get("BENCH_SCORING_BATCH", 4 if smoke else 64))
    sub = int(os.environ.get("BENCH_SCALE_SUBSET", 8 if smoke else 128))
    sub = min(n, batch * -(-sub // batch))  # whole batches, so that scaling by rows is linear
    n_check = min(n, int(os.environ.get("BENCH_SCALE_CHECK", 8 if smoke else 32)))
    p, k = PREFIX, 8 if smoke else SUFFIX
    repeats = 1 if smoke else max(1, repeats)
    dtype = torch.bfloat16 if gpu else torch.float32
    dname = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]

    t0 = time.perf_counter()
    model = build_model(None if smoke else shape, device, dtype)
    sync(device)
    body_params, head_params = param_counts(model)
    name = ("GPTNeoX tiny random" if smoke else f"GPTNeoX {shape}-shape random") + f" {dname}"
    say(f"  {name}: {body_params / 1e6:.1f}M body + {head_params / 1e6:.1f}M head parameters, built in "
        f"{time.perf_counter() - t0:.1f} s")
    peak = peak_tflops(torch.cuda.get_device_name(torch.device(device))) if gpu else None
    rate = _Rate(body_params, head_params, peak)
    ids = torch.randint(0, 50277, (n, p + k), generator=torch.Generator().manual_seed(0))
    backends = _backends(device)
    rows: list[Row] = []
    case_all = f"{name}: N={n}, p/k {p}/{k}, batch {batch}"
    case_sub = f"{name}: extract, leading {sub} of {n} rows, p/k {p}/{k}, batch {batch}"

    # the baseline, on the subset: one untimed run (its tokens; also the warmup), one timed run
    gen_tokens = generate_cached(model, ids[:sub], p, k, batch)
    gen_bits = _bits(gen_tokens, ids[:sub], p, k)
    gt = measure(lambda: generate_cached(model, ids[:sub], p, k, batch), device=device, warmup=0, repeats=1)
    gen_sub_ms, gen_all_ms = gt[0], gt[0] * n / sub
    note, extra = rate(sub, gen_sub_ms, p + k - 1, k)
    rows.append(Row(SUITE, case_sub, BASE, *gt, note=f"one run; {note}; {int(gen_bits.sum())}/{sub} exact",
                    extra=extra))
    note, extra = rate(n, gen_all_ms, p + k - 1, k)
    rows.append(Row(SUITE, case_all, BASE, gen_all_ms, gen_all_ms, gen_all_ms, gt[3],
                    note=(f"timed once on the leading {sub} of {n} rows, scaled linearly in rows; " if sub < n
                          else "one run; ") + note, extra=extra))
    say(f"  {case_all} {BASE}: {gen_sub_ms:.1f} ms on {sub} rows")
    # memorized rows: the subset's prefixes with generate's own continuation as their suffix, repeated to N
    # rows. Every target is then the argmax, so the kernels can prune no token (random targets are beaten
    # within the first few vocabulary tiles, and the triton kernel stops scoring such tokens there)
    mem = ids[:sub].clone()
    mem[:, p: p + k] = gen_tokens
    mem = mem.repeat(-(-n // sub), 1)[:n]

    ft = measure(lambda: forward_floor(model, ids, p, k, batch), device=device, warmup=1, repeats=repeats)
    floor_ms = ft[0]
    note, extra = rate(n, floor_ms, p + k, p + k)
    rows.append(Row(SUITE, case_all, FLOOR, *ft, note=note, extra=extra))
    say(f"  {case_all} {FLOOR}: {floor_ms:.1f} ms")

    exact_bits = {}
    for b in backends:
        for memorized in (True, False):
            x = mem if memorized else ids

            def score(b=b, x=x):
                return score_exact(model, x, p, k, batch_size=batch, backend=b, count_matched=True)
            res = score()  # the check, and the warmup (compilation)
            t = measure(score, device=device, warmup=0, repeats=repeats)
            rel = t[0] / floor_ms
            note, extra = rate(n, t[0], p + k - 1, k)
            extra.update(floor_ratio=rel, exact_rows=int(res.exact.sum()))
            head = (f"{rel:.2f}x the floor's time (target <= {TARGET_FLOOR}x: "
                    f"{'met' if rel <= TARGET_FLOOR else 'MISSED'}); {note}; count_matched=True; ")
            if memorized:
                ok = None
                tail = (f"memorized rows (the {sub}-row subset with generate's own continuation as suffix, "
                        f"repeated to {n}): no token prunable; {extra['exact_rows']}/{n} rows exact in "
                        + ("the teacher-forced pass (fp32: all expected)" if dtype == torch.float32 else
                           f"the teacher-forced {dname} pass (the rest: {dname} rounding of a full-sequence "
                           "vs a KV-cache pass at near-ties; exactness is checked in fp32 below)"))
                label = f"score_exact [{b}], memorized rows"
            else:
                exact_bits[b] = res.exact
                ok = torch.equal(res.exact[:sub], gen_bits)
                first0 = int((res.first_mismatch == 0).sum())
                tail = (f"random rows: {first0}/{n} miss at their first token"
                        + (", and the kernel stops scoring a token once a logit provably beats its target "
                           "(flatters this row: see memorized rows)" if b in ("triton", "cpp") else "")
                        + "; exact bits " + (f"identical to generate's on the {sub}-row subset" if ok
                                             else "DIFFER from generate's"))
                label = f"score_exact [{b}]"
            rows.append(Row(SUITE, case_all, label, *t, ok=ok, extra=extra, note=head + tail))
            say(f"  {case_all} {label}: {t[0]:.1f} ms")

    for b in backends:
        def ext(b=b):
            return extract(model, ids[:sub], p, k, batch_size=batch, backend=b)
        e = ext()
        ok = torch.equal(e.exact, gen_bits) and torch.equal(e.exact, exact_bits[b][:sub])
        same_rows = int((e.tokens == gen_tokens).all(1).sum())
        t = measure(ext, device=device, warmup=0, repeats=min(repeats, 3))
        ratio = gen_sub_ms / t[0]
        note, extra = rate(sub, t[0], p + k - 1, k)
        extra.update(rows_tokens_identical=same_rows, decoded=int(e.decoded.sum()))
        rows.append(Row(SUITE, case_sub, f"extract [{b}]", *t, ok=ok, extra=extra, note=(
            f"target >= {TARGET_EXTRACT}x vs generate: {'met' if ratio >= TARGET_EXTRACT else 'MISSED'}; "
            f"{note}; random rows: {extra['decoded']}/{sub} decoded step by step; exact bits "
            + ("identical to generate's and score_exact's" if ok else "DIFFER (generate / score_exact)")
            + f"; tokens identical to generate on {same_rows}/{sub} rows"
            + (f" ({dname}: near-ties may round either way; token identity is checked in fp32)"
               if dtype != torch.float32 else ""))))
        say(f"  {case_sub} extract [{b}]: {t[0]:.1f} ms")
    with_ratios(rows, BASE)

    rows += fp32_check(model, ids[:n_check], p, k, batch, device, backends, say)
    return rows


@torch.no_grad()
def _top2_gap(model, x, pos):
    """Top-1 minus top-2 logit of the stock model's teacher-forced pass over rows ``x`` at ``pos``."""
    dev = next(model.parameters()).device
    logits = model(input_ids=x.to(dev)).logits
    sel = logits[torch.arange(x.shape[0], device=dev), pos.to(dev)].float()
    top = sel.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).cpu()


def fp32_check(model, ids, p, k, batch, device, backends, say=print) -> list[Row]:
    """Token identity in fp32 (the model converted in place): the second half of ``ids`` gets the model's
    own greedy continuation as its suffix, so that rows of both exact outcomes are checked. A row may
    differ from generate only where the stock model's own fp32 logits tie (top-2 gap below
    DEFAULT_TIE_MARGIN at the first position where they part; two passes of other shapes round apart)."""
    model.float()
    model.config.dtype = torch.float32  # _from_config recorded bf16 there
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    n = ids.shape[0]
    half = n // 2
    planted = ids.clone()
    # decoded in the same batches as the reference run below, so the planted rows must come out exact
    planted[half:, p: p + k] = generate_cached(model, ids, p, k, batch)[half:]
    ref, ms = _once(lambda: generate_cached(model, planted, p, k, batch), device)
    bits, first = _bits(ref, planted, p, k), _first_miss(ref, planted, p, k)
    planted_ok = bool(bits[half:].all())
    ctx = torch.cat([planted[:, :p], ref], 1)  # generate's context at every step
    tie = DEFAULT_TIE_MARGIN[torch.float32]

    def judge(differ, where):
        """(ok, note) for rows ``differ`` [N] bool that part from generate at suffix offset ``where`` [N]."""
        rows = differ.nonzero().reshape(-1)
        if not rows.numel():
            return True, ""
        ties = int((_top2_gap(model, ctx[rows], p - 1 + where[rows]) < tie).sum())
        return ties == rows.numel(), (f"; {rows.numel()} row(s) differ, {ties} of them at a near-tie of the "
                                      f"stock model's logits (top-2 gap < {tie:g}: allowed)")

    case = f"fp32 check: N={n} ({n - half} with the model's own continuation planted), p/k {p}/{k}"
    rows = [Row(SUITE, case, BASE, ms, ms, ms, ok=planted_ok, note=f"one run; {int(bits.sum())}/{n} exact"
                + ("" if planted_ok else "; DID NOT reproduce its own continuation on the planted rows"))]
    for b in backends:
        s, ms = _once(lambda b=b: score_exact(model, planted, p, k, batch_size=batch, backend=b,
                                               count_matched=True), device)
        differ = (s.exact != bits) | (s.first_mismatch != first)
        ok, why = judge(differ, torch.minimum(s.first_mismatch, first))
        rows.append(Row(SUITE, case, f"score_exact [{b}]", ms, ms, ms, ok=ok, note=(
            f"one run; {int(s.exact.sum())}/{n} exact; exact bits and first mismatches "
            + ("identical to generate's" if not why else "checked against generate's") + why
            + ("" if ok else "; FAILED"))))
        e, ms = _once(lambda b=b: extract(model, planted, p, k, batch_size=batch, backend=b), device)
        apart = e.tokens != ref
        differ = apart.any(1)
        ok, why = judge(differ, apart.int().argmax(1))
        # rows with generate's tokens must also carry its exact bit and first mismatch
        same = ~differ
        ok = (ok and torch.equal(e.exact[same], bits[same])
              and torch.equal(e.first_mismatch[same], first[same]))
        rows.append(Row(SUITE, case, f"extract [{b}]", ms, ms, ms, ok=ok, note=(
            f"one run; tokens identical to generate on {int(same.sum())}/{n} rows" + why
            + f"; {int(e.exact.sum())}/{n} exact; {int(e.decoded.sum())}/{n} decoded step by step"
            + ("" if ok else "; FAILED"))))
        say(f"  {case} [{b}]: {'ok' if rows[-1].ok and rows[-2].ok else 'FAILED'}")
    return rows


if __name__ == "__main__":
    import sys

    from bench.__main__ import main

    sys.exit(main(["--only", SUITE, *sys.argv[1:]]))
