"""``tinymem presets`` and ``tinymem train``: the named configurations and a TinyMem training run."""

from __future__ import annotations

import argparse
import os

from .common import log_to_stderr


def cmd_presets(args: argparse.Namespace) -> int:
    from ..tinymem.presets import ALIASES, PRESETS, get_preset

    for name in PRESETS:
        print(f"{name:<26} {get_preset(name).description}")
    for a, target in ALIASES.items():
        print(f"{a:<26} = {target}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import logging

    from ..tinymem.presets import apply_overrides, get_preset
    from ..tinymem.training import train_run

    log_to_stderr(logging.INFO, "%(message)s")
    cfg = apply_overrides(get_preset(args.preset), args.set, args.config)
    if args.regularizer:
        cfg.regularizer.name = args.regularizer
        cfg.regularizer.validate()
    if args.results and not (cfg.regularizer.name and args.baseline):
        raise ValueError("--results writes a regularizer's result row: it needs --regularizer and "
                         "--baseline (an unregularized run of the same preset)")
    if args.seed is not None:
        cfg.seed = args.seed
    if args.device:
        cfg.train.device = args.device
    out = args.out or os.path.join("runs", f"{args.preset}-seed{cfg.seed}")
    result = train_run(cfg, out, preset=args.preset, resume=not args.no_resume, progress=not args.quiet)
    keys = [k for k in ("avg_acc", "test/acc", "test/ppl_token", "mem", "avg_perc_mem", "asr") if k in result]
    print(f"done in {result['wall_s']:.0f} s: " + ", ".join(f"{k} {result[k]:.3f}" for k in keys))
    print(f"model: {os.path.join(out, 'final')}  metrics: {os.path.join(out, 'metrics.jsonl')}")
    if cost := result.get("regularizer_cost"):
        print(f"{cost['regularizer']}: {cost['step_ms_regularized']:.1f} ms/step vs "
              f"{cost['step_ms_plain']:.1f} unregularized (x{cost['overhead_ratio']:.2f})")
    if args.results:
        from ..experiments.unlearning import append_row
        from ..methods.regularizers import regularizer_row

        row = regularizer_row(out, args.baseline)
        append_row(row, args.results)
        print(f"result row appended to {args.results}")
    return 0
