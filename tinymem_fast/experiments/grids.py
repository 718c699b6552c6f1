"""Hyperparameter grids per method: ``paper`` (SPEC.md section 6.3) and ``quick`` (CPU-sized, for the quick
presets). A grid maps a method name to a list of hyperparameter dicts; :func:`expand` turns a compact
``{name: [values]}`` spec into that list (Cartesian product, in the order given)."""

from __future__ import annotations

import itertools

PAPER_RATIOS = [1e-5, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.25, 0.3, 0.5, 0.8]


def expand(spec: dict[str, list]) -> list[dict]:
    keys = list(spec)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(spec[k] for k in keys))]


_NEURON_RATIOS = [1e-3, 0.01, 0.05]

PAPER = {
    "subnet": expand({"ratio": PAPER_RATIOS, "epochs": [1, 10, 20]}),
    "balanced_subnet": expand({"ratio": PAPER_RATIOS, "epochs": [1, 10, 20], "loss_weight": [0.9, 0.7, 0.5]}),
    "durable": expand({"ratio": [r for r in PAPER_RATIOS if r < 0.1]}),
    "durable_aggregate": expand({"ratio": [r for r in PAPER_RATIOS if r < 0.1]}),
    "second_order": expand({"ratio": [r for r in PAPER_RATIOS if r < 0.1]}),
    "greedy": expand({"ratio": [r for r in PAPER_RATIOS if r <= 0.05]}),
    "zero_out": expand({"ratio": _NEURON_RATIOS}),
    "activations": expand({"ratio": _NEURON_RATIOS}),
    "integrated_gradients": expand({"ratio": _NEURON_RATIOS, "ig_steps": [20]}),
    "slimming": expand({"ratio": _NEURON_RATIOS, "epochs": [1, 10, 20]}),
    "hard_concrete": expand({"ratio": _NEURON_RATIOS, "epochs": [1, 10, 20]}),
    "spectral_norm": expand({"spectral_lambda": [1e-3, 1e-2, 1e-1]}),
    "loss_truncation": expand({"trunc_drop_frac": [0.01, 0.05, 0.1]}),
    "example_tied_dropout": [{}],
    "clean_ft": [{"epochs": 5}],
    "extra_ft": [{"epochs": 5}],
    "both_ft": [{"epochs": 5}],
}

# Quick: the paper's neuron grids; weight-level ratios that a 2-core CPU finishes in seconds to a minute
# (Greedy's cost is one forward/backward per zeroed weight, so its ratios stay tiny); Subnet and
# BalancedSubnet with the larger score learning rate the quick presets need (SPEC.md section 9).
QUICK = {
    "subnet": expand({"ratio": [0.05, 0.1], "epochs": [5], "lr": [1.0]}),
    "balanced_subnet": expand({"ratio": [0.05, 0.1], "epochs": [10], "lr": [1.0],
                               "loss_weight": [0.9, 0.95]}),
    "durable": expand({"ratio": [1e-3, 0.01, 0.05]}),
    "durable_aggregate": expand({"ratio": [1e-3, 0.01, 0.05]}),
    "second_order": expand({"ratio": [1e-3, 0.01, 0.05]}),
    "greedy": expand({"ratio": [1e-5, 1e-4, 5e-4]}),
    "zero_out": expand({"ratio": _NEURON_RATIOS}),
    "activations": expand({"ratio": _NEURON_RATIOS}),
    "integrated_gradients": expand({"ratio": _NEURON_RATIOS}),
    "slimming": expand({"ratio": _NEURON_RATIOS, "epochs": [1, 10, 20]}),
    "hard_concrete": expand({"ratio": _NEURON_RATIOS, "epochs": [1, 10, 20]}),
    # a regularizer costs a full training run: one setting each
    "spectral_norm": [{"spectral_lambda": 1e-2}],
    "loss_truncation": [{"trunc_drop_frac": 0.05}],
    "example_tied_dropout": [{}],
    "clean_ft": [{"epochs": 5}],
    "extra_ft": [{"epochs": 5}],
    "both_ft": [{"epochs": 5}],
}

GRIDS = {"paper": PAPER, "quick": QUICK}


def get_grid(name: str) -> dict[str, list[dict]]:
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; choose one of {', '.join(GRIDS)} "
                         "(or pass a YAML/JSON file)")
    return GRIDS[name]
