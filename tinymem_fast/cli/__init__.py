"""``tinymem`` command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .. import __version__
from ..common import atomic
from ..common.optional import MissingExtra
from .score import add_scoring_args, cmd_score

# What a user can cause (bad settings, missing files, a missing optional package, a backend asked for
# that cannot run here); each command still catches what it can word better, this is the one path for
# everything else.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               MissingExtra)


def _user_errors() -> tuple:
    from ..ops.registry import BackendUnavailable

    return (*USER_ERRORS, BackendUnavailable)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, KeyError | OSError) and exc.args and isinstance(exc.args[-1], str):
        text = exc.args[-1] if not getattr(exc, "filename", None) else f"{exc.args[-1]}: {exc.filename}"
    return (text.splitlines() or [type(exc).__name__])[0]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import collect, format_report

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from ..tinymem.presets import ALIASES, PRESETS, get_preset

    for name in PRESETS:
        print(f"{name:<26} {get_preset(name).description}")
    for a, target in ALIASES.items():
        print(f"{a:<26} = {target}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import logging
    import os

    from ..tinymem.presets import apply_overrides, get_preset
    from ..tinymem.training import train_run

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = apply_overrides(get_preset(args.preset), args.set, args.config)
    if args.regularizer:
        cfg.train.regularizer = args.regularizer
        cfg.train.validate()
    if args.results and not (cfg.train.regularizer and args.baseline):
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


def _cmd_finetune(args: argparse.Namespace) -> int:
    import logging

    from ..experiments.unlearning import append_row
    from ..methods.finetune import FinetuneConfig, finetune

    logging.basicConfig(level=logging.WARNING)
    row = finetune(args.checkpoint, FinetuneConfig(data=args.data, epochs=args.epochs), args.out,
                   device=args.device, progress=not args.quiet)
    append_row(row, args.out)
    print(f"{row['method']}: {row['mem_metric']} {row['mem_before']:.2f}% -> {row['mem_after']:.2f}%, "
          f"utility change {100 * row['d_util']:+.2f}%, {row['time_method_s']:.1f} s; results in {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import logging

    from ..experiments.demo import run_demo

    logging.basicConfig(level=logging.WARNING)
    run_demo(args.out, retrain=args.retrain, progress=not args.quiet)
    return 0


def _parse_hp(items: list[str]) -> dict:
    from ..common.validation import parse_like

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--hp expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_like(v.strip(), None)
    return out


def _methods_arg(text: str) -> list:
    """Registered unlearning methods named by ``a,b,c`` or ``all`` (each once, in the order given)."""
    from ..methods import method_names
    from ..methods.registry import get_unlearning_method as get_method

    names = method_names() if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    return list(dict.fromkeys(get_method(n) for n in names))


def _method_hparams(methods, items: list[str], quick_defaults: bool) -> dict[str, dict]:
    """Per method, its hyperparameters: ``key=value`` goes to every listed method that has the setting,
    ``method:key=value`` to that method only; a key no listed method knows is an error."""
    import dataclasses

    from ..experiments.demo import QUICK_METHODS
    from ..methods import get_method

    fields = {m.name: {f.name for f in dataclasses.fields(m.config_cls)} for m in methods}
    out = {m.name: dict(QUICK_METHODS.get(m.name, {})) if quick_defaults else {} for m in methods}
    for item in items:
        head, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--hp expects key=value or method:key=value, got {item!r}")
        scope, _, key = head.strip().rpartition(":")
        parsed = _parse_hp([f"{key}={value}"])
        targets = [get_method(scope).name] if scope else [m.name for m in methods]
        if scope and targets[0] not in out:
            raise ValueError(f"--hp {item!r}: method {scope!r} is not among --method")
        hit = [t for t in targets if key in fields[t]]
        if not hit:
            names = " / ".join(targets)
            valid = sorted(set().union(*(fields[t] for t in targets)) - {"progress"})
            raise ValueError(f"{names} has no setting {key!r}; valid: {', '.join(valid)}")
        for t in hit:
            out[t].update(parsed)
    return out


def _cmd_unlearn(args: argparse.Namespace) -> int:
    import logging
    import os

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

    logging.basicConfig(level=logging.WARNING)
    methods = _methods_arg(args.method)
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
    hps = _method_hparams(methods, args.hp, args.quick_defaults)
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


def _cmd_sweep(args: argparse.Namespace) -> int:
    import logging

    from ..experiments.sweep import parse_shard, plan, run_sweep

    logging.basicConfig(level=logging.WARNING)
    methods = "all" if args.methods == "all" else [m for m in args.methods.split(",") if m.strip()]
    runs = plan(args.models, methods, args.grid, args.seeds)
    shard = parse_shard(args.shard)
    if args.dry_run:
        for r in runs[shard[0]::shard[1]]:
            print(r.key, r.method, json.dumps(r.hp, default=str), f"seed={r.seed}")
        return 0
    try:
        s = run_sweep(runs, args.out, shard=shard, device=args.device or "cpu", retain_size=args.retain_size,
                      progress=not args.quiet)
    except ValueError as exc:
        print(f"tinymem sweep: {exc}", file=sys.stderr)
        return 2
    print(f"shard {s['shard']}: {s['ran']} runs done, {s['skipped']} already finished; {s['wall_s']:.0f} s "
          f"({100 * s['bookkeeping_frac']:.1f}% outside the runs); rows in {args.out}/rows")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    import os

    from ..experiments.report import write_report
    from ..experiments.sweep import load_rows

    rows = [r for src in args.results for r in load_rows(src)]
    out = args.out or (args.results[0] if os.path.isdir(args.results[0]) else
                       os.path.dirname(os.path.abspath(args.results[0])))
    paths = write_report(rows, os.path.join(out, "report") if out == args.results[0] else out,
                         title=args.title, perp_cutoff=args.perp_cutoff, mem_cutoff=args.mem_cutoff)
    print(f"{len(rows)} rows -> {paths['report.md']}, {paths['report.html']}")
    return 0


def _cmd_pythia(args: argparse.Namespace) -> int:
    import logging
    import os

    from ..eval.inputs import load_sequences, to_matrix
    from ..experiments.pythia import PythiaConfig, run_protocol
    from ..experiments.unlearning import append_row

    logging.basicConfig(level=logging.WARNING)
    cfg = PythiaConfig(prefix_len=args.prefix_len, suffix_len=args.suffix_len, dtype=args.dtype,
                       device=args.device, device_map=args.device_map, retain_size=args.retain_size,
                       batch_size=args.batch_size, seed=args.seed)
    methods = _methods_arg(args.methods)
    hps = _method_hparams(methods, args.hp, False)
    need = cfg.prefix_len + cfg.suffix_len
    memorized = to_matrix(load_sequences(args.memorized), need)
    clean_seqs = load_sequences(args.clean)
    clean = to_matrix(clean_seqs, min(len(s) for s in clean_seqs))
    base, rows = run_protocol(args.model, memorized, clean, [m.name for m in methods], hps, cfg,
                              progress=not args.quiet)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "base.json"), "w") as f:
        json.dump(base, f, indent=1)
    print(f"base: {base['mem']:.2f}% of {base['n_sequences']} memorized, "
          f"perplexity {base['test/ppl_token']:.2f}")
    for row in rows:
        append_row(row, args.out)
        print(f"{row['method']}: {row['mem_before']:.2f}% -> {row['mem_after']:.2f}% memorized, perplexity "
              f"{row['utility_after']['ppl_token']:.2f} ({100 * row['d_util']:+.1f}%), "
              f"{row['time_method_s']:.1f} s")
    print(f"results in {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinymem", description="Measure and remove memorization in LMs.")
    p.add_argument("--version", action="version", version=f"tinymem_fast {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    # flags several commands share, declared once
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--quiet", action="store_true", help="no progress bars")
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", help="cpu, cuda, cuda:1 ... (checked before any work)")
    # commands in the order of a study: set up, train, remove memorization, compare, score any model
    info = sub.add_parser("info", help="versions, compiled extension, backend per op")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_cmd_info)

    pr = sub.add_parser("presets", help="list the named run configurations")
    pr.set_defaults(func=_cmd_presets)

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
                    "(hyperparameters: --set train.spectral_lambda=... etc.)")
    tr.add_argument("--baseline", help="with --results: the unregularized run to compare against")
    tr.add_argument("--results", help="append the regularizer's result row to this folder")
    tr.set_defaults(func=_cmd_train)

    dm = sub.add_parser("demo", parents=[quiet],
                        help="train a quick TinyMem model, then unlearn its memorized data")
    dm.add_argument("--out", default="tinymem_demo", help="output folder (default ./tinymem_demo)")
    dm.add_argument("--retrain", action="store_true", help="train the model again even if one exists")
    dm.set_defaults(func=_cmd_demo)

    un = sub.add_parser("unlearn", parents=[quiet, device],
                        help="remove memorized sequences from a trained model")
    un.add_argument("--method", required=True,
                    help="a method, a comma-separated list, or `all`; e.g. balanced_subnet,greedy")
    un.add_argument("--model", required=True, help="a `tinymem train` output folder or an HF model folder")
    un.add_argument("--preset", help="data preset when --model is a bare model folder")
    un.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="data/model overrides")
    un.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                    help="method hyperparameter for every listed method that has it (--hp ratio=0.05), "
                         "or for one method (--hp greedy:ratio=1e-4)")
    un.add_argument("--quick-defaults", action="store_true",
                    help="start from the CPU-sized quick settings instead of the paper's")
    un.add_argument("--retain-size", type=_positive_int, default=2000)
    un.add_argument("--seed", type=int, default=0)
    un.add_argument("--out", default="tinymem_results")
    un.set_defaults(func=_cmd_unlearn)

    ft = sub.add_parser("finetune", parents=[quiet, device],
                        help="Clean/Extra/Both fine-tuning of a trained run (resumes its AdamW)")
    ft.add_argument("checkpoint", help="a `tinymem train` folder (its newest checkpoint) or one of its "
                    "checkpoint folders")
    ft.add_argument("--data", default="clean", choices=("clean", "extra", "both"),
                    help="clean twins of the artifact rows, all non-artifact rows, or both")
    ft.add_argument("--epochs", type=float, default=5)
    ft.add_argument("--out", default="tinymem_results", help="result rows + the fine-tuning run folder")
    ft.set_defaults(func=_cmd_finetune)

    sw = sub.add_parser("sweep", parents=[quiet, device],
                        help="methods x grid x seeds over trained runs (resumable, shardable)")
    sw.add_argument("models", nargs="+", help="`tinymem train` run folders")
    sw.add_argument("--methods", default="all", help="comma-separated method names, or `all` (17)")
    sw.add_argument("--grid", default="quick", help="quick, paper, or a YAML/JSON file")
    sw.add_argument("--seeds", type=int, nargs="+", default=[0])
    sw.add_argument("--shard", help="i/n: run every n-th run starting at i (torchrun sets it from RANK)")
    sw.add_argument("--retain-size", type=_positive_int, default=2000)
    sw.add_argument("--out", default="tinymem_sweep")
    sw.add_argument("--dry-run", action="store_true", help="list this shard's runs and exit")
    sw.set_defaults(func=_cmd_sweep)

    rp = sub.add_parser("report", help="best run per method, table, plots, HTML page")
    rp.add_argument("results", nargs="+", help="sweep folders or results.jsonl files")
    rp.add_argument("--out", help="output folder (default: RESULTS/report)")
    rp.add_argument("--title", default="tinymem_fast: memorization mitigation report")
    rp.add_argument("--perp-cutoff", type=float, default=500.0)
    rp.add_argument("--mem-cutoff", type=float, default=100.0)
    rp.set_defaults(func=_cmd_report)

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
    sc.set_defaults(func=cmd_score)

    ex = sub.add_parser("extract", help="greedy-decode the suffix of each sequence from its prefix")
    add_scoring_args(ex, "tinymem_extract")
    ex.add_argument("--stop-on-mismatch", action="store_true",
                    help="stop decoding a row at its first wrong token (its later tokens are written as -1)")
    ex.set_defaults(func=cmd_score)


    py = sub.add_parser("pythia", parents=[quiet, device],
                        help="the Pythia protocol: base stats + methods on any local HF checkpoint")
    py.add_argument("model", help="local Hugging Face causal LM folder (e.g. pythia-2.8b-deduped)")
    py.add_argument("--memorized", required=True, help="memorized sequences (.jsonl/.npy/.pt), prefix+suffix")
    py.add_argument("--clean", required=True, help="clean sequences: perplexity and the retain set")
    py.add_argument("--methods", default="", help="comma-separated methods or `all` (empty: base stats only)")
    py.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                    help="as for `tinymem unlearn` (method:key=value scopes one method)")
    py.add_argument("--prefix-len", type=int, default=32)
    py.add_argument("--suffix-len", type=int, default=40)
    py.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    py.add_argument("--device-map", help="e.g. auto: shard a model that does not fit one GPU")
    py.add_argument("--retain-size", type=_positive_int, default=1632)
    py.add_argument("--batch-size", type=int, default=32)
    py.add_argument("--seed", type=int, default=0)
    py.add_argument("--out", default="tinymem_pythia")
    py.set_defaults(func=_cmd_pythia)
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
    except _user_errors() as exc:  # expected failures: one line and exit code 2; a traceback means a bug
        rank = int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
        print(f"tinymem {args.command}: {f'rank {rank}: ' if rank else ''}{_one_line(exc)}", file=sys.stderr)
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
