"""BalancedSubnet and Subnet with the quick settings on the quick math and language models.

Uses the models that the ``tinymem_quick`` suite trained (its cache, keyed by config hash; trained now if
missing). Reports memorization and utility before/after and the method's seconds.
"""

from __future__ import annotations

import copy
import os

from bench.experiments.tinymem_quick import trained_run
from bench.harness import Row
from tinymem_fast.experiments.demo import QUICK_METHODS
from tinymem_fast.experiments.unlearning import forget_set, stats, unlearn
from tinymem_fast.tinymem.data.dataset import build
from tinymem_fast.tinymem.models import load_model
from tinymem_fast.tinymem.presets import get_preset

PRESETS = ["quick-math-noise", "quick-language-noise"]


def run(device: str = "cpu", repeats: int = 1) -> list[Row]:
    rows = []
    for preset in PRESETS:
        cfg = get_preset(preset)
        run_dir = trained_run(preset, [])
        data = build(cfg.data, seed=cfg.seed, workdir=run_dir)
        base_model = load_model(os.path.join(run_dir, "final"), device=device)
        base = stats(base_model, data)
        forget = forget_set(base_model, data)
        lang = cfg.data.kind == "language"
        util_key = "test/ppl_token" if lang else "avg_acc"
        util_name = "ppl" if lang else "acc"
        for method, hp in QUICK_METHODS.items():
            model = copy.deepcopy(base_model)
            row = unlearn(model, data, method, hp, base=base, forget=forget, retain_size=2000,
                          model_tag=preset)
            a = row["after"]
            ms = row["time_method_s"] * 1e3
            note = (f"mem {base['mem']:.1f}% -> {a['mem']:.1f}% ({row['n_forget']} forget rows), "
                    f"{util_name} {base[util_key]:.4g} -> {a[util_key]:.4g} "
                    f"({100 * (a[util_key] - base[util_key]) / base[util_key]:+.2f}%), "
                    f"settings {hp}")
            rows.append(Row("unlearning_quick", f"{method}, {preset}", "tinymem (cpp)", ms, ms, ms,
                            note=note))
    return rows
