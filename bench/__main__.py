"""`python -m bench`: run the benchmark suites on this machine and rewrite bench/RESULTS.md."""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

from bench.harness import save

SUITES = ["masked_subnet", "training", "unlearning", "tinymem_quick", "unlearning_quick", "method_baselines",
          "methods_quick", "scoring", "regularizers", "memscore"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--only", choices=SUITES, action="append", help="run only these suites")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    for name in args.only or SUITES:
        mod = importlib.import_module(f"bench.bench_{name}")
        print(f"== {name} on {args.device}", flush=True)
        rows = mod.run(args.device, args.repeats)
        for r in rows:
            ratio = f"{r.ratio:6.2f}x vs {r.baseline}" if r.ratio is not None else ""
            print(f"  {r.case:<55} {r.provider:<28} {r.median_ms:10.2f} ms {ratio}  {r.note}", flush=True)
        path = save(args.device, name, rows)
        print(f"  saved {path}; bench/RESULTS.md rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
