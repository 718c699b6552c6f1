"""What several commands share: the one user-error path, argument types, method lists and
settings."""

from __future__ import annotations

import argparse
import logging
import sys

from ..common.optional import MissingExtra

# What a user can cause (bad settings, missing files, a missing optional package, a backend asked for
# that cannot run here); each command still catches what it can word better, this is the one path for
# everything else.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               MissingExtra)


def user_errors() -> tuple:
    from ..ops.registry import BackendUnavailable

    return (*USER_ERRORS, BackendUnavailable)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, KeyError | OSError) and exc.args and isinstance(exc.args[-1], str):
        text = exc.args[-1] if not getattr(exc, "filename", None) else f"{exc.args[-1]}: {exc.filename}"
    return (text.splitlines() or [type(exc).__name__])[0]


def log_to_stderr(level: int = logging.WARNING, fmt: str = "%(levelname)s:%(name)s:%(message)s") -> None:
    """Show the library's own log records on stderr. Only the ``tinymem_fast`` logger gets a handler:
    a root handler would print every third-party record a second time wherever that library lets its
    records propagate (transformers does when ``CI`` is set), breaking the one-line error promise."""
    log = logging.getLogger("tinymem_fast")
    for h in list(log.handlers):
        if getattr(h, "_tinymem_cli", False):
            log.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._tinymem_cli = True
    handler.setFormatter(logging.Formatter(fmt))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def batch_size_arg(text: str) -> int | str:
    return "auto" if text == "auto" else positive_int(text)


def retain_size_arg(text: str) -> int | str:
    return "all" if text == "all" else positive_int(text)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_hp(items: list[str]) -> dict:
    from ..common.validation import parse_like

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--hp expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_like(v.strip(), None)
    return out


def methods_arg(text: str) -> list:
    """Registered unlearning methods named by ``a,b,c`` or ``all`` (each once, in the order given)."""
    from ..methods import method_names
    from ..methods.registry import get_unlearning_method as get_method

    names = method_names() if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    return list(dict.fromkeys(get_method(n) for n in names))


def method_hparams(methods, items: list[str], quick_defaults: bool) -> dict[str, dict]:
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
        parsed = parse_hp([f"{key}={value}"])
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


def add_scoring_args(sp: argparse.ArgumentParser, out_default: str) -> None:
    sp.add_argument("model", nargs="?", help="a Hugging Face causal LM: a local folder or a hub id "
                    "(e.g. EleutherAI/pythia-70m-deduped)")
    sp.add_argument("--revision", help="a hub id's branch, tag or commit, e.g. step143000")
    sp.add_argument("--local-files-only", action="store_true",
                    help="never download: hub ids come from the Hugging Face cache (as HF_HUB_OFFLINE=1)")
    sp.add_argument("--input", required=True,
                    help='token sequences of any size, read as needed: .npy ([N, L] integers, memory-'
                         'mapped), a GPT-NeoX/Megatron .bin/.idx pair, .parquet or a Hugging Face dataset '
                         'folder (a token-id or text column), .jsonl ({"ids": [...]} or {"text": "..."} per '
                         'line), .pt')
    sp.add_argument("--tokenizer", help="tokenizer folder for text input (default: the model's)")
    sp.add_argument("--seq-len", type=positive_int, metavar="L",
                    help=".bin/.idx input: rows are L-token windows of the documents laid end to end (as "
                         "pre-shuffled training data is batched; Pythia: 2049) instead of one per document")
    sp.add_argument("--column", help="Parquet / dataset input: the column of token ids or text")
    sp.add_argument("--split", help="dataset input with several splits: which one")
    sp.add_argument("--rows", metavar="START:END", help="score only these rows of the input")
    sp.add_argument("--row-index", metavar="FILE",
                    help="score only the rows a file lists (.npy of integers, or one index per line)")
    sp.add_argument("--shard-rows", type=positive_int, metavar="N",
                    help="rows per output shard, each written when done (default 4096)")
    sp.add_argument("--output-format", choices=("jsonl", "parquet"), default="jsonl",
                    help="per-row results as one JSON Lines file, or a folder of Parquet files (one per "
                         "shard: typed, compressed, for big runs)")
    sp.add_argument("--resume", action="store_true",
                    help="continue a killed run in --out (its finished shards are kept)")
    sp.add_argument("--prefix-len", type=int, default=50, help="prompt tokens (default 50)")
    sp.add_argument("--suffix-len", type=int, default=50, help="tokens to reproduce (default 50)")
    sp.add_argument("--batch-size", type=batch_size_arg, default="auto",
                    help="rows per forward pass, or auto (default): 64 on a CPU; on a GPU the largest that "
                         "fits, found by halving from 1024 on out-of-memory")
    sp.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    sp.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if available)")
    sp.add_argument("--device-map", help="shard the model with accelerate, e.g. auto")
    sp.add_argument("--backend", choices=("torch", "cpp", "triton", "cuda"), help="kernel backend")
    sp.add_argument("--out", default=out_default, help=f"output folder (default ./{out_default})")
    sp.add_argument("--suppress-eos", action="store_true",
                    help="never pick the model's EOS token, as the reference's min_length does (SPEC 4.5)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
