"""``tinymem score`` and ``tinymem extract``: open the input as a row source (any size: memory-mapped
arrays, indexed training data, Parquet, datasets, JSON Lines), load the model (a folder or a hub id at a
revision), score the rows shard by shard and write each shard the moment it is done (under ``torchrun``
every rank writes its own shards), then merge them into per-example JSON Lines plus a summary. A killed
run continues with ``--resume``."""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..common.devices import device_name
from ..common.optional import require
from ..eval import distributed as dist_
from ..eval import streaming
from ..eval.inputs import check_tokenizer, eos_ids
from ..eval.scoring import ScoringInputError, score_for_mode, split_causal_lm, validate_ids
from ..eval.sources import JsonlSource, open_source, select_rows
from ..integrations.loading import has_tokenizer, load_causal_lm, load_tokenizer, resolve_model
from .common import log_to_stderr

# below this many lines a JSON Lines input is parsed whole before the model loads, so that a malformed
# line is reported first; a larger one is parsed shard by shard
VALIDATE_JSONL_UP_TO = 100_000


def _open_input(args, need: int):
    """(source, tokenizer folder, tokenizer) -- None, None without one: a text input without --tokenizer
    takes the model's."""
    tok_dir = args.tokenizer
    tokenizer = load_tokenizer(tok_dir) if tok_dir else None
    try:
        return _read_source(args, need, tokenizer), tok_dir, tokenizer
    except ScoringInputError as exc:
        if tok_dir or not args.model or "needs a tokenizer" not in str(exc):
            raise
        folder = resolve_model(args.model, getattr(args, "revision", None),
                               local_files_only=getattr(args, "local_files_only", None))
        if not has_tokenizer(folder):
            raise
    tokenizer = load_tokenizer(folder)
    return _read_source(args, need, tokenizer), folder, tokenizer


def _read_source(args, need: int, tokenizer):
    src = open_source(args.input, need, tokenizer=tokenizer, seq_len=getattr(args, "seq_len", None),
                      column=getattr(args, "column", None), split=getattr(args, "split", None))
    if isinstance(src, JsonlSource) and len(src) <= VALIDATE_JSONL_UP_TO:
        src.validate_all()
    src = select_rows(src, getattr(args, "rows", None), getattr(args, "row_index", None))
    src.read(0, min(len(src), 2))  # the format of the rows, before a possibly large model loads
    return src


def _manifest(args, command: str, source, need: int, shard_rows: int) -> dict:
    return {"command": command, "model": _manifest_model(args), "revision": getattr(args, "revision", None),
            "input": source.fingerprint(), "prefix_len": args.prefix_len, "suffix_len": args.suffix_len,
            "mode": getattr(args, "mode", None), "nll": getattr(args, "nll", False),
            "verify": getattr(args, "verify", "none"), "exact_only": getattr(args, "exact_only", False),
            "stop_on_mismatch": getattr(args, "stop_on_mismatch", False),
            "suppress_eos": getattr(args, "suppress_eos", False), "dtype": args.dtype,
            "batch_size": args.batch_size, "shard_rows": shard_rows, "width": need,
            "output_format": getattr(args, "output_format", "jsonl")}


