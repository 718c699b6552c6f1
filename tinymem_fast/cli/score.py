"""``tinymem score`` and ``tinymem extract``: read the input, load the model, shard the rows over
``torchrun`` ranks, score, gather on rank 0 and write per-example JSON Lines plus a summary."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ..common import atomic
from ..common.devices import device_name
from ..eval import distributed as dist_
from ..eval.inputs import check_tokenizer, eos_ids, load_sequences, to_matrix
from ..eval.scoring import ScoringInputError, score_for_mode, split_causal_lm, validate_ids
from ..integrations.loading import has_tokenizer, load_causal_lm, load_tokenizer
from .common import log_to_stderr


def run_command(args, command: str) -> dict | None:
    """``tinymem score`` / ``tinymem extract`` (``args`` from :func:`tinymem_fast.cli.build_parser`); returns
    the summary on rank 0 (None on the other ranks). Under ``torchrun`` the examples are split into
    contiguous shards, one per rank, and rank 0 writes the gathered results. Bad input raises
    :class:`ScoringInputError` (or ``FileNotFoundError``) before any scoring starts."""
    ctx = dist_.init_from_env(args.device)
    failure = None
    try:
        if args.prefix_len < 1 or args.suffix_len < 1:
            raise ScoringInputError("--prefix-len and --suffix-len must be >= 1")
        if args.batch_size < 1:
            raise ScoringInputError("--batch-size must be >= 1")
        # the input first: a malformed file is reported before a possibly large model is loaded
        tok_dir = args.tokenizer
        tokenizer = load_tokenizer(tok_dir) if tok_dir else None
        try:
            seqs = load_sequences(args.input, tokenizer)
        except ScoringInputError as exc:
            if tokenizer is None and "needs a tokenizer" in str(exc) and has_tokenizer(args.model):
                tok_dir = args.model
                tokenizer = load_tokenizer(tok_dir)
                seqs = load_sequences(args.input, tokenizer)
            else:
                raise
        need = args.prefix_len + args.suffix_len
        ids = to_matrix(seqs, need)
        model = load_causal_lm(args.model, args.dtype, device=None if args.device_map else ctx.device,
                               device_map=args.device_map)
        if tokenizer is not None:
            check_tokenizer(tokenizer, model, tok_dir)
        parts = split_causal_lm(model)
        validate_ids(ids, parts, need)
    except (ValueError, FileNotFoundError) as exc:
        if not ctx.active:
            raise
        failure = exc
    except BaseException:
        dist_.finish(ctx, barrier=False)
        raise
    if ctx.active:  # every rank hears every rank's verdict on its input before any rank starts
        dist_.agree_on_work(ctx, failure, None if failure else ids, ScoringInputError)
    n = ids.shape[0]
    lo, hi = dist_.shard_bounds(n, ctx.rank, ctx.world_size)
    t0 = time.perf_counter()
    # a rank with an empty shard (more ranks than examples) scores one row and keeps none, so that its
    # columns have the names and shapes the gather expects
    mine = ids[lo:hi] if hi > lo else ids[:1]
    cols = score_for_mode(model, mine, args.prefix_len, args.suffix_len, command=command,
                          mode=getattr(args, "mode", "fractional"), batch_size=args.batch_size,
                          verify=getattr(args, "verify", False), need_nll=getattr(args, "nll", False),
                          stop_on_mismatch=getattr(args, "stop_on_mismatch", False), backend=args.backend,
                          exact_only=getattr(args, "exact_only", False),
                          progress=not args.quiet and ctx.rank == 0,
                          suppress_ids=eos_ids(model) if getattr(args, "suppress_eos", False) else None)
    if hi == lo:
        cols = {c: v[:0] for c, v in cols.items()}
    cols = dist_.gather_columns(cols, n, ctx)
    dist_.sync_device(parts.head_device)
    wall = time.perf_counter() - t0
    summary = None
    if ctx.rank == 0:
        summary = _summary(cols, args, command, n, wall, parts, ctx)
        _write_outputs(args.out, command, cols, summary)
    dist_.finish(ctx)
    return summary


def _summary(cols, args, command, n, wall, parts, ctx) -> dict:
    s = {"command": command, "model": os.path.abspath(args.model), "input": os.path.abspath(args.input),
         "n": n, "prefix_len": args.prefix_len, "suffix_len": args.suffix_len, "dtype": args.dtype,
         "batch_size": args.batch_size, "world_size": ctx.world_size,
         "device": device_name(parts.head_device), "seconds": wall,
         "sequences_per_s": n / wall if wall > 0 else float("inf")}
    if command == "score":
        s["mode"] = args.mode
    if getattr(args, "suppress_eos", False):
        s["suppressed_eos"] = eos_ids(parts.model)
    n_exact = int(cols["exact"].sum())
    s.update(n_exact=n_exact, pct_exact=100.0 * n_exact / max(1, n))
    if "fractional" in cols:
        s["mean_fractional"] = float(cols["fractional"].double().mean())
    if "fractional_tf" in cols:
        s["mean_fractional_teacher_forced"] = float(cols["fractional_tf"].double().mean())
    if "nll" in cols:
        s["mean_nll"] = float(cols["nll"].double().mean())
    if "verified" in cols:
        s["n_verified"] = int(cols["verified"].sum())
        s["n_disagree"] = int(cols["disagree"].sum())
        s["disagree"] = cols["disagree"].nonzero().reshape(-1).tolist()
    return s


def _write_outputs(out: str, command: str, cols: dict, summary: dict) -> None:
    os.makedirs(out, exist_ok=True)
    names = list(cols)
    lists = {c: cols[c].tolist() for c in names}

    def rows(f):
        for i in range(summary["n"]):
            rec = {"index": i}
            for c in names:
                rec[c] = lists[c][i]
            f.write(json.dumps(rec) + "\n")

    atomic.write_text(os.path.join(out, f"{command}.jsonl"), rows)
    atomic.write_text(os.path.join(out, "summary.json"), lambda f: json.dump(summary, f, indent=1))


def score_checkpoints_command(args: argparse.Namespace) -> int:
    from ..eval.checkpoints import expand_checkpoints, score_checkpoints, write_outputs

    try:
        cks = expand_checkpoints(([args.model] if args.model else []) + args.checkpoints)
        tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
        ids = to_matrix(load_sequences(args.input, tok), args.prefix_len + args.suffix_len)
        records = score_checkpoints(cks, ids, args.prefix_len, args.suffix_len, dtype=args.dtype,
                                    device=args.device, batch_size=args.batch_size, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as exc:
        print(f"tinymem score: {exc}", file=sys.stderr)
        return 2
    paths = write_outputs(records, args.out)
    for r in records:
        print(f"step {r['step']}: {r['n_exact']}/{r['n']} exact ({r['pct_exact']:.2f}%)")
    print(f"results in {paths['jsonl']}, plot {paths['png']}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    log_to_stderr()
    if getattr(args, "checkpoints", None):
        return score_checkpoints_command(args)
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
