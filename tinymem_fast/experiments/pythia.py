"""The Pythia protocol (SPEC.md 4.4 and 6.1) as one call: a local Hugging Face checkpoint, a file of
memorized sequences (prefix 32 + exact 40-token continuation by default) and a file of clean sequences
(perplexity and retain set) -> base statistics and one result row per method.

* % memorized: share of the given sequences whose suffix greedy decoding reproduces exactly from the
  prefix (one teacher-forced pass, :func:`tinymem_fast.eval.scoring.score_exact`).
* perplexity: token-level, over the clean sequences not used as the retain set.
* forget set: the given sequences memorized now; retain set: the last ``retain_size`` clean sequences
  (the paper: the last 1,632 random Pile sequences).
* each method runs on a freshly loaded copy of the model, in the requested dtype (fp16/bf16 for large
  checkpoints) and with ``device_map`` sharding when the model does not fit one GPU.

Rows follow the unlearning pipeline's schema (language variant of the selection score).
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


@dataclass
class PythiaConfig:
    prefix_len: int = 32
    suffix_len: int = 40
    dtype: str = "float32"
    device: str | None = None
    device_map: str | None = None     # e.g. "auto" (needs accelerate)
    retain_size: int = 1632
    batch_size: int = 32
    seed: int = 0


def _first_device(model) -> torch.device:
    emb = model.get_input_embeddings()
    return emb.weight.device


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch_size: int = 32, progress: bool = False) -> float:
    """Token-level perplexity: exp(total NLL / total predicted tokens), CE in float32."""
    dev = _first_device(model)
    total, count = 0.0, 0
    for i in tqdm(range(0, ids.shape[0], batch_size), desc="perplexity", disable=not progress):
        x = ids[i: i + batch_size].to(dev)
        logits = model(x).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1).to(
            logits.device), reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
    return math.exp(total / count)


def protocol_stats(model, memorized: torch.Tensor, ppl_ids: torch.Tensor, cfg: PythiaConfig) -> dict:
    from ..eval.scoring import score_exact

    res = score_exact(model, memorized, cfg.prefix_len, cfg.suffix_len, batch_size=cfg.batch_size)
    exact = res.exact.cpu()
    frac = (res.matched.float() / cfg.suffix_len).cpu()
    ppl = perplexity(model, ppl_ids, cfg.batch_size)
    return {"mem": 100.0 * float(exact.float().mean()), "n_memorized": int(exact.sum()),
            "n_sequences": int(exact.numel()), "fractional": float(frac.mean()),
            "test/ppl_token": ppl, "test/ppl_batchmean": ppl, "memorized_mask": exact}


def split_clean(clean: torch.Tensor, retain_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perplexity rows, retain rows): the last ``retain_size`` rows retain; the rest measure perplexity.
    With too few rows, both use all of them (and a warning says so)."""
    if clean.shape[0] > retain_size:
        return clean[:-retain_size], clean[-retain_size:]
    log.warning("only %d clean sequences for a retain set of %d: perplexity is measured on the retain rows",
                clean.shape[0], retain_size)
    return clean, clean


def run_protocol(model_dir: str, memorized: torch.Tensor, clean: torch.Tensor, methods: list[str],
                 hparams: dict[str, dict], cfg: PythiaConfig, *, progress: bool = True) -> tuple[dict, list]:
    """Base statistics and one result row per method (each on a fresh load of the checkpoint)."""
    from .. import __version__
    from ..common.devices import device_name
    from ..eval.scoring import ScoringInputError
    from ..integrations.loading import load_causal_lm
    from ..methods import UnlearnInputs
    from ..methods.registry import get_unlearning_method as get_method
    from ..methods.registry import make_config
    from ..tinymem.results import run_id, selection_score, utility

    need = cfg.prefix_len + cfg.suffix_len
    if memorized.shape[1] < need:
        raise ScoringInputError(f"memorized sequences have {memorized.shape[1]} tokens, fewer than prefix + "
                                f"suffix = {need}")
    configs = {}
    for name in methods:
        m = get_method(name)
        configs[m.name] = (m, make_config(m, hparams.get(m.name, {})))   # fail before loading anything

    def load():
        return load_causal_lm(model_dir, cfg.dtype, device=cfg.device, device_map=cfg.device_map)

    model = load()
    vocab = model.get_input_embeddings().weight.shape[0]
    for what, t in (("memorized", memorized), ("clean", clean)):
        if int(t.max()) >= vocab or int(t.min()) < 0:
            raise ScoringInputError(f"{what} sequences hold token ids outside [0, {vocab}) of the model")
    ppl_ids, retain = split_clean(clean, cfg.retain_size)
    memorized = memorized[:, :need]
    t0 = time.perf_counter()
    base = protocol_stats(model, memorized, ppl_ids, cfg)
    t_base = time.perf_counter() - t0
    forget = memorized[base["memorized_mask"]]
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
            "n_retain": int(retain.shape[0]), "mem_metric": "mem",
            "mem_before": base["mem"], "mem_after": after["mem"],
            "utility_before": utility(base, "language"), "utility_after": utility(after, "language"),
            **selection_score(base, after, "language", "mem"),
            "time_method_s": t_method, "time_edit_s": info.get("time_edit_s", t_method),
            "time_eval_s": t_base + t_eval, "method_info": info, "device": device_name(model),
            "versions": {"tinymem_fast": __version__, "torch": torch.__version__},
            "base": _public(base), "after": _public(after),
        })
        del model
    return _public(base), rows


def _public(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k != "memorized_mask"}
