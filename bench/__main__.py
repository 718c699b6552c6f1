"""`python -m bench`: run the benchmark suites on this machine and rewrite bench/RESULTS.md."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

from bench.harness import save

# suite -> module, by kind: kernel micro-benchmarks, pipeline timings, the paper's experiments at quick scale
SUITES = {
    "masked_subnet": "bench.kernels.masked_subnet",
    "memscore": "bench.kernels.memscore",
    "memscore_head": "bench.kernels.memscore_head",
    "causal_attention": "bench.kernels.causal_attention",
    "linear_cross_entropy": "bench.kernels.linear_cross_entropy",
    "topk": "bench.kernels.topk",
    "training": "bench.pipelines.training",
    "scoring": "bench.pipelines.scoring",
    "scoring_scale": "bench.pipelines.scoring_scale",
    "regularizers": "bench.pipelines.regularizers",
    "unlearning": "bench.pipelines.unlearning",
    "streaming": "bench.pipelines.streaming",
    "hf_patch": "bench.pipelines.hf_patch",
    "tinymem_quick": "bench.experiments.tinymem_quick",
    "unlearning_quick": "bench.experiments.unlearning_quick",
    "method_baselines": "bench.experiments.method_baselines",
    "method_speed": "bench.experiments.method_speed",
    "methods_quick": "bench.experiments.methods_quick",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--only", choices=list(SUITES), action="append", help="run only these suites")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    # the suites' knobs (each also readable from the environment variable in brackets, for pytest-benchmark)
    k = p.add_argument_group("suite settings")
    k.add_argument("--smoke", action="store_true",
                   help="scoring, scoring_scale, unlearning, streaming: small sizes, to check that the "
                        "suites run "
                        "[BENCH_SMOKE=1]")
    k.add_argument("--small", action="store_true",
                   help="memscore, masked_subnet (pytest): small shapes [BENCH_SMALL=1]")
    k.add_argument("--quick-model", metavar="RUN_DIR",
                   help="scoring, unlearning: a finished math run to reuse instead of training one "
                        "[BENCH_QUICK_MODEL]")
    k.add_argument("--language-model", metavar="RUN_DIR",
                   help="scoring: a finished language run with a 50,257-row head [BENCH_LANGUAGE_MODEL]")
    k.add_argument("--scoring-n", type=int, metavar="N", help="scoring: rows scored [BENCH_SCORING_N]")
    k.add_argument("--scoring-batch", type=int, metavar="N", help="scoring: batch size [BENCH_SCORING_BATCH]")
    k.add_argument("--layers", metavar="MODES",
                   help="tinymem_quick: the layers experiments, comma-separated (1, epochs, language) "
                        "[BENCH_LAYERS]")
    k.add_argument("--unlearn-epochs", type=int, metavar="N",
                   help="unlearning: BalancedSubnet epochs [BENCH_UNLEARN_EPOCHS]")
    args = p.parse_args(argv)
    for flag, env in (("smoke", "BENCH_SMOKE"), ("small", "BENCH_SMALL")):
        if getattr(args, flag):
            os.environ[env] = "1"
    for flag, env in (("quick_model", "BENCH_QUICK_MODEL"), ("language_model", "BENCH_LANGUAGE_MODEL"),
                      ("scoring_n", "BENCH_SCORING_N"), ("scoring_batch", "BENCH_SCORING_BATCH"),
                      ("layers", "BENCH_LAYERS"), ("unlearn_epochs", "BENCH_UNLEARN_EPOCHS")):
        if getattr(args, flag) is not None:
            os.environ[env] = str(getattr(args, flag))
    failed = []
    for name in args.only or SUITES:
        mod = importlib.import_module(SUITES[name])
        print(f"== {name} on {args.device}", flush=True)
        rows = mod.run(args.device, args.repeats)
        for r in rows:
            ratio = f"{r.ratio:6.2f}x vs {r.baseline}" if r.ratio is not None else ""
            print(f"  {r.case:<55} {r.provider:<28} {r.median_ms:10.2f} ms {ratio}  {r.note}", flush=True)
        failed += [f"{name}: {r.case} / {r.provider}: {r.note}" for r in rows if r.ok is False]
        path = save(args.device, name, rows)
        print(f"  saved {path}; bench/RESULTS.md rewritten")
    if failed:  # a figure next to a wrong result is no figure: the run fails (gpu_check.sh relies on it)
        print("correctness checks that failed:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
