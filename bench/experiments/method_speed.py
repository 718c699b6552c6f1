"""Unlearning methods end to end against straightforward reference-style runs at the same settings.

A user runs methods, not kernels: this suite times whole edits on the quick math model (the
``tinymem_quick`` cache: 14-ish forget rows, 2,000 retain rows) and reports each next to what the edit
achieved (memorized % and accuracy after, from the same evaluation), so a speed-up never hides a worse
result. Every figure is from one run of this suite, same settings for both sides.

* **plain training step** -- ``Trainer.step`` (AdamW, every weight trained) on 64 retain rows: the unit a
  method step is measured in. fp32, and bf16 where the CPU has native bf16 (so for every "bf16" below).
* **BalancedSubnet** (ratio 0.1, score lr 1.0, alpha 0.95, 10 epochs, batch 64): ours, fp32 and bf16,
  against a reference-style implementation written here as SPEC.md describes the reference running it:
  a full sort of every score tensor on every forward, ``W * M`` materialised in every layer, forget and
  retain rows shuffled into one loader of batches of 64 whose forget-row mean is NaN when a batch has no
  forget row (those steps run their forward and are skipped), float32 (the masked layer is
  bench.pipelines.unlearning's SortedMaskedLayer, the reference-style layer of the unlearning suite).

* **Integrated Gradients** (ratio 0.05, 20 steps): ours (every replica of a row a one-token branch off
  its clean prefix, one pass per row), fp32 and bf16, against the reference's loop with its alpha steps
  batched (SPEC.md permits it): one forward/backward of the ``ig_steps`` scaled copies of ``ids[:t + 1]``
  per (forget row, layer, position), fp32. Same attribution (relative difference reported), same
  neurons ablated.

``BENCH_METHOD_EPOCHS`` changes BalancedSubnet's epochs (both sides); ``BENCH_METHODS`` picks cases
(``balanced_subnet,integrated_gradients``, the default).
"""

from __future__ import annotations

import copy
import os
import statistics
import time

import torch

from bench.experiments.method_baselines import _inputs
from bench.experiments.tinymem_quick import trained_run
from bench.harness import Row
from bench.pipelines.unlearning import SortedMaskedLayer
from tinymem_fast.integrations.adapters import mlp_layers
from tinymem_fast.integrations.mixed_precision import native_bf16
from tinymem_fast.methods import get_method
from tinymem_fast.methods.registry import make_config
from tinymem_fast.tinymem.data.dataset import build
from tinymem_fast.tinymem.presets import get_preset
from tinymem_fast.tinymem.results import stats, utility
from tinymem_fast.tinymem.training import TrainConfig, Trainer, token_loss

SUITE = "method_speed"
# bf16 only where it is native (a GPU, AVX512-BF16 / AMX): elsewhere it is emulated, several times slower
# than fp32, and --precision auto never picks it
PRECISIONS = ("fp32", "bf16") if native_bf16("cpu") else ("fp32",)
SETTINGS = dict(ratio=0.1, lr=1.0, loss_weight=0.95, batch_size=64)
REF = "reference-style (sort per forward, W*M, one shuffled loader), fp32"


# --- the reference-style BalancedSubnet --------------------------------------------------------------


def reference_balanced_subnet(model, forget_ids, forget_pad, retain_ids, retain_pad, *, epochs: int,
                              ratio: float, lr: float, loss_weight: float, batch_size: int, seed: int = 0):
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    wrapped = []
    for layer in mlp_layers(model):
        for name, mod in layer.matrices().items():
            m = SortedMaskedLayer(mod, ratio, gen)  # full sort of |S| and W*M on every forward
            setattr(layer.mlp, name, m)
            wrapped.append((layer.mlp, name, m))
    opt = torch.optim.SGD([m.scores for *_, m in wrapped], lr=lr, momentum=0.9, weight_decay=5e-4)
    ids = torch.cat([forget_ids, retain_ids])
    pad = torch.cat([forget_pad, retain_pad])
    is_forget = torch.cat([torch.ones(len(forget_ids), dtype=torch.bool),
                           torch.zeros(len(retain_ids), dtype=torch.bool)])
    model.eval()
    steps = skipped = 0
    for _ in range(epochs):
        order = torch.randperm(len(ids), generator=gen)
        for i in range(0, len(ids), batch_size):
            b = order[i: i + batch_size]
            seq, _ = token_loss(model, ids[b], pad[b], False, fused=False)
            f = is_forget[b]
            loss = -(1 - loss_weight) * seq[f].mean() + loss_weight * seq[~f].mean()
            steps += 1
            if not torch.isfinite(loss):  # a batch with no forget row: mean of nothing
                skipped += 1
                continue
            opt.zero_grad()
            loss.backward()
            opt.step()
    for parent, name, m in wrapped:
        setattr(parent, name, m.fold())
    for p in model.parameters():
        p.requires_grad_(True)
    return steps, skipped


