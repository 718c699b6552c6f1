"""``tinymem`` command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import __version__
from ..common import atomic
from .common import add_scoring_args, one_line, retain_size_arg, user_errors


def _command(module: str, name: str):
    """The handler ``cli/<module>.py:<name>``, imported when its command runs: `tinymem --help` and every
    command's argument errors stay fast (no torch import)."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f".{module}", __name__), name)(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinymem", description="Measure and remove memorization in LMs.")
    p.add_argument("--version", action="version", version=f"tinymem_fast {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    # flags several commands share, declared once
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--quiet", action="store_true", help="no progress bars")
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", help="cpu, cuda, cuda:1 ... (checked before any work)")
    protocol = argparse.ArgumentParser(add_help=False)  # unlearn and sweep: the run's protocol section
    protocol.add_argument("--retain-size", type=retain_size_arg, default=None, metavar="N|all",
                          help="clean retain rows (default: the run's protocol.retain_size: 2,000 for quick "
                               "presets; every clean row for paper math, 100,000 chunks for paper language)")
    protocol.add_argument("--utility-metric", choices=("acc", "acc_paper", "ppl_token", "ppl_batchmean"),
                          help="utility in the selection score (default: the run's protocol.utility_metric; "
                               "paper presets acc_paper / ppl_batchmean, quick presets acc / ppl_token)")
    protocol.add_argument("--mem-metric", choices=("mem", "avg_perc_mem"),
                          help="memorization in the score: pooled %% of eligible rows, or the mean over "
                               "duplication groups (default: the run's protocol.mem_metric)")
    # commands in the order of a study: set up, train, remove memorization, compare, score any model
    info = sub.add_parser("info", help="versions, compiled extension, backend per op")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_command("info", "cmd_info"))

    pr = sub.add_parser("presets", help="list the named run configurations")
    pr.set_defaults(func=_command("train", "cmd_presets"))

    tr = sub.add_parser("train", parents=[quiet, device],
                        help="train a TinyMem model (resumes from its newest checkpoint)")
    tr.add_argument("--preset", default="quick", help="named configuration (see `tinymem presets`)")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting, e.g. --set data.num_noise=200 --set train.epochs=5")
    tr.add_argument("--config", help="JSON/YAML file of overrides (nested like the preset)")
    tr.add_argument("--out", help="output folder (default runs/PRESET-seedN)")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    tr.add_argument("--regularizer", help="spectral_norm, loss_truncation or example_tied_dropout "
                    "(settings: --set regularizer.spectral_norm.spectral_lambda=... etc.)")
    tr.add_argument("--baseline", help="with --results: the unregularized run to compare against")
    tr.add_argument("--results", help="append the regularizer's result row to this folder")
    tr.set_defaults(func=_command("train", "cmd_train"))

    dm = sub.add_parser("demo", parents=[quiet],
                        help="train a quick TinyMem model, then unlearn its memorized data")
    dm.add_argument("--out", default="tinymem_demo", help="output folder (default ./tinymem_demo)")
    dm.add_argument("--retrain", action="store_true", help="train the model again even if one exists")
    dm.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="matmul precision of training and unlearning (auto, the default: bf16 where this "
                         "machine runs bf16 natively -- a GPU, a CPU with AVX512-BF16/AMX -- else fp32)")
    dm.set_defaults(func=_command("demo", "cmd_demo"))

    un = sub.add_parser("unlearn", parents=[quiet, device, protocol],
                        help="remove memorized sequences from a trained model")
    un.add_argument("--method", required=True,
                    help="a method, a comma-separated list, or `all`; e.g. balanced_subnet,greedy")
    un.add_argument("--model", required=True, help="a `tinymem train` output folder, one of its "
                    "checkpoints/step-* folders, or an HF model folder")
    un.add_argument("--preset", help="data preset when --model is a bare model folder")
    un.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="data/model overrides")
    un.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                    help="method hyperparameter for every listed method that has it (--hp ratio=0.05), "
                         "or for one method (--hp greedy:ratio=1e-4)")
    un.add_argument("--quick-defaults", action="store_true",
                    help="start from the CPU-sized quick settings instead of the paper's")
    un.add_argument("--seed", type=int, default=0)
    un.add_argument("--out", default="tinymem_results")
    un.set_defaults(func=_command("unlearn", "cmd_unlearn"))

    ft = sub.add_parser("finetune", parents=[quiet, device],
                        help="Clean/Extra/Both fine-tuning of a trained run (resumes its AdamW)")
    ft.add_argument("checkpoint", help="a `tinymem train` folder (its newest checkpoint) or one of its "
                    "checkpoint folders")
    ft.add_argument("--data", default="clean", choices=("clean", "extra", "both"),
                    help="clean twins of the artifact rows, all non-artifact rows, or both")
    ft.add_argument("--epochs", type=float, default=5)
    ft.add_argument("--out", default="tinymem_results", help="result rows + the fine-tuning run folder")
    ft.set_defaults(func=_command("finetune", "cmd_finetune"))

    sw = sub.add_parser("sweep", parents=[quiet, device, protocol],
                        help="methods x grid x seeds over trained runs (resumable, shardable)")
    sw.add_argument("models", nargs="+", help="`tinymem train` run folders or checkpoint folders of runs")
    sw.add_argument("--methods", default="all", help="comma-separated method names, or `all` (17)")
    sw.add_argument("--grid", default="quick", help="quick, paper, or a YAML/JSON file")
    sw.add_argument("--seeds", type=int, nargs="+", default=[0])
    sw.add_argument("--shard", help="i/n: run every n-th run starting at i (torchrun sets it from RANK)")
    sw.add_argument("--checkpoints", default="final", metavar="final|all|STEP,...",
                    help="which models of each run: final (default), all saved checkpoints, or steps "
                         "(e.g. 500,1500,final) -- the paper unlearns at four checkpoints of a run")
    sw.add_argument("--out", default="tinymem_sweep")
    sw.add_argument("--dry-run", action="store_true", help="list this shard's runs and exit")
    sw.add_argument("--precision", choices=("run", "auto", "fp32", "bf16"), default="run",
                    help="matmul precision of every method that computes gradients or trains: run (default: "
                         "each method's own setting, training kinds the run's), fp32, bf16, or auto (bf16 "
                         "where this machine runs it natively); part of each run's key")
    sw.set_defaults(func=_command("sweep", "cmd_sweep"))

    rp = sub.add_parser("report", help="best run per method, table, plots, HTML page")
    rp.add_argument("results", nargs="+", help="sweep folders or results.jsonl files")
    rp.add_argument("--out", help="output folder (default: RESULTS/report)")
    rp.add_argument("--title", default="tinymem_fast: memorization mitigation report")
    rp.add_argument("--perp-cutoff", type=float, default=500.0)
    rp.add_argument("--mem-cutoff", type=float, default=100.0)
    rp.add_argument("--utility-metric", choices=("acc", "acc_paper", "ppl_token", "ppl_batchmean"),
                    help="re-score every row with this utility (default: the score each row recorded)")
    rp.add_argument("--mem-metric", choices=("mem", "avg_perc_mem"),
                    help="re-score every noise row with this memorization figure (default: as recorded)")
    rp.set_defaults(func=_command("sweep", "cmd_report"))

    sc = sub.add_parser("score", help="per-example memorization of token sequences (torchrun for many ranks)")
    add_scoring_args(sc, "tinymem_scores")
    sc.add_argument("--mode", choices=("exact", "fractional", "both"), default="exact",
                    help="exact: one teacher-forced pass; fractional: greedy decoding, matched/k; both")
    sc.add_argument("--verify", nargs="?", const="margin", default="none", choices=("none", "margin", "full"),
                    help="re-decode near-tie rows (margin, the default when given) or all rows (full)")
    sc.add_argument("--nll", action="store_true", help="also the mean NLL of each suffix")
    sc.add_argument("--exact-only", action="store_true",
                    help="only the exact bit and first mismatch: nothing after a row's first miss is scored "
                         "(faster; no teacher-forced matched_tf / fractional_tf columns)")
    sc.add_argument("--checkpoints", nargs="+", metavar="DIR",
                    help="score the input under each checkpoint (model folders, or a `tinymem train` run "
                         "folder for all of its checkpoints) and plot memorization over training")
    sc.add_argument("--protocol", choices=("eleuther",),
                    help="eleuther: EleutherAI's memorization evaluation of Pythia (prefix 32, "
                         "continuation 32, greedy, per-row score = share of matched tokens; sets "
                         "--prefix-len, --suffix-len and --mode); memorized_index.txt lists rows scoring 1")
    sc.add_argument("--revisions", metavar="REVS",
                    help="a hub id under each of these revisions (step1000,step2000 or a range "
                         "step1000:step143000:1000): one result set per revision in OUT/<revision>/, and "
                         "memorization over training")
    sc.set_defaults(func=_command("score", "cmd_score"))

    ex = sub.add_parser("extract", help="greedy-decode the suffix of each sequence from its prefix")
    add_scoring_args(ex, "tinymem_extract")
    ex.add_argument("--stop-on-mismatch", action="store_true",
                    help="stop decoding a row at its first wrong token (its later tokens are written as -1)")
    ex.set_defaults(func=_command("score", "cmd_score"))


    py = sub.add_parser("pythia", parents=[quiet, device],
                        help="the Pythia protocol: base stats + methods on any local HF checkpoint")
    from .pythia import add_args as add_pythia_args  # no torch import there

    add_pythia_args(py)
    py.set_defaults(func=_command("pythia", "cmd_pythia"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "device", None):
            from ..common.validation import check_device

            check_device(args.device)
        if getattr(args, "out", None):  # where the results go is checked before the work that makes them
            atomic.writable_folder(args.out)
        rc = args.func(args)
    except user_errors() as exc:  # expected failures: one line and exit code 2; a traceback means a bug
        rank = int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
        print(f"tinymem {args.command}: {f'rank {rank}: ' if rank else ''}{one_line(exc)}", file=sys.stderr)
        rc = 2
    if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun rank whose work is done (results written, process group destroyed) leaves without
        # interpreter finalization: rarely (twice in a few dozen 2-rank CPU test runs) gloo's threads
        # still hold objects whose release during finalization aborts a rank that has finished its
        # work ("terminate called without an active exception", exit -6).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc if isinstance(rc, int) else 0)
    return rc


if __name__ == "__main__":
    sys.exit(main())
