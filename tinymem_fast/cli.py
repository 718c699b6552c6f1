"""``tinymem`` command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import collect, format_report

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from .presets import ALIASES, PRESETS, get_preset

    for name in PRESETS:
        print(f"{name:<26} {get_preset(name).description}")
    for a, target in ALIASES.items():
        print(f"{a:<26} = {target}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import logging
    import os
    import time

    from .data.dataset import build
    from .models import build_model
    from .presets import apply_overrides, get_preset
    from .training import train

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = apply_overrides(get_preset(args.preset), args.set, args.config)
    except (ValueError, FileNotFoundError) as exc:
        print(f"tinymem train: {exc}", file=sys.stderr)
        return 2
    if args.seed is not None:
        cfg.seed = args.seed
    if args.device:
        cfg.train.device = args.device
    out = args.out or os.path.join("runs", f"{args.preset}-seed{cfg.seed}")
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    try:
        data = build(cfg.data, seed=cfg.seed, workdir=out)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"tinymem train: {exc}", file=sys.stderr)
        return 2
    run_info = {"preset": args.preset, "config": cfg.to_dict(), "data_fingerprint": data.fingerprint(),
                "data_meta": data.meta}
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump(run_info, f, indent=1)
    eos = pad = data.pad_id
    model = build_model(cfg.model, data.vocab_size, cfg.data.max_ctx, seed=cfg.seed,
                        bos_id=eos if cfg.data.kind == "language" else 10, eos_id=eos if cfg.data.kind ==
                        "language" else 11, pad_id=pad)
    result = train(model, data, cfg.train, out, seed=cfg.seed, resume=not args.no_resume,
                   progress=not args.quiet)
    result["wall_s"] = time.perf_counter() - t0
    with open(os.path.join(out, "final_metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    keys = [k for k in ("avg_acc", "test/acc", "test/ppl_token", "mem", "avg_perc_mem", "asr") if k in result]
    print(f"done in {result['wall_s']:.0f} s: " + ", ".join(f"{k} {result[k]:.3f}" for k in keys))
    print(f"model: {os.path.join(out, 'final')}  metrics: {os.path.join(out, 'metrics.jsonl')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinymem", description="Measure and remove memorization in LMs.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, compiled extension, backend per op")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_cmd_info)

    pr = sub.add_parser("presets", help="list the named run configurations")
    pr.set_defaults(func=_cmd_presets)

    tr = sub.add_parser("train", help="train a TinyMem model (resumes from its newest checkpoint)")
    tr.add_argument("--preset", default="quick", help="named configuration (see `tinymem presets`)")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting, e.g. --set data.num_noise=200 --set train.epochs=5")
    tr.add_argument("--config", help="JSON/YAML file of overrides (nested like the preset)")
    tr.add_argument("--out", help="output folder (default runs/PRESET-seedN)")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--device", help="cpu, cuda, cuda:1 ...")
    tr.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=_cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
