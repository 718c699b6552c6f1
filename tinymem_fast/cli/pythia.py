"""``tinymem pythia``: the Pythia protocol on any local causal LM checkpoint."""

from __future__ import annotations

import argparse
import json
import os

from .common import log_to_stderr, method_hparams, methods_arg, positive_int


def add_args(py: argparse.ArgumentParser) -> None:
    py.add_argument("model", help="local Hugging Face causal LM folder (e.g. pythia-2.8b-deduped)")
    py.add_argument("--memorized", required=True,
                    help="candidate sequences (.jsonl/.npy/.pt): prefix + window, whole rows of --seq-len "
                         "tokens become the forget set (the paper: MemPi's 505 rows of 80 tokens)")
    py.add_argument("--clean", required=True,
                    help="clean sequences: the first --ppl-size rows measure perplexity, the next "
                         "--retain-size rows are the retain set (the paper: 3,264 Pile rows of 80 tokens)")
    py.add_argument("--methods", default="", help="comma-separated methods or `all` (empty: base stats only)")
    py.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                    help="as for `tinymem unlearn` (method:key=value scopes one method)")
    py.add_argument("--prefix-len", type=positive_int, default=32)
    py.add_argument("--suffix-len", type=positive_int, default=40,
                    help="the scored window k after the prefix (default 40: tokens [32, 72))")
    py.add_argument("--seq-len", type=positive_int,
                    help="tokens per forget row and clean row (default 80, the paper's, or the window's "
                         "end if later; the 8 tokens past the paper's window are in its forget rows)")
    py.add_argument("--reshape-clean", action="store_true",
                    help="lay the clean sequences end to end and cut them into --seq-len-token rows (the "
                         "paper reshapes 2,040 Pile rows of 128 tokens into 3,264 x 80); default: cut each")
    py.add_argument("--suppress-eos", action=argparse.BooleanOptionalAction, default=True,
                    help="never let greedy decoding emit the model's EOS inside the window, as the paper's "
                         "generate(min_length=80) does (default on)")
    py.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    py.add_argument("--device-map", help="e.g. auto: shard a model that does not fit one GPU")
    py.add_argument("--ppl-size", type=positive_int, default=1632,
                    help="clean rows for perplexity (default 1,632: 51 batches of 32)")
    py.add_argument("--retain-size", type=positive_int, default=1632,
                    help="clean rows for the retain set, after the perplexity rows (default 1,632)")
    py.add_argument("--ppl-batch-size", type=positive_int, default=32,
                    help="batch of the paper's batch-mean perplexity, whose value depends on it (default 32)")
    py.add_argument("--method-batch-size", type=positive_int, default=32,
                    help="every method's batch_size unless --hp sets it (default 32, the paper's on Pythia)")
    py.add_argument("--utility-metric", choices=("ppl_batchmean", "ppl_token"), default="ppl_batchmean",
                    help="perplexity in the selection score (default ppl_batchmean, the paper's)")
    py.add_argument("--batch-size", type=positive_int, default=32,
                    help="rows per scoring pass (results do not depend on it)")
    py.add_argument("--seed", type=int, default=0)
    py.add_argument("--out", default="tinymem_pythia")


def cmd_pythia(args: argparse.Namespace) -> int:
    from ..eval.inputs import load_sequences
    from ..experiments.pythia import PythiaConfig, clean_matrix, memorized_matrix, run_protocol
    from ..experiments.unlearning import append_row

    log_to_stderr()
    cfg = PythiaConfig(prefix_len=args.prefix_len, suffix_len=args.suffix_len,
                       seq_len=args.seq_len or max(80, args.prefix_len + args.suffix_len), dtype=args.dtype,
                       device=args.device, device_map=args.device_map, ppl_size=args.ppl_size,
                       retain_size=args.retain_size, batch_size=args.batch_size,
                       ppl_batch_size=args.ppl_batch_size, method_batch_size=args.method_batch_size,
                       suppress_eos=args.suppress_eos, utility_metric=args.utility_metric, seed=args.seed)
    methods = methods_arg(args.methods)
    hps = method_hparams(methods, args.hp, False)
    memorized = memorized_matrix(load_sequences(args.memorized), cfg)
    clean = clean_matrix(load_sequences(args.clean), cfg.seq_len, args.reshape_clean)
    base, rows = run_protocol(args.model, memorized, clean, [m.name for m in methods], hps, cfg,
                              progress=not args.quiet)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "base.json"), "w") as f:
        json.dump(base, f, indent=1)
    s = base["settings"]
    eos = f"EOS {s['suppressed_eos']} suppressed" if s["suppressed_eos"] else "no EOS suppressed"
    print(f"base: {base['mem']:.2f}% of {base['n_sequences']} memorized (window [{cfg.prefix_len}, "
          f"{cfg.prefix_len + cfg.suffix_len}), {eos}), fractional {base['fractional']:.4f} (decoded; "
          f"teacher-forced {base['fractional_tf']:.4f}), perplexity {base['test/ppl_batchmean']:.2f} "
          f"(mean of {s['ppl_batch_size']}-row batches; token-level {base['test/ppl_token']:.2f}) on "
          f"{s['n_ppl']} rows")
    if rows:
        print(f"forget rows: {s['forget_row_len']} tokens; retain set: {s['n_retain']} rows"
              + (f" ({s['retain_note']})" if s["retain_note"] else ""))
    for row in rows:
        append_row(row, args.out)
        ua = row["utility_after"]
        print(f"{row['method']}: {row['mem_before']:.2f}% -> {row['mem_after']:.2f}% memorized, perplexity "
              f"{ua['ppl_batchmean']:.2f} (token-level {ua['ppl_token']:.2f}; {cfg.utility_metric} "
              f"{100 * row['d_util']:+.1f}%), score {row['score']:.3f}, {row['time_method_s']:.1f} s")
    print(f"results in {args.out}")
    return 0