# --- the reference-style Integrated Gradients ------------------------------------------------------


def reference_ig(model, forget_ids, forget_pad, forget_start, steps: int):
    """``[n_layer, I]`` IG attribution, one forward/backward per (row, layer, position); alpha batched."""
    from tinymem_fast.methods.neuron.ablation import mlp_activation_hook
    from tinymem_fast.methods.neuron.integrated_gradients import target_positions

    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    layers = mlp_layers(model)
    lo, hi = target_positions(forget_ids, forget_pad, forget_start)
    total = torch.zeros(len(layers), layers[0].intermediate_size, dtype=torch.float64)
    alphas = torch.linspace(0, 1, steps)
    rows = 0
    for r in range(forget_ids.shape[0]):
        positions = range(int(lo[r]), int(hi[r]) + 1)
        if not positions:
            continue
        rows += 1
        for li in range(len(layers)):
            for t in positions:
                box = {}

                def scale(index, act, li=li, t=t, box=box):
                    if index != li:
                        return None
                    box["base"] = act[:, t].detach()
                    box["leaf"] = (box["base"] * alphas[:, None]).requires_grad_(True)
                    out = act.clone()
                    out[:, t] = box["leaf"]
                    return out

                x = forget_ids[r: r + 1, : t + 1].expand(steps, -1)
                with mlp_activation_hook(model, scale), torch.enable_grad():
                    prob = torch.softmax(model(x).logits[:, t].float(), -1)[:, forget_ids[r, t + 1]]
                    (g,) = torch.autograd.grad(prob.sum(), [box["leaf"]])
                total[li] += (box["base"][0].double() * g.double().sum(0)) / (steps * len(positions))
    return (total / rows).float()


# --- the suite ------------------------------------------------------------------------------------


def _data():
    cfg = get_preset("quick-math-noise")
    return build(cfg.data, seed=cfg.seed, workdir=trained_run("quick-math-noise", []))


def _result(model, data, inputs) -> tuple[float, float, int]:
    """(memorized % over the training set, accuracy %, forget rows still memorized)."""
    from tinymem_fast.tinymem.memorization import score_windows

    s = stats(model, data)
    start = inputs.forget_start
    left = int(score_windows(model, inputs.forget_ids, start, start + data.config.mem_len).match.sum())
    return s["mem"], 100 * utility(s, "math")["acc"], left


def plain_step_ms(model, inputs, precision: str, steps: int = 20) -> float:
    m = copy.deepcopy(model)
    tr = Trainer(m, TrainConfig(batch_size=64, precision=precision))
    ids, pad = inputs.retain_ids[:64], inputs.retain_pad[:64]
    for _ in range(3):
        tr.step(ids, pad)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        tr.step(ids, pad)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def run(device: str = "cpu", repeats: int = 1) -> list[Row]:
    if device != "cpu":
        return [Row(SUITE, "BalancedSubnet, quick math", "-", float("nan"), float("nan"), float("nan"),
                    note="CPU suite (the quick math model); the GPU figure is a Pythia-shaped step")]
    cases = os.environ.get("BENCH_METHODS", "balanced_subnet,integrated_gradients").split(",")
    unknown = set(cases) - {"balanced_subnet", "integrated_gradients"}
    if unknown:
        raise ValueError(f"BENCH_METHODS: unknown case(s) {sorted(unknown)}")
    model, inputs = _inputs(device)
    data = _data()
    before = _result(model, data, inputs)
    rows = []
    if "balanced_subnet" in cases:
        rows += balanced_subnet_rows(model, data, inputs, *before)
    if "integrated_gradients" in cases:
        rows += ig_rows(model, data, inputs, *before)
    return rows


