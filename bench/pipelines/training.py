"""Training throughput (tokens/s) on the quick math preset: our loop vs a plain Hugging Face loop.

Baseline: ``model(input_ids=x, labels=x).loss`` + AdamW with the paper's settings, the way the paper's
code trains. Ours: :class:`~tinymem_fast.tinymem.training.Trainer`
(pad-masked loss), eager, compiled and in bf16
mixed precision (``train.precision=bf16``). The same HF loop under a plain ``torch.autocast`` is shown
too, so the gain of our mixed precision over autocast alone is visible.
Tokens counted per step are batch x context (the same for every provider).
"""

from __future__ import annotations

import dataclasses

import torch

from bench.harness import Row, measure, with_ratios
from tinymem_fast.tinymem.data.dataset import build
from tinymem_fast.tinymem.models import build_model
from tinymem_fast.tinymem.presets import get_preset
from tinymem_fast.tinymem.training import Trainer, epoch_order


def run(device: str = "cpu", repeats: int = 5) -> list[Row]:
    cfg = get_preset("quick-math-noise")
    data = build(cfg.data, seed=0)
    order = epoch_order(data.copies, 0, 0)
    bs = cfg.train.batch_size
    batches = [(data.rows[order[i: i + bs]].to(device), data.pad[order[i: i + bs]].to(device))
               for i in range(0, 20 * bs, bs)]
    tokens = bs * data.rows.shape[1]
    case = f"train step, quick math preset ({cfg.model.n_layer} layers, batch {bs} x {data.rows.shape[1]})"
    rows = []

    def hf_provider(amp: bool = False):
        model = build_model(cfg.model, data.vocab_size, cfg.data.max_ctx).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98))
        it = iter(range(10**9))

        def step():
            x, _ = batches[next(it) % len(batches)]
            with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
                loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    def ours(compile_model: bool, precision: str = "fp32"):
        model = build_model(cfg.model, data.vocab_size, cfg.data.max_ctx).to(device)
        # a copy per provider: the Trainer keeps its config, so a shared one would leak settings
        tc = dataclasses.replace(cfg.train, compile=compile_model, precision=precision)
        trainer = Trainer(model, tc)
        it = iter(range(10**9))

        def step():
            x, pad = batches[next(it) % len(batches)]
            trainer.step(x, pad)

        return step

    providers = [("HF loop (labels=input_ids)", hf_provider()), ("tinymem eager", ours(False)),
                 ("tinymem compiled", ours(True)), ("HF loop + torch.autocast bf16", hf_provider(True)),
                 ("tinymem bf16 mixed precision", ours(False, "bf16"))]
    for name, fn in providers:
        t = measure(fn, device=device, warmup=3, repeats=max(10, repeats * 4))
        rows.append(Row("training", case, name, *t, note=f"{tokens / (t[0] / 1e3):,.0f} tokens/s"))
    with_ratios(rows, "HF loop (labels=input_ids)")
    return rows
