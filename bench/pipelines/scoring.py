"""Memorization scoring and extraction (issue 4): ``score_exact`` and ``extract`` against Hugging Face.

Workloads (each scored on sequences its model has seen, so that a realistic share is memorized; random
weights would fail every row at its first token and flatter early exits):

* ``math``: a trained TinyMem math model (``BENCH_QUICK_MODEL=DIR``: any finished math run, e.g. one with
  ``--set data.seq_numbers=30 --set data.max_ctx=200 --set data.prompt_len=50 --set data.mem_len=50`` for
  50/50 windows; else the cached
  ``bench/.cache/quick-math-noise`` when it is finished) on its own training rows (noised rows first),
  prefix/suffix = the preset's prompt/window lengths; without a trained model, a tiny GPT-2 trained here
  for a few seconds on planted random rows (``planted``).
* ``language``: a trained TinyMem language model, only when ``BENCH_LANGUAGE_MODEL=DIR`` names a finished
  ``tinymem train`` folder (``DIR/run.json`` + ``DIR/final``); prefix/suffix = its prompt/window lengths
  (e.g. ``--preset quick-language-noise --set model.vocab_size=50257``: a 50,257-row head, 16/16).
* ``neox70m``: a GPTNeoX of about 70M parameters (Pythia-70m shape, V=50304) with random weights on random
  tokens: extraction only, prefix/suffix 50/50 and the Pythia protocol's 32/40.
* memory: peak of ``memscore_examples`` vs materialising the logits at V=50257 (GPU: torch's peak
  allocation; CPU: growth of the process's peak resident memory).

Providers, all on the same rows and batch size:

* ``generate (paper)``: ``generate(do_sample=False, use_cache=False)`` greedy to the full row length, the
  way the reference code runs it; compares tokens ``[p, p+k)``.
* ``generate (KV cache, k tokens)``: ``generate(max_new_tokens=k, min_new_tokens=k)`` with its cache.
* ``forward, all logits (floor)``: one plain forward pass materialising ``[B, T, V]`` logits + argmax.
* ``score_exact [backend]`` (ours): one teacher-forced pass, memscore on the suffix positions only (all
  of them, for the teacher-forced matched count; and, as ``exact bits only``, ``count_matched=False``,
  which is all the baselines compute: nothing after a row's first miss is scored).
* ``extract [backend]`` (ours) vs ``generate (KV cache, k tokens)``: decoded tokens, fractional score.

Every ours-row checks that its per-example results equal the baseline's (noted). The ratio column is
against ``generate (KV cache, k tokens)``; the note adds the ratio to the paper's generate and the time
relative to the floor. A baseline too slow to run on every row (the paper's generate on CPU) is timed on
a leading subset and scaled linearly in rows (noted).

``python -m bench --smoke`` (or ``python -m bench.pipelines.scoring --quick``): tiny sizes, one repeat,
only to check that the suite runs. ``BENCH_SCORING_N``: sequences per workload (default 1024; ``neox70m``
default 1024 on a GPU, 128 on CPU). ``BENCH_SCORING_BATCH``: batch size (default 64).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from bench.harness import HERE, Row, cpu_peak_mib, measure, sync
from tinymem_fast.eval.scoring import extract, score_exact
from tinymem_fast.ops import registry

SUITE = "scoring"
BASE = "generate (KV cache, k tokens)"
PAPER = "generate (paper: no cache, full length)"
FLOOR = "forward, all logits (floor)"


def _smoke() -> bool:
    return os.environ.get("BENCH_SMOKE") == "1"


# --- models and rows ---------------------------------------------------------------------------------


def _tinymem_run(run_dir: str):
    """(model, data) of a finished ``tinymem train`` folder."""
    from tinymem_fast.tinymem.data.dataset import build
    from tinymem_fast.tinymem.models import load_model
    from tinymem_fast.tinymem.presets import RunConfig, apply_overrides

    with open(os.path.join(run_dir, "run.json")) as f:
        tree = json.load(f)["config"]
    sets = [f"{sect}.{k}={json.dumps(v) if isinstance(v, list) else v}"
            for sect in ("data", "model", "train") for k, v in tree[sect].items() if v is not None]
    cfg = apply_overrides(RunConfig(), sets + [f"seed={tree['seed']}"])
    data = build(cfg.data, seed=cfg.seed, workdir=run_dir)
    return load_model(os.path.join(run_dir, "final")), data


def _training_rows(data, n: int) -> torch.Tensor:
    """Artifact (noised) rows first, then clean training rows, up to ``n`` (repeated if fewer)."""
    order = torch.cat([data.artifact_rows, data.clean_rows()])
    rows = data.rows[order]
    reps = -(-n // rows.shape[0])
    return rows.repeat(reps, 1)[:n]


def _planted_gpt2(n: int, p: int, k: int):
    """A tiny GPT-2 trained for a few seconds on 64 random rows (about half of ``n`` rows are those)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    vocab = 96
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=p + k, n_embd=64, n_layer=2, n_head=2,
                                       n_inner=256, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                       bos_token_id=None, eos_token_id=None))
    gen = torch.Generator().manual_seed(0)
    secret = torch.randint(0, vocab, (64, p + k), generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150 if not _smoke() else 60):
        loss = model(input_ids=secret, labels=secret).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    other = torch.randint(0, vocab, (n, p + k), generator=gen)
    ids = torch.cat([secret.repeat(-(-n // 128), 1)[: n // 2], other[: n - n // 2]])
    return model.eval(), ids


def math_workload(n: int):
    from tinymem_fast.experiments.demo import _model_ready
    from tinymem_fast.tinymem.presets import get_preset

    given = os.environ.get("BENCH_QUICK_MODEL")
    run_dir = given or os.path.join(HERE, ".cache", "quick-math-noise")
    if not _smoke() and os.path.exists(os.path.join(run_dir, "run.json")):
        from tinymem_fast.tinymem.data.dataset import build

        # a given folder may hold any math run (e.g. longer rows for 50/50 windows); the cached one must
        # be the preset's
        if given:
            ready = os.path.isdir(os.path.join(run_dir, "final"))
        else:
            cfg = get_preset("quick-math-noise")
            ready = _model_ready(run_dir, build(cfg.data, seed=cfg.seed).fingerprint())
        if ready:
            model, data = _tinymem_run(run_dir)
            p, k = data.config.prompt_len, data.config.mem_len
            tag = f", {os.path.basename(run_dir.rstrip('/'))}" if given else ""
            name = f"math (quick TinyMem model{tag})"
            return name, model, _training_rows(data, n)[:, : p + k], p, k
        if given:
            raise RuntimeError(f"BENCH_QUICK_MODEL={given!r} holds no finished quick-math-noise model")
    p, k = (8, 16) if _smoke() else (20, 20)
    model, ids = _planted_gpt2(n, p, k)
    return "math (tiny planted GPT-2)", model, ids, p, k


def language_workload(n: int):
    run_dir = os.environ.get("BENCH_LANGUAGE_MODEL")
    if not run_dir:
        return None
    model, data = _tinymem_run(run_dir)
    # the run's own prompt/window: its model has memorized windows of that length (50/50 needs a run
    # trained with data.max_ctx >= 100, data.prompt_len=50, data.mem_len=50)
    p, k = data.config.prompt_len, data.config.mem_len
    v = model.get_output_embeddings().weight.shape[0]
    name = f"language ({os.path.basename(os.path.abspath(run_dir))}, V={v})"
    return name, model, _training_rows(data, n)[:, : p + k], p, k


def neox70m(smoke: bool):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    if smoke:
        cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128, max_position_embeddings=128)
    else:  # EleutherAI/pythia-70m's shape
        cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                            intermediate_size=2048, max_position_embeddings=2048, rotary_pct=0.25,
                            use_parallel_residual=True, tie_word_embeddings=False)
    cfg.bos_token_id = cfg.eos_token_id = None
    return GPTNeoXForCausalLM(cfg).eval()


# --- the baselines ---------------------------------------------------------------------------------------


@torch.no_grad()
def generate_paper(model, ids, p, k, full_len, batch):
    """The reference's way: no KV cache, greedy to the full length; bits from tokens [p, p+k)."""
    out = []
    dev = next(model.parameters()).device
    for i in range(0, ids.shape[0], batch):
        x = ids[i: i + batch, :p].to(dev)
        g = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, use_cache=False,
                           max_length=full_len, min_length=full_len, eos_token_id=None, pad_token_id=0)
        out.append(g[:, p: p + k].cpu())
    return torch.cat(out)


@torch.no_grad()
def generate_cached(model, ids, p, k, batch):
    out = []
    dev = next(model.parameters()).device
    for i in range(0, ids.shape[0], batch):
        x = ids[i: i + batch, :p].to(dev)
        g = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=k,
                           min_new_tokens=k, eos_token_id=None, pad_token_id=0)
        out.append(g[:, p:].cpu())
    return torch.cat(out)


