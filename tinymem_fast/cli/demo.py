"""``tinymem demo``: train a quick model, then remove what it memorized."""

from __future__ import annotations

import argparse


def cmd_demo(args: argparse.Namespace) -> int:
    import logging

    from ..experiments.demo import run_demo

    logging.basicConfig(level=logging.WARNING)
    run_demo(args.out, retrain=args.retrain, progress=not args.quiet)
    return 0
