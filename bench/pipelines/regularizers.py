"""Per-step cost of the three regularizers vs unregularized training, on the quick presets.

Every provider is a :class:`~tinymem_fast.tinymem.training.Trainer`
on its own copy of the same fresh model, fed
the same batches of epoch 0 (with their example ids). Steps are interleaved -- one step of each provider
per round, the order rotating every round -- so slow phases of a shared machine hit all providers alike.
Ratio = unregularized time / regularized time, so the overhead factor is 1 / ratio (SPEC target for
spectral_norm: overhead <= 1.3x).

A second case times each regularizer's own work alone (spectral_norm: power iteration + penalty forward
and backward; loss_truncation: buffer push + threshold + weights; example_tied_dropout: the masks of one
batch for every block), which stays readable on a busy machine where whole-step differences drown in
noise; its ratio is against the unregularized step.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time

import torch

from bench.harness import Row, measure, sync, with_ratios
from tinymem_fast.methods.regularizers import make_regularizer
from tinymem_fast.tinymem.data.dataset import build
from tinymem_fast.tinymem.presets import get_preset
from tinymem_fast.tinymem.training import Trainer, build_model_for, epoch_order

PRESETS = ["quick-math-noise", "quick-language-noise"]
PLAIN = "unregularized"
REGULARIZERS = ["spectral_norm", "loss_truncation", "example_tied_dropout"]


def _quantiles(ts: list[float]) -> tuple[float, float, float]:
    ts = sorted(ts)
    q = statistics.quantiles(ts, n=5) if len(ts) >= 2 else [ts[0]] * 4
    return statistics.median(ts), q[0], q[3]


def run(device: str = "cpu", repeats: int = 5) -> list[Row]:
    rows: list[Row] = []
    for preset in PRESETS:
        cfg = get_preset(preset)
        tc = cfg.train
        tc.device = device
        data = build(cfg.data, seed=cfg.seed)
        order, copy_ids = epoch_order(data.copies, cfg.seed, 0, with_copy_ids=True)
        bs = tc.batch_size
        n_batches = min(20, data.num_train // bs)
        batches = []
        for i in range(n_batches):
            sl = slice(i * bs, (i + 1) * bs)
            batches.append((data.rows[order[sl]].to(device), data.pad[order[sl]].to(device), order[sl],
                            copy_ids[sl]))
        base = build_model_for(data, cfg.model, seed=cfg.seed).to(device)
        trainers, hooks = {}, []
        for name in [PLAIN, *REGULARIZERS]:
            model = copy.deepcopy(base)
            if name == PLAIN:
                trainers[name] = Trainer(model, tc)
            else:
                # small buffer so that the truncation threshold is live (and recomputed) during the timing
                settings = dataclasses.replace(getattr(cfg.regularizer, name))
                if name == "loss_truncation":
                    settings.trunc_buffer = settings.trunc_min_count = 4 * bs
                hook = make_regularizer(name, model, settings, cfg.seed)
                hooks.append(hook)
                trainers[name] = Trainer(model, tc, [hook])
        names = list(trainers)
        times: dict[str, list[float]] = {n: [] for n in names}
        warmup, rounds = 3, max(10, 4 * repeats)
        for r in range(warmup + rounds):
            x, pad, ids, cids = batches[r % len(batches)]
            k = r % len(names)
            for name in names[k:] + names[:k]:
                sync(device)
                t0 = time.perf_counter()
                trainers[name].step(x, pad, r, ids, cids)
                sync(device)
                if r >= warmup:
                    times[name].append(1e3 * (time.perf_counter() - t0))
        shape = (f"{preset} ({cfg.model.n_layer} layers, d {cfg.model.d_model}, batch {bs} x "
                 f"{data.rows.shape[1]}, vocab {data.vocab_size})")
        case = f"train step, {shape}"
        plain_ms = statistics.median(times[PLAIN])
        for name in names:
            med, p20, p80 = _quantiles(times[name])
            peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
            note = "" if name == PLAIN else f"overhead x{med / plain_ms:.2f}, +{med - plain_ms:.2f} ms/step"
            rows.append(Row("regularizers", case, name, med, p20, p80, peak, note=note))
        with_ratios(rows, PLAIN, case)

        # the regularizers' own work, alone
        alone = f"regularizer work alone vs a whole step, {shape}"
        rows.append(Row("regularizers", alone, PLAIN, *_quantiles(times[PLAIN]), note="whole step"))
        spec, trunc, etd = hooks
        seq = torch.rand(bs, device=device)
        x, pad, ids, cids = batches[0]
        ids = ids.to(device)
        work = {
            "spectral_norm": lambda spec=spec: spec.penalty().backward(),
            "loss_truncation": lambda trunc=trunc, seq=seq: trunc.per_sequence_weights(0, seq),
            "example_tied_dropout": lambda etd=etd, ids=ids: [etd.masks(ids, b) for b in range(etd.n_blocks)],
        }
        for name, fn in work.items():
            t = measure(fn, device=device, warmup=3, repeats=max(20, 10 * repeats))
            rows.append(Row("regularizers", alone, name, *t,
                            note=f"+{t[0]:.3f} ms = {100 * t[0] / plain_ms:.1f}% of a step"))
        with_ratios(rows, PLAIN, alone)
        for h in hooks:
            h.close()
    return rows
