"""The Pythia protocol (SPEC.md 4.4, 6.1, 6.2) as one call: a local Hugging Face checkpoint, a file of
memorized sequences (the paper: MemPi's 505 rows of 80 tokens) and a file of clean sequences (the paper:
a random Pile batch as 3,264 rows of 80 tokens) -> base statistics and one result row per method.

* % memorized (``mem``): share of the given sequences whose window ``[prefix_len, prefix_len + suffix_len)``
  (the paper: ``[32, 72)``, k = 40) greedy decoding reproduces exactly from the prefix; one teacher-forced
  pass (:func:`tinymem_fast.eval.scoring.score_exact`).
* ``fractional``: the decoded Pythia-style score of SPEC 4.4, the mean over sequences of the share of the
  k window tokens that greedy decoding from the prefix gets right (rows that diverge are decoded with
  :func:`tinymem_fast.eval.scoring.extract`; memorized rows score 1). ``fractional_tf`` is the
  teacher-forced accuracy of the window (every position predicted from the true context), which after a
  row's first miss is not what decoding produces.
* EOS: the paper decodes with ``generate(min_length=80)``, which never lets the model emit its EOS token
  inside the window; ``suppress_eos`` (default on) does the same in the teacher-forced pass and in
  decoding (``suppress_ids``), so a window that holds EOS is never memorized. Rows record the ids.
* perplexity, both named for what they are, over the first ``ppl_size`` clean rows (the paper: 1,632)
  with labels = inputs: ``test/ppl_batchmean``, the paper's, the mean over batches of
  ``ppl_batch_size`` (32) rows of exp(the batch's mean token cross-entropy) -- it depends on the batch
  size, which rows record; ``test/ppl_token``, exp(total cross-entropy / predicted tokens).
* forget set: the given sequences memorized now, whole rows of ``seq_len`` tokens (the paper: 80, the
  last 8 past the window included); retain set: the next ``retain_size`` clean rows after the perplexity
  rows (the paper: the last 1,632 of its 3,264 rows; SPEC 6.2). A smaller retain set or one that shares
  the perplexity rows is stated in ``retain_note``.
* methods run with ``batch_size`` = ``method_batch_size`` (the paper's 32 on Pythia) unless ``--hp``
  sets it; each on a freshly loaded copy of the model, in the requested dtype (fp16/bf16 for large
  checkpoints) and with ``device_map`` sharding when the model does not fit one GPU.

Rows follow the unlearning pipeline's schema; the selection score (SPEC 6.4) is relative memorization +
relative perplexity, by default the paper's batch-mean perplexity (``utility_metric``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

PAPER_SPLIT = 1632          # rows of the perplexity set and of the retain set (SPEC 4.4)
# settings named batch_size that do not count rows: a method listed here keeps its own
NOT_ROW_BATCH = {"integrated_gradients"}   # one-token replicas (position x layer x step) per pass


@dataclass
class PythiaConfig:
    prefix_len: int = 32
    suffix_len: int = 40                # the scored window k
    seq_len: int = 80                   # forget rows and clean rows are cut to this many tokens
    dtype: str = "float32"
    device: str | None = None
    device_map: str | None = None       # e.g. "auto" (needs accelerate)
    ppl_size: int = PAPER_SPLIT
    retain_size: int = PAPER_SPLIT
    batch_size: int = 32                # rows per scoring pass (results do not depend on it)
    ppl_batch_size: int = 32            # the batch of ppl_batchmean, whose value depends on it
    method_batch_size: int | None = 32  # every method's batch_size (None: the methods' own defaults)
    suppress_eos: bool = True
    utility_metric: str = "ppl_batchmean"   # perplexity in the selection score: the paper's, or ppl_token
    seed: int = 0

    def __post_init__(self):
        for name in ("prefix_len", "suffix_len", "seq_len", "ppl_size", "retain_size", "batch_size",
                     "ppl_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.method_batch_size is not None and self.method_batch_size < 1:
            raise ValueError(f"method_batch_size must be >= 1, got {self.method_batch_size}")
        if self.utility_metric not in ("ppl_batchmean", "ppl_token"):
            raise ValueError(f"utility_metric must be ppl_batchmean or ppl_token, got "
                             f"{self.utility_metric!r}")
        if self.seq_len < self.prefix_len + self.suffix_len:
            raise ValueError(f"seq_len {self.seq_len} is shorter than prefix_len + suffix_len = "
                             f"{self.prefix_len + self.suffix_len}")


def _first_device(model) -> torch.device:
    emb = model.get_input_embeddings()
    return emb.weight.device


def _exp(x: float) -> float:
    return math.exp(x) if x < 709.0 else float("inf")   # a destroyed model: inf, not OverflowError


@torch.no_grad()
def perplexities(model, ids: torch.Tensor, batch_size: int = 32, progress: bool = False) -> dict:
    """``ppl_batchmean``: mean over batches of ``batch_size`` rows (the last one may be smaller) of
    exp(mean cross-entropy of the batch's predicted tokens), the paper's (HF ``loss`` with labels = inputs,
    no padding); ``ppl_token``: exp(total cross-entropy / predicted tokens). Cross-entropy in float32."""
    dev = _first_device(model)
    total, count, per_batch = 0.0, 0, []
    was_training = model.training
    model.eval()
    try:
        for i in tqdm(range(0, ids.shape[0], batch_size), desc="perplexity", disable=not progress):
            x = ids[i: i + batch_size].to(dev)
            logits = model(x).logits[:, :-1].float()
            tgt = x[:, 1:].reshape(-1).to(logits.device)
            nll = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt,
                                                          reduction="sum"))
            total += nll
            count += tgt.numel()
            per_batch.append(_exp(nll / tgt.numel()))
    finally:
        model.train(was_training)
    return {"ppl_batchmean": sum(per_batch) / max(1, len(per_batch)),
            "ppl_token": _exp(total / max(1, count))}


def perplexity(model, ids: torch.Tensor, batch_size: int = 32, progress: bool = False) -> float:
    """Token-level perplexity: exp(total NLL / total predicted tokens), CE in float32."""
    return perplexities(model, ids, batch_size, progress)["ppl_token"]


def suppressed_ids(model, cfg: PythiaConfig) -> list[int]:
    from ..eval.inputs import eos_ids

    return eos_ids(model) if cfg.suppress_eos else []


def protocol_stats(model, memorized: torch.Tensor, ppl_ids: torch.Tensor, cfg: PythiaConfig) -> dict:
    """% memorized, decoded and teacher-forced fractional scores, both perplexities (see the module)."""
    from ..eval.scoring import score_for_mode

    p, k = cfg.prefix_len, cfg.suffix_len
    suppress = suppressed_ids(model, cfg)
    cols = score_for_mode(model, memorized[:, : p + k], p, k, command="score", mode="both",
                          batch_size=cfg.batch_size, verify=False, need_nll=False, stop_on_mismatch=False,
                          backend=None, progress=False, suppress_ids=suppress or None)
    exact = cols["exact"].cpu()
    ppl = perplexities(model, ppl_ids, cfg.ppl_batch_size)
    return {"mem": 100.0 * int(exact.sum()) / max(1, exact.numel()), "n_memorized": int(exact.sum()),
            "n_sequences": int(exact.numel()),
            "fractional": float(cols["fractional"].double().mean()),
            "fractional_tf": float(cols["fractional_tf"].double().mean()),
            "test/ppl_batchmean": ppl["ppl_batchmean"], "test/ppl_token": ppl["ppl_token"],
            "ppl_batch_size": cfg.ppl_batch_size, "n_ppl": int(ppl_ids.shape[0]),
            "suppressed_eos": suppress, "memorized_mask": exact}


def split_clean(clean: torch.Tensor, ppl_size: int = PAPER_SPLIT, retain_size: int = PAPER_SPLIT
                ) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """(perplexity rows, retain rows, note): the first ``ppl_size`` rows measure perplexity and the next
    ``retain_size`` rows are the retain set -- with the paper's 3,264 rows, its first and last 1,632 (SPEC
    4.4, 6.2). With fewer rows the retain set keeps its size and the perplexity set shrinks; with no more
    rows than ``retain_size`` both use all of them. ``note`` says how the retain set departs from the
    paper's (None when it is 1,632 rows apart from the perplexity rows)."""
    n = clean.shape[0]
    if n >= ppl_size + retain_size:
        ppl, retain = clean[:ppl_size], clean[ppl_size: ppl_size + retain_size]
        shared = False
    elif n > retain_size:
        ppl, retain = clean[: n - retain_size], clean[n - retain_size:]
        shared = False
        log.warning("%d clean sequences for %d perplexity + %d retain rows: perplexity is measured on %d",
                    n, ppl_size, retain_size, ppl.shape[0])
    else:
        ppl, retain = clean, clean
        shared = True
        log.warning("only %d clean sequences for a retain set of %d: perplexity is measured on the retain "
                    "rows", n, retain_size)
    notes = []
    if retain.shape[0] < PAPER_SPLIT:
        notes.append(f"retain set cut to {retain.shape[0]} clean rows (the paper's: {PAPER_SPLIT})")
    elif retain.shape[0] > PAPER_SPLIT:
        notes.append(f"retain set of {retain.shape[0]} clean rows (the paper's: {PAPER_SPLIT})")
    if shared:
        notes.append("the retain rows are also the perplexity rows")
    return ppl, retain, "; ".join(notes) or None


