"""One training step of a Hugging Face causal LM, stock vs :func:`~tinymem_fast.integrations.transformers.
apply_tinymem`: time, peak memory, and how far the loss moves.

Models: GPT-2 and Llama, 4 layers, d = 256, 4 heads, vocabulary 50,257 (GPT-2's), batch 8 x 128 tokens,
dropout 0 (with attention dropout our attention falls back to SDPA), built from configs with one seed.
A step is ``model(input_ids=x, labels=x).loss`` + backward + AdamW, in float32 and under
``torch.autocast(bfloat16)`` (float32 master weights). Providers, each on its own copy of the same fresh
model: stock (SDPA attention, logits + cross-entropy), ``attention only``, ``cross-entropy only`` and
both. Steps are interleaved -- one step of each provider per round, the order rotating -- so slow phases
of a shared machine hit every provider alike. Ratio = stock time / this time.

Peak memory: growth of the process's peak RSS during one more step of that provider alone. The note
gives the absolute loss difference to stock at the first step (same weights, same batch) and after the
timed steps (the trajectories drift apart by rounding), and the backend each fused op ran on (a stale compiled
extension without an op runs its torch backend). ``BENCH_SMOKE=1``: vocabulary 2,048, 32 tokens.
"""

from __future__ import annotations

import copy
import os
import statistics
import time

import torch
import transformers as hf

from bench.harness import Row, cpu_peak_mib, sync, with_ratios
from tinymem_fast.integrations.transformers import apply_tinymem
from tinymem_fast.ops import attention, linear_cross_entropy, registry

STOCK = "HF stock (sdpa + logits CE)"
PROVIDERS = {STOCK: None, "tinymem attention only": dict(attention=True, cross_entropy=False),
             "tinymem cross-entropy only": dict(attention=False, cross_entropy=True),
             "apply_tinymem (both)": dict(attention=True, cross_entropy=True)}


def _config(arch: str, vocab: int, ctx: int):
    if arch == "gpt2":
        return hf.GPT2Config(vocab_size=vocab, n_positions=ctx, n_embd=256, n_layer=4, n_head=4,
                             resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return hf.LlamaConfig(vocab_size=vocab, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=4, intermediate_size=688, max_position_embeddings=ctx,
                          bos_token_id=1, eos_token_id=2)


def _quantiles(ts: list[float]) -> tuple[float, float, float]:
    ts = sorted(ts)
    q = statistics.quantiles(ts, n=5) if len(ts) >= 2 else [ts[0]] * 4
    return statistics.median(ts), q[0], q[3]


def _stepper(model, x, device: str, amp: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

    def step() -> float:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def run(device: str = "cpu", repeats: int = 5) -> list[Row]:
    smoke = os.environ.get("BENCH_SMOKE") == "1"
    vocab, ctx, bs = (2048, 32, 8) if smoke else (50257, 128, 8)
    x = torch.randint(0, vocab, (bs, ctx), generator=torch.Generator().manual_seed(0)).to(device)
    rows: list[Row] = []
    for arch in ("gpt2", "llama"):
        torch.manual_seed(0)
        base = hf.AutoModelForCausalLM.from_config(_config(arch, vocab, ctx)).to(device).train()
        for amp in (False, True):
            case = (f"{arch} 4x256, V {vocab:,}, batch {bs} x {ctx}, train step "
                    f"{'bf16 autocast' if amp else 'fp32'}")
            steps, first = {}, {}
            for name, kw in PROVIDERS.items():
                model = copy.deepcopy(base)
                if kw is not None:
                    apply_tinymem(model, **kw)
                steps[name] = _stepper(model, x, device, amp)
                first[name] = steps[name]()  # the same weights and batch: the first losses compare
                steps[name]()  # warm-up
            times = {name: [] for name in steps}
            last = {}
            names = list(steps)
            for r in range(max(4, repeats)):
                for name in names[r % len(names):] + names[: r % len(names)]:
                    t0 = time.perf_counter()
                    last[name] = steps[name]()
                    sync(device)
                    times[name].append((time.perf_counter() - t0) * 1e3)
            case_rows = []
            for name in names:
                peak = cpu_peak_mib(steps[name]) if device == "cpu" else None
                d_first, d_last = abs(first[name] - first[STOCK]), abs(last[name] - last[STOCK])
                note = (f"loss {first[name]:.4f}; loss diff vs stock: step 1 {d_first:.1e}, "
                        f"step {len(times[name]) + 2} {d_last:.1e}")
                if kw := PROVIDERS[name]:
                    used = [f"{what} backend {registry.default_backend(device, **fam.DISPATCH)}"
                            for what, fam, on in (("attention", attention, kw["attention"]),
                                                  ("fused CE", linear_cross_entropy, kw["cross_entropy"]))
                            if on]
                    note += "; " + ", ".join(used)
                case_rows.append(Row("hf_patch", case, name, *_quantiles(times[name]), peak_mib=peak,
                                     note=note, extra={"first_loss": first[name], "last_loss": last[name]}))
            with_ratios(case_rows, STOCK)
            rows += case_rows
            del steps
    return rows
