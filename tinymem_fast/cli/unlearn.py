"""``tinymem unlearn``: one or more unlearning methods on a trained run or a model folder."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .common import log_to_stderr, method_hparams, methods_arg


def cmd_unlearn(args: argparse.Namespace) -> int:
    from ..experiments.unlearning import (
        NothingMemorized,
        append_row,
        check_model_fits_data,
        forget_set,
        stats,
        unlearn,
    )
    from ..methods.registry import make_config
    from ..tinymem.data.dataset import build
    from ..tinymem.models import load_model, save_model
    from ..tinymem.presets import apply_overrides, from_dict, get_preset

    log_to_stderr()
    methods = methods_arg(args.method)
    run_dir = args.model
    info_path = os.path.join(run_dir, "run.json")
    model_path = os.path.join(run_dir, "final") if os.path.exists(info_path) else run_dir
    if os.path.exists(info_path) and not args.preset:
        with open(info_path) as f:
            tree = json.load(f)["config"]
        cfg = from_dict(tree, info_path)
    else:
        cfg = get_preset(args.preset or "quick")
    cfg = apply_overrides(cfg, args.set)
    hps = method_hparams(methods, args.hp, args.quick_defaults)
    for m in methods:  # every method's settings, before the first one runs
        make_config(m, hps[m.name])
    model = load_model(model_path, device=args.device or "cpu")
    data = build(cfg.data, seed=cfg.seed, workdir=run_dir if os.path.exists(info_path) else None)
    check_model_fits_data(model, data, model_path)
    base = stats(model, data)           # shared by every method: each starts from a fresh copy
    forget = forget_set(model, data)
    for i, method in enumerate(methods):
        if i:
            model = load_model(model_path, device=args.device or "cpu")
        try:
            row = unlearn(model, data, method.name, {**hps[method.name], "progress": not args.quiet},
                          seed=args.seed, model_tag=os.path.abspath(model_path), retain_size=args.retain_size,
                          base=base, forget=forget)
        except NothingMemorized as exc:
            print(f"tinymem unlearn: {exc}")
            return 0
        except (ValueError, TypeError) as exc:
            print(f"tinymem unlearn: {method.name}: {exc}", file=sys.stderr)
            return 2
        append_row(row, args.out)
        save_model(model, os.path.join(args.out, f"model-{method.name}-{row['run_id']}"))
        print(f"{method.name}: {row['mem_metric']} {row['mem_before']:.2f}% -> {row['mem_after']:.2f}%, "
              f"utility change {100 * row['d_util']:+.2f}%, {row['time_method_s']:.1f} s; "
              f"results in {args.out}")
    return 0
