"""``tinymem finetune``: Clean / Extra / Both fine-tuning of a trained run."""

from __future__ import annotations

import argparse

from .common import log_to_stderr


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..experiments.unlearning import append_row
    from ..methods.finetune import FinetuneConfig, finetune

    log_to_stderr()
    row = finetune(args.checkpoint, FinetuneConfig(data=args.data, epochs=args.epochs), args.out,
                   device=args.device, progress=not args.quiet)
    append_row(row, args.out)
    print(f"{row['method']}: {row['mem_metric']} {row['mem_before']:.2f}% -> {row['mem_after']:.2f}%, "
          f"utility change {100 * row['d_util']:+.2f}%, {row['time_method_s']:.1f} s; results in {args.out}")
    return 0