def memorized_matrix(seqs, cfg: PythiaConfig) -> torch.Tensor:
    """The candidate sequences as ``[N, L]``, ``L`` = ``seq_len`` or the shortest row if shorter; every row
    needs ``prefix_len + suffix_len`` tokens."""
    from ..eval.inputs import to_matrix

    need = cfg.prefix_len + cfg.suffix_len
    shortest = seqs.shape[1] if isinstance(seqs, torch.Tensor) else min((len(s) for s in seqs), default=0)
    return to_matrix(seqs, min(cfg.seq_len, max(shortest, need)))   # rows shorter than need: its error


def clean_matrix(seqs, seq_len: int, reshape: bool = False) -> torch.Tensor:
    """Clean rows as ``[N, L]``: each cut to ``seq_len`` tokens (or to the shortest row if shorter), or with
    ``reshape`` all rows laid end to end and cut into ``seq_len``-token rows, the rest dropped (the paper
    reshapes its 2,040 Pile rows of 128 tokens into 3,264 x 80)."""
    from ..eval.inputs import to_matrix
    from ..eval.scoring import ScoringInputError

    if reshape:
        flat = seqs.reshape(-1) if isinstance(seqs, torch.Tensor) else torch.tensor(
            [t for s in seqs for t in s], dtype=torch.long)
        n = flat.numel() // seq_len
        if n == 0:
            raise ScoringInputError(f"the clean sequences hold {flat.numel()} tokens, fewer than one row of "
                                    f"{seq_len}")
        return flat[: n * seq_len].view(n, seq_len).long()
    shortest = seqs.shape[1] if isinstance(seqs, torch.Tensor) else min((len(s) for s in seqs), default=0)
    if shortest < 2:
        raise ScoringInputError("clean sequences need at least 2 tokens each for a perplexity")
    return to_matrix(seqs, min(seq_len, shortest))


