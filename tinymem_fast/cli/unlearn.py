"""``tinymem unlearn``: one or more unlearning methods on a trained run or a model folder."""

from __future__ import annotations

import argparse
import os
import sys

from .common import log_to_stderr, method_hparams, methods_arg


def cmd_unlearn(args: argparse.Namespace) -> int:
    from ..experiments.runs import locate, run_config, run_data
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
    from ..tinymem.presets import apply_overrides, get_preset
    from ..tinymem.results import check_selection

    log_to_stderr()
    methods = methods_arg(args.method)
    ck = locate(args.model)
    model_path = ck.path
    if ck.run_dir is not None:  # the run's own config; --preset/--set must give the data it trained on
        what = ", ".join(filter(None, [f"--preset {args.preset}" if args.preset else "",
                                       " ".join(f"--set {s}" for s in args.set)])) or "its run.json"
        cfg = run_config(ck.run_dir, args.preset, args.set)
    else:
        cfg = apply_overrides(get_preset(args.preset or "quick"), args.set)
    proto = cfg.protocol
    retain_size = proto.retain_size if args.retain_size is None else \
        (None if args.retain_size == "all" else args.retain_size)
    utility_metric = args.utility_metric or proto.utility_metric
    mem_metric = args.mem_metric or proto.mem_metric
    check_selection(cfg.data.kind, utility_metric, mem_metric, "--")
    hps = method_hparams(methods, args.hp, args.quick_defaults)
    for m in methods:  # every method's settings, before the first one runs
        make_config(m, hps[m.name])
    model = load_model(model_path, device=args.device or "cpu")
    data = run_data(ck.run_dir, cfg, what) if ck.run_dir is not None else build(cfg.data, seed=cfg.seed)
    check_model_fits_data(model, data, model_path)
    base = stats(model, data)           # shared by every method: each starts from a fresh copy
    forget = forget_set(model, data)
    for i, method in enumerate(methods):
        if i:
            model = load_model(model_path, device=args.device or "cpu")
        try:
            row = unlearn(model, data, method.name, {**hps[method.name], "progress": not args.quiet},
                          seed=args.seed, model_tag=model_path, retain_size=retain_size,
                          base=base, forget=forget, utility_metric=utility_metric, mem_metric=mem_metric,
                          checkpoint=ck.label)
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