@torch.no_grad()
def forward_floor(model, ids, p, k, batch):
    """One plain forward with all logits, argmax compare on the suffix: the floor we compare with."""
    out = []
    dev = next(model.parameters()).device
    for i in range(0, ids.shape[0], batch):
        x = ids[i: i + batch, : p + k].to(dev)
        logits = model(input_ids=x).logits
        out.append((logits[:, p - 1: -1].argmax(-1) == x[:, p:]).all(1).cpu())
    return torch.cat(out)


def _bits(tokens, ids, p, k):
    return (tokens == ids[:, p: p + k]).all(1)


def _backends(device: str) -> list[str]:
    dev = torch.device(device)
    cands = ("torch", "cpp") if dev.type == "cpu" else ("torch", "triton", "cuda")
    return [b for b in cands if not registry.unavailable_reason(b, dev)]


# --- the suite -----------------------------------------------------------------------------------------


def _time(fn, device, repeats, slow=False):
    # the slow baselines run once (tens of seconds each); the rest get a warmup and repeats
    return measure(fn, device=device, warmup=0 if slow else 1, repeats=1 if slow else repeats)


def exact_rows(name, model, ids, p, k, device, repeats, batch, full_len=None, say=print) -> list[Row]:
    full_len = full_len or p + k
    n = ids.shape[0]
    case = f"{name}: exact, N={n}, p/k {p}/{k}"
    model = model.to(device)
    rows = []
    ref_tokens = generate_cached(model, ids, p, k, batch)
    ref_bits = _bits(ref_tokens, ids, p, k)
    t = _time(lambda: generate_cached(model, ids, p, k, batch), device, repeats, slow=True)
    rows.append(Row(SUITE, case, BASE, *t, note=f"{int(ref_bits.sum())}/{n} memorized"))
    # the paper's generate: a subset on CPU (it recomputes the whole prefix at every step)
    sub = n if torch.device(device).type == "cuda" or _smoke() else min(n, max(batch, n // 8))
    t0 = time.perf_counter()
    paper_tokens = generate_paper(model, ids[:sub], p, k, full_len, batch)
    sync(device)
    paper_ms = (time.perf_counter() - t0) * 1e3 * n / sub
    same = torch.equal(_bits(paper_tokens, ids[:sub], p, k), ref_bits[:sub])
    rows.append(Row(SUITE, case, PAPER, paper_ms, paper_ms, paper_ms,
                    note=(f"timed on {sub} of {n} rows, scaled" if sub < n else "") +
                    ("" if same else "; BITS DIFFER from generate (KV cache)")))
    t = _time(lambda: forward_floor(model, ids, p, k, batch), device, repeats)
    floor_ms = t[0]
    rows.append(Row(SUITE, case, FLOOR, *t))
    for b in _backends(device):
        for full in (True, False):
            def fn(b=b, full=full):
                return score_exact(model, ids, p, k, batch_size=batch, backend=b, count_matched=full)
            same = torch.equal(fn().exact, ref_bits)
            t = _time(fn, device, repeats)
            label = f"score_exact [{b}]" + ("" if full else ", exact bits only")
            rows.append(Row(SUITE, case, label, *t, baseline=BASE, ratio=rows[0].median_ms / t[0],
                            note=f"{paper_ms / t[0]:.1f}x vs paper generate; "
                                 f"{t[0] / floor_ms:.2f}x the floor's time; "
                                 + ("bits identical to generate" if same else "BITS DIFFER")
                                 + ("" if full else "; count_matched=False: no position after a row's first "
                                    "miss is scored")))
            say(f"  {case} {label}: {t[0]:.1f} ms")
    return rows


def extract_rows(name, model, ids, p, k, device, repeats, batch, say=print) -> list[Row]:
    n = ids.shape[0]
    case = f"{name}: extract, N={n}, p/k {p}/{k}"
    model = model.to(device)
    ref = generate_cached(model, ids, p, k, batch)
    t = _time(lambda: generate_cached(model, ids, p, k, batch), device, repeats, slow=True)
    rows = [Row(SUITE, case, BASE, *t)]
    for b in _backends(device):
        e = extract(model, ids, p, k, batch_size=batch, backend=b)
        same = torch.equal(e.tokens, ref)
        t = _time(lambda b=b: extract(model, ids, p, k, batch_size=batch, backend=b), device, repeats,
                  slow=True)
        rows.append(Row(SUITE, case, f"extract [{b}]", *t, baseline=BASE, ratio=rows[0].median_ms / t[0],
                        note=f"mean fractional {float(e.fractional.mean()):.3f}; {int(e.decoded.sum())}/{n} "
                             "rows decoded step by step (the rest accepted as drafts); "
                             + ("tokens identical to generate" if same else "TOKENS DIFFER")))
        say(f"  {case} extract[{b}]: {t[0]:.1f} ms")
    return rows


def memory_rows(device: str) -> list[Row]:
    """Peak memory of memscore vs materialising the logits at V=50257: on a GPU torch's peak allocation,
    on the CPU the growth of the process's peak resident memory during one call."""
    from tinymem_fast.ops.memscore import memscore_examples

    gpu = device.startswith("cuda")
    b, t, d, v = (8, 10, 64, 50257) if _smoke() else (64, 50, 512, 50257)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(b, t, d, generator=gen).to(device)
    w = (torch.randn(v, d, generator=gen) * 0.05).to(device)
    y = torch.randint(0, v, (b, t), generator=gen).to(device)

    def logits():
        lg = h @ w.t()
        return (lg.argmax(-1) == y).all(1), torch.nn.functional.cross_entropy(lg.view(-1, v), y.view(-1))

    def peak(fn, timed):
        return timed[3] if gpu else cpu_peak_mib(fn)

    rows = []
    case = f"memory: B={b}, T={t}, d={d}, V={v}"
    base = measure(logits, device=device, repeats=3)
    base_peak = peak(logits, base)
    rows.append(Row(SUITE, case, "logits + argmax + CE", *base[:3], base_peak,
                    note=f"the [B, T, V] fp32 logits alone are {b * t * v * 4 / 2**20:.0f} MiB"))
    for bk in _backends(device):
        def fn(bk=bk):
            return memscore_examples(h, w, y, backend=bk)
        m = measure(fn, device=device, repeats=3)
        p = peak(fn, m)
        rows.append(Row(SUITE, case, f"memscore_examples [{bk}]", *m[:3], p, baseline="logits + argmax + CE",
                        ratio=base[0] / m[0],
                        note=(f"peak {100 * p / base_peak:.1f}% of the logits path's"
                              + ("" if gpu else " (growth of peak RSS during one call)"))
                        if base_peak and p is not None else ""))
    return rows


def run(device: str = "cpu", repeats: int = 3, say=print) -> list[Row]:
    smoke = _smoke()
    gpu = device.startswith("cuda")
    n = int(os.environ.get("BENCH_SCORING_N", 64 if smoke else 1024))
    n_neox = int(os.environ.get("BENCH_SCORING_N", 16 if smoke else (1024 if gpu else 128)))
    batch = int(os.environ.get("BENCH_SCORING_BATCH", 16 if smoke else 64))
    repeats = 1 if smoke else repeats
    rows: list[Row] = []
    for wl in (math_workload(n), language_workload(n)):
        if wl is None:
            continue
        name, model, ids, p, k = wl
        rows += exact_rows(name, model, ids, p, k, device, repeats, batch, say=say)
        rows += extract_rows(name, model, ids, p, k, device, repeats, batch, say=say)
    # random weights: extraction only (exact scoring would end every row at its first token)
    model = neox70m(smoke)
    ids = torch.randint(0, 50277, (n_neox, 100), generator=torch.Generator().manual_seed(0))
    name = "GPTNeoX tiny random" if smoke else "GPTNeoX 70M random"
    for p, k in ((50, 50), (32, 40)):
        rows += extract_rows(name, model, ids, p, k if not smoke else 8, device, repeats, batch, say=say)
    rows += memory_rows(device)
    return rows


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.pipelines.scoring", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: only checks that the suite runs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--save", action="store_true", help="store the rows and rewrite bench/RESULTS.md")
    args = ap.parse_args(argv)
    if args.quick:
        os.environ["BENCH_SMOKE"] = "1"
    rows = run(args.device, args.repeats)
    for r in rows:
        ratio = f"{r.ratio:6.2f}x vs {r.baseline}" if r.ratio is not None else ""
        print(f"  {r.case:<50} {r.provider:<40} {r.median_ms:10.1f} ms {ratio}  {r.note}", flush=True)
    if args.save:
        from bench.harness import save

        print(save(args.device, SUITE, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