def _method_configs(methods: list[str], hparams: dict[str, dict], cfg: PythiaConfig) -> dict:
    from ..methods.registry import get_unlearning_method as get_method
    from ..methods.registry import make_config

    configs = {}
    for name in methods:
        m = get_method(name)
        over = dict(hparams.get(m.name, {}))
        fields = {f.name for f in dataclasses.fields(m.config_cls)}
        if (cfg.method_batch_size is not None and "batch_size" in fields and "batch_size" not in over
                and m.name not in NOT_ROW_BATCH):
            over["batch_size"] = cfg.method_batch_size
        configs[m.name] = (m, make_config(m, over))   # fail before loading anything
    return configs


def run_protocol(model_dir: str, memorized: torch.Tensor, clean: torch.Tensor, methods: list[str],
                 hparams: dict[str, dict], cfg: PythiaConfig, *, progress: bool = True) -> tuple[dict, list]:
    """Base statistics and one result row per method (each on a fresh load of the checkpoint).
    ``memorized`` rows are cut to ``seq_len`` tokens (the forget rows), ``clean`` rows too."""
    from .. import __version__
    from ..common.devices import device_name
    from ..eval.scoring import ScoringInputError
    from ..integrations.loading import load_causal_lm
    from ..methods import UnlearnInputs
    from ..tinymem.results import run_id, selection_score, utility

    need = cfg.prefix_len + cfg.suffix_len
    if memorized.shape[1] < need:
        raise ScoringInputError(f"memorized sequences have {memorized.shape[1]} tokens, fewer than prefix + "
                                f"suffix = {need}")
    if clean.shape[1] < 2:
        raise ScoringInputError("clean sequences need at least 2 tokens each for a perplexity")
    configs = _method_configs(methods, hparams, cfg)

    def load():
        return load_causal_lm(model_dir, cfg.dtype, device=cfg.device, device_map=cfg.device_map)

    model = load()
    vocab = model.get_input_embeddings().weight.shape[0]
    for what, t in (("memorized", memorized), ("clean", clean)):
        if int(t.max()) >= vocab or int(t.min()) < 0:
            raise ScoringInputError(f"{what} sequences hold token ids outside [0, {vocab}) of the model")
    memorized = memorized[:, : cfg.seq_len]
    if memorized.shape[1] < cfg.seq_len:
        log.warning("memorized sequences have %d tokens, fewer than seq_len %d: the forget rows are that "
                    "long", memorized.shape[1], cfg.seq_len)
    ppl_ids, retain, retain_note = split_clean(clean[:, : cfg.seq_len], cfg.ppl_size, cfg.retain_size)
    t0 = time.perf_counter()
    base = protocol_stats(model, memorized, ppl_ids, cfg)
    t_base = time.perf_counter() - t0
    forget = memorized[base["memorized_mask"]]
    settings = {"prefix_len": cfg.prefix_len, "suffix_len": cfg.suffix_len, "seq_len": cfg.seq_len,
                "forget_row_len": int(memorized.shape[1]), "suppress_eos": cfg.suppress_eos,
                "suppressed_eos": base["suppressed_eos"], "ppl_batch_size": cfg.ppl_batch_size,
                "n_ppl": int(ppl_ids.shape[0]), "n_retain": int(retain.shape[0]), "retain_note": retain_note,
                "method_batch_size": cfg.method_batch_size}
    base["settings"] = settings
    rows = []
    if forget.shape[0] == 0:
        log.warning("none of the %d sequences is memorized by %s: nothing to unlearn", memorized.shape[0],
                    model_dir)
        return _public(base), rows
    dev = _first_device(model)
    inputs = UnlearnInputs(forget.to(dev), torch.zeros_like(forget, dtype=torch.bool, device=dev),
                           retain.to(dev), torch.zeros_like(retain, dtype=torch.bool, device=dev),
                           torch.full((forget.shape[0],), cfg.prefix_len))
    for i, (name, (m, mcfg)) in enumerate(configs.items()):
        if i:
            model = load()
        if hasattr(mcfg, "seed"):
            mcfg.seed = cfg.seed
        if hasattr(mcfg, "progress"):
            mcfg.progress = progress
        t1 = time.perf_counter()
        info = m.run(model, inputs, mcfg)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t_method = time.perf_counter() - t1
        t2 = time.perf_counter()
        after = protocol_stats(model, memorized, ppl_ids, cfg)
        t_eval = time.perf_counter() - t2
        hp = {k: v for k, v in dataclasses.asdict(mcfg).items() if k != "progress"}
        rows.append({
            "run_id": run_id(os.path.abspath(model_dir), name, mcfg, cfg.seed),
            "model": os.path.abspath(model_dir),
            "method": name, "category": m.category, "seed": cfg.seed, "hparams": hp, "grid_point": hp,
            "protocol": "pythia", "dtype": cfg.dtype, "n_forget": int(forget.shape[0]),
            "n_retain": int(retain.shape[0]), "retain_note": retain_note, "mem_metric": "mem",
            "suppress_eos": cfg.suppress_eos, "suppressed_eos": base["suppressed_eos"],
            "mem_before": base["mem"], "mem_after": after["mem"],
            "fractional_before": base["fractional"], "fractional_after": after["fractional"],
            "utility_before": utility(base, "language"), "utility_after": utility(after, "language"),
            **selection_score(base, after, "language", "mem", cfg.utility_metric),
            "selection": {"utility_metric": cfg.utility_metric, "mem_metric": "mem"},
            "time_method_s": t_method, "time_edit_s": info.get("time_edit_s", t_method),
            "time_eval_s": t_base + t_eval, "method_info": info, "device": device_name(model),
            "versions": {"tinymem_fast": __version__, "torch": torch.__version__},
            "settings": settings, "base": _public(base), "after": _public(after),
        })
        del model
    return _public(base), rows


def _public(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k != "memorized_mask"}
