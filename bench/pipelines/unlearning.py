"""BalancedSubnet end to end on the quick math model: the edit plus the before/after evaluation.

Baseline (written here, not in the package): BalancedSubnet the way SPEC §5 (17) describes the reference
doing it --

* every MLP matrix (GPT-2 ``Conv1D`` ``c_fc`` / ``c_proj``) replaced by a module with a frozen ``W`` and a
  Kaiming-uniform score tensor ``S``; every forward runs a **full** ``torch.sort`` of ``|S|`` to find the
  dropped entries, materialises the mask ``M`` and ``W * M``, and an autograd straight-through function
  passes the gradient to ``S`` (``dL/dS = dL/dW_eff * W * sign(S)``); ``torch.optim.SGD`` on the scores;
* **one shuffled loader** over forget rows (label +1) and retain rows (label -1), batch 64, loss
  ``-(1 - a) * mean_F L_i + a * mean_R L_j`` over the rows of each batch. A batch without a forget row
  averages an empty set (NaN in the reference); here its forget term is skipped and counted, so the
  baseline does not diverge;
* memorization measured with Hugging Face ``generate(do_sample=False, use_cache=False,
  max_length=min_length=<sequence length>)`` from the clean prompts, a row memorized when generated tokens
  ``[p, p+k)`` equal the noised row's.

Ours: :func:`~tinymem_fast.experiments.unlearning.unlearn`
with the quick BalancedSubnet settings (balanced forget and
retain mini-batches, one threshold per optimizer step, fused masked matmul, one teacher-forced pass for
memorization), on the ``torch`` backend and on each fast backend.

All providers start from deep copies of the same base model and use the same forget set (rows memorized
by the base model), the same retain set (2,000 clean rows, seed 0), the same score initialisation, the same
per-sequence pad-masked loss, ratio, lr, alpha, batch size and number of steps
(``epochs * ceil((|F| + |R|) / batch)``). Accuracy is the teacher-forced ``avg_acc`` for all of them.

Each provider is timed once (tens of seconds each); ``repeats`` is ignored.

Environment:

* ``BENCH_QUICK_MODEL=DIR``: use the trained quick math model in ``DIR`` (``DIR/final`` and ``DIR/run.json``
  with the same data fingerprint) instead of training / reusing ``bench/.cache/quick-math-noise``.
* ``BENCH_SMOKE=1``: one epoch instead of the quick setting's epochs (a fast check that the suite runs).
* ``BENCH_UNLEARN_EPOCHS=N``: any other number of epochs.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time

import torch
from torch import nn

from bench.harness import HERE, Row, sync, with_ratios
from bench.kernels.masked_subnet import fast_backends
from tinymem_fast.experiments.demo import QUICK_METHODS, _model_ready
from tinymem_fast.experiments.unlearning import forget_set, retain_set, unlearn
from tinymem_fast.integrations.adapters import mlp_layers
from tinymem_fast.ops.masked_subnet import layout_of, num_dropped
from tinymem_fast.tinymem.data.dataset import build
from tinymem_fast.tinymem.metrics import evaluate_tests
from tinymem_fast.tinymem.models import load_model
from tinymem_fast.tinymem.presets import get_preset
from tinymem_fast.tinymem.training import build_model_for, token_loss, train

PRESET = "quick-math-noise"
CACHE_DIR = os.path.join(HERE, ".cache", PRESET)
METHOD = "balanced_subnet"
RETAIN_SIZE = 2000
SEED = 0
EVAL_BATCH = 256  # the same batch for every evaluation pass, ours and the baseline's
ACC_TOL = 5e-4  # accuracy within this of the baseline's counts as equal (float noise of folded weights)
REF = "reference-style (sort, W*M, shuffled loader, generate w/o cache)"
SUITE = "unlearning"


# --- the model --------------------------------------------------------------------------------


def quick_model(say=print):
    """The trained quick math model and its data: from ``BENCH_QUICK_MODEL``, the cache, or trained now."""
    cfg = get_preset(PRESET)
    data = build(cfg.data, seed=cfg.seed)
    fp = data.fingerprint()
    given = os.environ.get("BENCH_QUICK_MODEL")
    model_dir = given or CACHE_DIR
    if not _model_ready(model_dir, fp):
        if given:
            raise RuntimeError(f"BENCH_QUICK_MODEL={given!r} holds no finished {PRESET} model with data "
                               f"fingerprint {fp} (expected final/model.safetensors and run.json)")
        say(f"  training the {PRESET} model into {model_dir} (a few minutes on 2 CPU cores) ...")
        os.makedirs(model_dir, exist_ok=True)
        with open(os.path.join(model_dir, "run.json"), "w") as f:
            json.dump({"preset": PRESET, "config": cfg.to_dict(), "data_fingerprint": fp}, f, indent=1)
        model = build_model_for(data, cfg.model, seed=cfg.seed)
        train(model, data, cfg.train, model_dir, seed=cfg.seed, resume=True, progress=False)
    return load_model(os.path.join(model_dir, "final")), data


# --- the reference-style baseline ---------------------------------------------------------------


class _SortedMask(torch.autograd.Function):
    """Mask of ``key = |S|``: a full stable sort, the ``k`` smallest entries dropped (ties by flat index).
    Backward is straight through (the ``abs`` before it contributes ``sign(S)``)."""

    @staticmethod
    def forward(ctx, key, k):
        flat = key.reshape(-1)
        order = torch.sort(flat, stable=True).indices
        mask = torch.ones_like(flat)
        mask[order[:k]] = 0
        return mask.view_as(key)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class SortedMaskedLayer(nn.Module):
    """Frozen ``W`` (Linear ``[out, in]`` or Conv1D ``[in, out]``) and trainable scores; W * M per forward."""

    def __init__(self, base: nn.Module, ratio: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.layout = layout_of(base)
        w = base.weight.detach()
        fan_in = w.shape[1] if self.layout == "linear" else w.shape[0]
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)), the same draw as MaskedSubnet
        s = torch.empty(w.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        self.scores = nn.Parameter(s.to(w.device))
        self.k = num_dropped(w.numel(), ratio)

    def effective_weight(self) -> torch.Tensor:
        mask = _SortedMask.apply(self.scores.abs(), self.k)
        return self.base.weight * mask.to(self.base.weight.dtype)

    def forward(self, x):
        w = self.effective_weight()
        if self.layout == "linear":
            return nn.functional.linear(x, w, self.base.bias)
        y = x.reshape(-1, x.shape[-1]) @ w
        if self.base.bias is not None:
            y = y + self.base.bias
        return y.view(*x.shape[:-1], w.shape[1])

    @torch.no_grad()
    def fold(self) -> nn.Module:
        self.base.weight.copy_(self.effective_weight())
        return self.base


def reference_style_edit(model, forget_ids, forget_pad, retain_ids, retain_pad, hp: dict, seed: int) -> dict:
    """BalancedSubnet as the reference runs it (see the module docstring); edits ``model`` in place."""
    ratio, lr, alpha = hp["ratio"], hp["lr"], hp["loss_weight"]
    bs, epochs = hp["batch_size"], hp["epochs"]
    device = next(model.parameters()).device
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    wrapped = []
    for layer in mlp_layers(model):
        for name, mod in layer.matrices().items():
            m = SortedMaskedLayer(mod, ratio, gen)
            setattr(layer.mlp, name, m)
            wrapped.append((layer.mlp, name, m))
    opt = torch.optim.SGD([m.scores for _, _, m in wrapped], lr=lr, momentum=0.9, weight_decay=5e-4)
    ids = torch.cat([forget_ids, retain_ids])
    pad = torch.cat([forget_pad, retain_pad])
    label = torch.cat([torch.ones(forget_ids.shape[0]), -torch.ones(retain_ids.shape[0])])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, pad, label), batch_size=bs,
                                         shuffle=True, generator=torch.Generator().manual_seed(seed))
    steps = no_forget = no_retain = 0
    for _ in range(epochs):
        for x, p, y in loader:
            seq, _ = token_loss(model, x.to(device), p.to(device), False)
            is_f = (y > 0).to(device)
            loss = seq.new_zeros(())
            if is_f.any():
                loss = loss - (1.0 - alpha) * seq[is_f].mean()
            else:  # the reference averages an empty set here: NaN
                no_forget += 1
            if (~is_f).any():
                loss = loss + alpha * seq[~is_f].mean()
            else:
                no_retain += 1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    for parent, name, m in wrapped:
        setattr(parent, name, m.fold())
    for p in model.parameters():
        p.requires_grad_(True)
    return {"steps": steps, "batches_without_forget": no_forget, "batches_without_retain": no_retain}


@torch.no_grad()
def generate_memorization(model, data, batch_size: int = EVAL_BATCH) -> dict:
    """% of eligible noised rows that greedy ``generate`` (no KV cache) reproduces from the clean prompt."""
    c = data.config
    p, k = c.prompt_len, c.mem_len
    length = data.rows.shape[1]
    noised = data.rows[data.artifact_rows]
    clean = data.clean_twins
    eligible = (noised[:, p: p + k] != clean[:, p: p + k]).any(1)
    device = next(model.parameters()).device
    hits = []
    for i in range(0, noised.shape[0], batch_size):
        prompt = clean[i: i + batch_size, :p].to(device)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=False,
                             max_length=length, min_length=length, pad_token_id=data.pad_id)
        hits.append((out[:, p: p + k].cpu() == noised[i: i + batch_size, p: p + k]).all(1))
    mem = torch.cat(hits) & eligible
    n_el = int(eligible.sum())
    return {"mem": 100.0 * int(mem.sum()) / max(1, n_el), "n_memorized": int(mem.sum()), "n_eligible": n_el,
            "memorized_index": data.artifact_rows[mem]}


def reference_style_pipeline(model, data, hp: dict, ours_forget: torch.Tensor) -> dict:
    """Before evaluation, forget and retain sets, the edit, after evaluation; timed like ``unlearn``."""
    sync_dev = next(model.parameters()).device.type
    t0 = time.perf_counter()
    before = generate_memorization(model, data)
    before.update(evaluate_tests(model, data.test, EVAL_BATCH))
    t_before = time.perf_counter() - t0
    f_idx = before.pop("memorized_index")
    r_idx = retain_set(data, f_idx, RETAIN_SIZE, SEED)
    sync(sync_dev)
    t1 = time.perf_counter()
    info = reference_style_edit(model, data.rows[f_idx], data.pad[f_idx], data.rows[r_idx], data.pad[r_idx],
                                hp, SEED)
    sync(sync_dev)
    t_edit = time.perf_counter() - t1
    t2 = time.perf_counter()
    after = generate_memorization(model, data)
    after.pop("memorized_index")
    after.update(evaluate_tests(model, data.test, EVAL_BATCH))
    t_after = time.perf_counter() - t2
    return {"before": before, "after": after, "info": info, "n_forget": int(f_idx.numel()),
            "same_forget_set": bool(torch.equal(f_idx.sort().values, ours_forget.sort().values)),
            "time_edit_s": t_edit, "time_eval_s": t_before + t_after}


# --- the suite ----------------------------------------------------------------------------------


def _hparams() -> dict:
    hp = dict(QUICK_METHODS[METHOD])
    if os.environ.get("BENCH_UNLEARN_EPOCHS"):
        hp["epochs"] = int(os.environ["BENCH_UNLEARN_EPOCHS"])
    elif os.environ.get("BENCH_SMOKE") == "1":
        hp["epochs"] = 1
    return hp


def run(device: str = "cpu", repeats: int = 1) -> list[Row]:
    base_model, data = quick_model()
    base_model = base_model.to(device)
    hp = _hparams()
    forget_idx, _ = forget_set(base_model, data, EVAL_BATCH)
    r_idx = retain_set(data, forget_idx, RETAIN_SIZE, SEED)
    steps = hp["epochs"] * math.ceil((forget_idx.numel() + r_idx.numel()) / hp["batch_size"])
    setting = (f"ratio {hp['ratio']:g}, lr {hp['lr']:g}, alpha {hp['loss_weight']:g}, {hp['epochs']} epochs "
               f"= {steps} steps of {hp['batch_size']}, |F| {forget_idx.numel()}, |R| {r_idx.numel()}")
    print(f"  {setting}", flush=True)
    case = "BalancedSubnet end to end (edit + eval), quick math model"
    case_edit = "BalancedSubnet edit only, quick math model"
    case_eval = "BalancedSubnet evaluation (before + after), quick math model"
    results = {}  # provider -> (total s, edit s, eval s, note, extra)

    model = copy.deepcopy(base_model)
    sync(device)
    t0 = time.perf_counter()
    ref = reference_style_pipeline(model, data, hp, forget_idx)
    sync(device)
    total = time.perf_counter() - t0
    a, b = ref["after"], ref["before"]
    info = ref["info"]
    note = (f"mem {b['mem']:.1f}% -> {a['mem']:.1f}%, acc {b['avg_acc']:.4f} -> {a['avg_acc']:.4f}; "
            f"{info['batches_without_forget']} of {info['steps']} batches had no forget row (forget term "
            f"skipped; NaN in the reference)")
    note += ("; forget set from generate = the teacher-forced one" if ref["same_forget_set"]
             else "; forget set from generate DIFFERS from the teacher-forced one")
    results[REF] = (total, ref["time_edit_s"], ref["time_eval_s"], note,
                    {"mem_after": a["mem"], "acc_after": a["avg_acc"], "mem_before": b["mem"],
                     "acc_before": b["avg_acc"], "n_forget": ref["n_forget"],
                     "same_forget_set": ref["same_forget_set"], **info})
    print(f"  {REF}: {total:.1f} s; {note}", flush=True)
    del model

    for backend in ["torch"] + fast_backends(device):
        name = f"tinymem ({backend} backend)" if backend == "torch" else f"tinymem ({backend})"
        model = copy.deepcopy(base_model)
        sync(device)
        t0 = time.perf_counter()
        row = unlearn(model, data, METHOD, {**hp, "backend": backend}, retain_size=RETAIN_SIZE, seed=SEED,
                      model_tag=f"{PRESET}/bench", eval_batch_size=EVAL_BATCH)
        sync(device)
        total = time.perf_counter() - t0
        acc_b, acc_a = row["base"]["avg_acc"], row["after"]["avg_acc"]
        ref_x = results[REF][4]
        d_mem, d_acc = row["mem_after"] - ref_x["mem_after"], acc_a - ref_x["acc_after"]
        ok = d_mem <= 0 and d_acc >= -ACC_TOL
        verdict = (f"vs reference-style after: mem {d_mem:+.1f} pts, acc {d_acc:+.4f} -> "
                   + ("equal or better" if ok else "WORSE"))
        note = (f"mem {row['mem_before']:.1f}% -> {row['mem_after']:.1f}%, acc {acc_b:.4f} -> {acc_a:.4f}; "
                f"{verdict}")
        results[name] = (total, row["time_method_s"], row["time_eval_s"], note,
                         {"mem_after": row["mem_after"], "acc_after": acc_a, "mem_before": row["mem_before"],
                          "acc_before": acc_b, "n_forget": row["n_forget"],
                          "steps": row["method_info"]["steps"], "equal_or_better": ok})
        print(f"  {name}: {total:.1f} s; {note}", flush=True)
        del model

    # Same quality, not same steps: balanced batches see forget rows every step, so fewer epochs may
    # already match what the reference-style run reaches with all of its epochs.
    fast = fast_backends(device)[0] if fast_backends(device) else "torch"
    for epochs in range(1, hp["epochs"]):
        model = copy.deepcopy(base_model)
        sync(device)
        t0 = time.perf_counter()
        row = unlearn(model, data, METHOD, {**hp, "epochs": epochs, "backend": fast}, retain_size=RETAIN_SIZE,
                      seed=SEED, model_tag=f"{PRESET}/bench", eval_batch_size=EVAL_BATCH)
        sync(device)
        total = time.perf_counter() - t0
        ref_x = results[REF][4]
        acc_a = row["after"]["avg_acc"]
        if row["mem_after"] <= ref_x["mem_after"] and acc_a >= ref_x["acc_after"] - ACC_TOL:
            name = f"tinymem ({fast}), {epochs} epoch(s): first to reach the reference-style quality"
            note = (f"mem {row['mem_before']:.1f}% -> {row['mem_after']:.1f}% (reference-style "
                    f"{ref_x['mem_after']:.1f}%), acc -> {acc_a:.4f} "
                    f"(reference-style {ref_x['acc_after']:.4f})")
            results[name] = (total, row["time_method_s"], row["time_eval_s"], note,
                             {"mem_after": row["mem_after"], "acc_after": acc_a, "epochs": epochs})
            print(f"  {name}: {total:.1f} s; {note}", flush=True)
            break
        del model

    rows = []
    run_note = f"{hp['epochs']} epochs ({steps} steps): "
    for c, pick in ((case, 0), (case_edit, 1), (case_eval, 2)):
        for name, res in results.items():
            ms = res[pick] * 1e3
            rows.append(Row(SUITE, c, name, ms, ms, ms, note=run_note + res[3] if pick == 0 else "",
                            extra={**res[4], "setting": setting} if pick == 0 else {}))
    with_ratios(rows, REF)
    vs_torch = [Row(r.suite, r.case + " (vs torch backend)", r.provider, r.median_ms, r.p20_ms, r.p80_ms)
                for r in rows if r.provider.startswith("tinymem")]
    with_ratios(vs_torch, "tinymem (torch backend)")
    rows += [r for r in vs_torch if r.provider != "tinymem (torch backend)"]
    return rows
