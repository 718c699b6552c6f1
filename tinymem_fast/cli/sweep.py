"""``tinymem sweep`` and ``tinymem report``: methods x grid x seeds, then the best run per method."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .common import log_to_stderr


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..experiments.sweep import parse_shard, plan, run_sweep

    log_to_stderr()
    methods = "all" if args.methods == "all" else [m for m in args.methods.split(",") if m.strip()]
    runs = plan(args.models, methods, args.grid, args.seeds, checkpoints=args.checkpoints,
                precision=args.precision)
    shard = parse_shard(args.shard)
    if args.dry_run:
        for r in runs[shard[0]::shard[1]]:
            print(r.key, r.method, json.dumps(r.hp, default=str), f"seed={r.seed}",
                  f"checkpoint={r.checkpoint}")
        return 0
    try:
        retain = "run" if args.retain_size is None else \
            (None if args.retain_size == "all" else args.retain_size)
        s = run_sweep(runs, args.out, shard=shard, device=args.device or "cpu", retain_size=retain,
                      utility_metric=args.utility_metric, mem_metric=args.mem_metric, progress=not args.quiet)
    except ValueError as exc:
        print(f"tinymem sweep: {exc}", file=sys.stderr)
        return 2
    print(f"shard {s['shard']}: {s['ran']} runs done, {s['skipped']} already finished; {s['wall_s']:.0f} s "
          f"({100 * s['bookkeeping_frac']:.1f}% outside the runs); rows in {args.out}/rows")
    return 0


def cmd_report(args: argparse.Namespace) -> int:

    from ..experiments.report import write_report
    from ..experiments.sweep import load_rows

    rows = [r for src in args.results for r in load_rows(src)]
    out = args.out or (args.results[0] if os.path.isdir(args.results[0]) else
                       os.path.dirname(os.path.abspath(args.results[0])))
    paths = write_report(rows, os.path.join(out, "report") if out == args.results[0] else out,
                         title=args.title, perp_cutoff=args.perp_cutoff, mem_cutoff=args.mem_cutoff,
                         utility_metric=args.utility_metric, mem_metric=args.mem_metric)
    print(f"{len(rows)} rows -> {paths['report.md']}, {paths['report.html']}")
    return 0