def run_command(args, command: str) -> dict | None:
    """``tinymem score`` / ``tinymem extract`` (``args`` from :func:`tinymem_fast.cli.build_parser`); returns
    the summary on rank 0 (None on the other ranks). Bad input raises :class:`ScoringInputError` (or
    ``FileNotFoundError``) before any scoring starts; under ``torchrun`` every rank hears every rank's
    verdict first."""
    ctx = dist_.init_from_env(args.device)
    first = finished = None
    with dist_.RankVerdict(ctx) as setup:
        if args.prefix_len < 1 or args.suffix_len < 1:
            raise ScoringInputError("--prefix-len and --suffix-len must be >= 1")
        shard_rows = getattr(args, "shard_rows", None) or streaming.DEFAULT_SHARD_ROWS
        if shard_rows < 1:
            raise ScoringInputError("--shard-rows must be >= 1")
        need = args.prefix_len + args.suffix_len
        # the input first: a malformed file is reported before a possibly large model is loaded
        source, tok_dir, tokenizer = _open_input(args, need)
        fmt = getattr(args, "output_format", None) or "jsonl"
        if fmt == "parquet":
            require("pyarrow", "--output-format parquet")
        plan = streaming.ShardPlan(len(source), shard_rows, fmt)
        manifest = _manifest(args, command, source, need, shard_rows)
        finished = streaming.check_resume(args.out, manifest, getattr(args, "resume", False))
        first = source.read(0, min(len(source), shard_rows))
        model = load_causal_lm(args.model, args.dtype, device=None if args.device_map else ctx.device,
                               device_map=args.device_map, revision=getattr(args, "revision", None),
                               local_files_only=getattr(args, "local_files_only", None))
        if tokenizer is not None:
            check_tokenizer(tokenizer, model, tok_dir)
        parts = split_causal_lm(model)
        validate_ids(first, parts, need)
        suppress = eos_ids(model) if getattr(args, "suppress_eos", False) else None
    setup.agree(first, ScoringInputError)  # every rank hears every rank's verdict before any rank starts
    if finished is not None:
        dist_.finish(ctx)
        return finished if ctx.rank == 0 else None
    if ctx.rank == 0:
        streaming.claim(args.out, manifest, getattr(args, "resume", False))
    dist_.barrier(ctx)
    done = streaming.done_shards(args.out, command, plan)
    todo = [j for j in range(plan.count) if j not in done]
    mine = todo[ctx.rank::ctx.world_size]

    batch = streaming.AutoBatch(args.batch_size, parts.head_device)

    def score(ids):
        validate_ids(ids, parts, need)
        return batch.run(lambda bs: score_for_mode(
            model, ids, args.prefix_len, args.suffix_len, command=command,
            mode=getattr(args, "mode", "fractional"), batch_size=bs, verify=getattr(args, "verify", False),
            need_nll=getattr(args, "nll", False), stop_on_mismatch=getattr(args, "stop_on_mismatch", False),
            backend=args.backend, exact_only=getattr(args, "exact_only", False), progress=False,
            suppress_ids=suppress))

    t0 = time.perf_counter()
    with dist_.RankVerdict(ctx) as run:
        streaming.score_shards(source, mine, plan, score, args.out, command,
                               progress=not args.quiet and ctx.rank == 0)
        dist_.sync_device(parts.head_device)
    run.agree(None, ScoringInputError)  # a rank failed mid-run: all stop (their shards stay, for --resume)
    wall = time.perf_counter() - t0
    summary = None
    if ctx.rank == 0:
        rows_now = sum(plan.bounds(j)[1] - plan.bounds(j)[0] for j in todo)
        summary = streaming.merge(args.out, command, plan,
                                  _summary(args, command, source, wall, rows_now, len(done), parts, ctx))
        summary["batch_size_used"] = batch.size
    dist_.finish(ctx)
    return summary


def _summary(args, command, source, wall, rows_now, shards_resumed, parts, ctx) -> dict:
    """The run's description; the merge adds the counts and means over every row."""
    s = {"command": command, "model": _manifest_model(args), "revision": getattr(args, "revision", None),
         "input": source.describe(), "prefix_len": args.prefix_len, "suffix_len": args.suffix_len,
         "dtype": args.dtype, "batch_size": args.batch_size, "world_size": ctx.world_size,
         "device": device_name(parts.head_device), "seconds": wall, "rows_scored_now": rows_now,
         "shards_resumed": shards_resumed, "sequences_per_s": rows_now / wall if wall > 0 else float("inf")}
    if command == "score":
        s["mode"] = args.mode
    if getattr(args, "suppress_eos", False):
        s["suppressed_eos"] = eos_ids(parts.model)
    return s


def _manifest_model(args) -> str:
    return args.model if not os.path.isdir(os.path.expanduser(args.model)) else os.path.abspath(args.model)