def balanced_subnet_rows(model, data, inputs, mem0, acc0, left0) -> list[Row]:
    epochs = int(os.environ.get("BENCH_METHOD_EPOCHS", 10))
    nf = inputs.forget_ids.shape[0]
    case = (f"BalancedSubnet, quick math ({nf} forget / {inputs.retain_ids.shape[0]} retain rows), "
            f"ratio 0.1, lr 1, alpha 0.95, {epochs} epochs, batch 64")
    rows = []
    plain = {prec: plain_step_ms(model, inputs, prec) for prec in PRECISIONS}
    for prec, ms in plain.items():
        rows.append(Row(SUITE, "plain training step, 64 rows", f"Trainer.step, {prec}", ms, ms, ms))

    ref = copy.deepcopy(model)
    t0 = time.perf_counter()
    steps, skipped = reference_balanced_subnet(
        ref, inputs.forget_ids, inputs.forget_pad, inputs.retain_ids, inputs.retain_pad, epochs=epochs,
        ratio=SETTINGS["ratio"], lr=SETTINGS["lr"], loss_weight=SETTINGS["loss_weight"],
        batch_size=SETTINGS["batch_size"])
    t_ref = (time.perf_counter() - t0) * 1e3
    mem, acc, left = _result(ref, data, inputs)
    rows.append(Row(SUITE, case, REF, t_ref, t_ref, t_ref, note=(
        f"{steps} steps, {skipped} skipped (no forget row); {t_ref / steps:.0f} ms/step; memorized "
        f"{mem0:.1f}% -> {mem:.1f}%, acc {acc0:.2f}% -> {acc:.2f}%, forget rows left {left}/{left0}"),
        extra={"mem_after": mem, "acc_after": acc}))
    ref_row = rows[-1]
    meth = get_method("balanced_subnet")
    for prec in PRECISIONS:
        m = copy.deepcopy(model)
        cfg = make_config(meth, dict(SETTINGS, epochs=epochs, precision=prec))
        t0 = time.perf_counter()
        info = meth.run(m, inputs, cfg)
        t = (time.perf_counter() - t0) * 1e3
        mem, acc, left = _result(m, data, inputs)
        step_ms = info["time_edit_s"] * 1e3 / info["steps"]
        # same result quality or better: memorization no higher, accuracy within 1 point
        ok = mem <= ref_row.extra["mem_after"] and acc >= ref_row.extra["acc_after"] - 1.0
        rows.append(Row(SUITE, case, f"tinymem, {prec}", t, t, t, baseline=REF, ratio=t_ref / t, ok=ok, note=(
            f"{info['steps']} steps, none skipped; {step_ms:.0f} ms/step = {step_ms / plain[prec]:.2f}x a "
            f"plain {prec} training step; memorized {mem0:.1f}% -> {mem:.1f}%, acc {acc0:.2f}% -> "
            f"{acc:.2f}%, forget rows left {left}/{left0}"), extra={"mem_after": mem, "acc_after": acc}))
    return rows


def ig_rows(model, data, inputs, mem0, acc0, left0) -> list[Row]:
    from tinymem_fast.methods.neuron.ablation import ablate_neurons, top_neurons
    from tinymem_fast.methods.neuron.integrated_gradients import IntegratedGradientsConfig, ig_attribution

    ratio, steps = 0.05, 20
    nf = inputs.forget_ids.shape[0]
    case = f"Integrated Gradients, quick math ({nf} forget rows), ratio {ratio}, {steps} steps"
    ref_name = "reference-style (a pass per row, layer and position; alpha batched), fp32"
    t0 = time.perf_counter()
    want = reference_ig(model, inputs.forget_ids, inputs.forget_pad, inputs.forget_start, steps)
    t_ref = (time.perf_counter() - t0) * 1e3
    m = copy.deepcopy(model)
    ablate_neurons(m, top_neurons(want, ratio))
    mem, acc, left = _result(m, data, inputs)
    rows = [Row(SUITE, case, ref_name, t_ref, t_ref, t_ref, note=(
        f"memorized {mem0:.1f}% -> {mem:.1f}%, acc {acc0:.2f}% -> {acc:.2f}%, forget rows left "
        f"{left}/{left0}"))]
    chosen = top_neurons(want, ratio)
    for prec in PRECISIONS:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        cfg = IntegratedGradientsConfig(ratio=ratio, ig_steps=steps, precision=prec)
        got = ig_attribution(m, inputs, cfg)
        picked = top_neurons(got, ratio)
        ablate_neurons(m, picked)
        t = (time.perf_counter() - t0) * 1e3
        mem, acc, left = _result(m, data, inputs)
        rel = float((got - want).norm() / want.norm())
        same = sum(len(set(picked[k].tolist()) & set(chosen[k].tolist())) for k in chosen)
        k_all = sum(len(v) for v in chosen.values())
        rows.append(Row(SUITE, case, f"tinymem, {prec}", t, t, t, baseline=ref_name, ratio=t_ref / t,
                        ok=rel < (1e-4 if prec == "fp32" else 0.05), note=(
            f"attribution rel. diff {rel:.1e}, {same}/{k_all} neurons as the reference; memorized "
            f"{mem0:.1f}% -> {mem:.1f}%, acc {acc0:.2f}% -> {acc:.2f}%, forget rows left {left}/{left0}")))
    return rows


if __name__ == "__main__":
    for r in run():
        ratio = f"{r.ratio:5.2f}x vs {r.baseline}" if r.ratio else ""
        print(f"{r.case[:40]:<40} {r.provider:<40} {r.median_ms / 1e3:8.1f} s {ratio}  {r.note}", flush=True)
