"""``tinymem demo``: train a quick model, then remove what it memorized."""

from __future__ import annotations

import argparse

from .common import log_to_stderr


def cmd_demo(args: argparse.Namespace) -> int:
    from ..experiments.demo import run_demo

    log_to_stderr()
    run_demo(args.out, retrain=args.retrain, progress=not args.quiet, precision=args.precision)
    return 0