def score_checkpoints_command(args: argparse.Namespace) -> int:
    from ..eval.checkpoints import expand_checkpoints, score_checkpoints

    try:
        cks = expand_checkpoints(([args.model] if args.model else []) + args.checkpoints)
        src, _, _ = _open_input(args, args.prefix_len + args.suffix_len)
        ids = src.read(0, len(src))
        bs = streaming.AutoBatch(args.batch_size, args.device or "cpu").size
        records = score_checkpoints(cks, ids, args.prefix_len, args.suffix_len, dtype=args.dtype,
                                    device=args.device, batch_size=bs, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as exc:
        print(f"tinymem score: {exc}", file=sys.stderr)
        return 2
    _report_over_training(records, args.out)
    return 0


def _report_over_training(records: list[dict], out: str) -> None:
    from ..eval.checkpoints import write_outputs

    paths = write_outputs(records, out)
    for r in records:
        print(f"step {r['step']}: {r['n_exact']}/{r['n']} exact ({r['pct_exact']:.2f}%)")
    print(f"results in {paths['jsonl']}, plot {paths['png']}")


def parse_revisions(text: str) -> list[str]:
    """``step1000,step2000`` or a range ``step1000:step5000:1000`` (both ends included)."""
    import re

    m = re.fullmatch(r"\s*([A-Za-z_-]*)(\d+):([A-Za-z_-]*)(\d+):(\d+)\s*", text)
    if m:
        pre, a, pre2, b, stride = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(5))
        if pre != pre2 or stride < 1 or b < a:
            raise ScoringInputError(f"--revisions {text!r}: a range is PREFIX<start>:PREFIX<end>:<stride> "
                                    "with start <= end, e.g. step1000:step143000:1000")
        return [f"{pre}{s}" for s in range(a, b + 1, stride)]
    revs = [r.strip() for r in text.split(",") if r.strip()]
    if not revs:
        raise ScoringInputError("--revisions names no revision")
    return list(dict.fromkeys(revs))


def score_revisions_command(args: argparse.Namespace) -> int:
    """The same rows under each revision of a hub model: one full result set per revision in
    ``OUT/<revision>/`` (each resumable), then memorization over training as for --checkpoints."""
    import copy

    from ..eval.checkpoints import STEP_RE

    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        revisions = parse_revisions(args.revisions)
        if os.path.isdir(os.path.expanduser(args.model)):
            raise ScoringInputError(f"{args.model!r} is a local folder: --revisions applies to hub model ids "
                                    "(score local checkpoints with --checkpoints)")
    except ScoringInputError as exc:
        print(f"tinymem {args.command}: {exc}", file=sys.stderr)
        return 2
    ctx = dist_.init_from_env(args.device)  # one process group for every revision
    records = []
    try:
        for rev in revisions:
            sub = copy.copy(args)
            sub.revision, sub.out = rev, os.path.join(args.out, rev)
            s = run_command(sub, args.command)
            if s is None:
                continue
            m = STEP_RE.search(rev)
            records.append({"step": int(m.group(1)) if m else None, "revision": rev,
                            "checkpoint": f"{args.model}@{rev}", "n": s["n"], "n_exact": s["n_exact"],
                            "pct_exact": s["pct_exact"],
                            "mean_matched_frac": s.get("mean_fractional_teacher_forced",
                                                       s.get("mean_fractional", 0.0)),
                            "seconds": s["seconds"]})
    except (ValueError, FileNotFoundError) as exc:
        if rank0:
            print(f"tinymem {args.command}: {exc}", file=sys.stderr)
        dist_.finish(ctx, barrier=False)
        return 2
    dist_.finish(ctx)
    if rank0:
        _report_over_training(records, args.out)
    return 0


# named settings of well-known evaluations
PROTOCOLS = {"eleuther": {"prefix_len": 32, "suffix_len": 32, "mode": "fractional"}}


def cmd_score(args: argparse.Namespace) -> int:
    log_to_stderr()
    for key, value in PROTOCOLS.get(getattr(args, "protocol", None) or "", {}).items():
        setattr(args, key, value)
    if getattr(args, "checkpoints", None):
        return score_checkpoints_command(args)
    if getattr(args, "revisions", None):
        return score_revisions_command(args)
    if not args.model:
        print(f"tinymem {args.command}: give a model folder (or --checkpoints DIR...)", file=sys.stderr)
        return 2
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        s = run_command(args, args.command)
    except (ValueError, FileNotFoundError) as exc:
        if rank0:
            print(f"tinymem {args.command}: {exc}", file=sys.stderr)
        return 2
    if s is not None:
        frac = f", mean fractional {s['mean_fractional']:.4f}" if "mean_fractional" in s else ""
        print(f"{s['n_exact']}/{s['n']} exact ({s['pct_exact']:.2f}%){frac}; "
              f"{s['sequences_per_s']:.1f} sequences/s on {s['device']}; results in {args.out}")
    return 0
