"""``tinymem pythia``: the Pythia protocol on any local causal LM checkpoint."""

from __future__ import annotations

import argparse
import json
import os

from .common import log_to_stderr, method_hparams, methods_arg


def cmd_pythia(args: argparse.Namespace) -> int:
    from ..eval.inputs import load_sequences, to_matrix
    from ..experiments.pythia import PythiaConfig, run_protocol
    from ..experiments.unlearning import append_row

    log_to_stderr()
    cfg = PythiaConfig(prefix_len=args.prefix_len, suffix_len=args.suffix_len, dtype=args.dtype,
                       device=args.device, device_map=args.device_map, retain_size=args.retain_size,
                       batch_size=args.batch_size, seed=args.seed)
    methods = methods_arg(args.methods)
    hps = method_hparams(methods, args.hp, False)
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
