"""Quick presets end to end (`tinymem train`), timed, with the paper's qualitative facts checked.

Rows: one per training run, wall time as the figure and the final metrics as the note. The facts:
more layers memorize more; more duplication memorizes more (the two duplication groups of the quick
math preset, x1 and x10); backdoors are learned within the first evaluations while noise memorization
grows slowly.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from bench.harness import HERE, Row
from tinymem_fast.tinymem.data.dataset import build
from tinymem_fast.tinymem.presets import RunConfig, apply_overrides, get_preset
from tinymem_fast.tinymem.training import build_model_for, train

CACHE = os.path.join(HERE, ".cache", "tinymem_quick")

RUNS = [
    ("quick-math-noise", []),
    ("quick-math-noise", ["model.n_layer=2"]),
    ("quick-math-noise", ["model.n_layer=8"]),
    ("quick-math-backdoor", []),
    ("quick-language-noise", []),
]

# the layers fact at a longer budget: at 900 steps the deeper models are still catching up, and one
# evaluation of 39 eligible rows moves by +-8 points, so the fact is read from the mean of the last 3
LAYER_STEPS = 1800
LAYER_RUNS = [("quick-math-noise", [f"model.n_layer={n}", f"train.max_steps={LAYER_STEPS}"])
              for n in (2, 4, 8)]

# ... and in a many-epochs regime closer to the paper's (which trains to convergence, 3,500 epochs): a
# smaller clean set (1,000 + 4 x 300 rows) seen 150 times, 400 noised rows all at x1, bf16 training
EPOCH_LAYER_SETS = ["data.num_main=1000", "data.num_extra=300", "data.dup_groups=0", "data.num_noise=400",
                    "train.epochs=150", "train.max_steps=none", "train.eval_every=250",
                    "train.ckpt_every=1000", "train.precision=bf16"]
EPOCH_LAYER_RUNS = [("quick-math-noise", [f"model.n_layer={n}", *EPOCH_LAYER_SETS]) for n in (2, 4, 8)]

# ... and on the language preset at its own budget (the seed-0 4-layer run is RUNS' own), three seeds
def _language_sets(n: int, seed: int) -> list[str]:
    return ([f"model.n_layer={n}"] if n != 4 else []) + ([f"seed={seed}"] if seed else [])


LANGUAGE_LAYER_RUNS = {seed: [("quick-language-noise", _language_sets(n, seed)) for n in (2, 4, 8)]
                       for seed in (0, 1, 2)}


def config_key(cfg) -> str:
    """Hash of the settings that differ from a default RunConfig: a new setting added to the library
    with a default that changes nothing does not invalidate the cached runs."""
    default = RunConfig().to_dict()

    def diff(a, b):
        if isinstance(a, dict) and isinstance(b, dict):
            return {k: d for k, v in a.items() if (d := diff(v, b.get(k, _MISSING))) is not _MISSING}
        return _MISSING if a == b else a

    blob = json.dumps(diff(cfg.to_dict(), default), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_MISSING = object()


def trained_run(preset: str, sets: list[str]) -> str:
    """Folder of a finished run of this exact configuration (keyed by a hash of the full config),
    training it first if needed; ``wall.json`` there records the wall time the training took."""
    cfg = apply_overrides(get_preset(preset), sets)
    key = config_key(cfg)
    out = os.path.join(CACHE, key)
    done = os.path.join(out, "wall.json")
    if not os.path.exists(done):
        t0 = time.perf_counter()
        data = build(cfg.data, seed=cfg.seed, workdir=out)
        model = build_model_for(data, cfg.model, seed=cfg.seed)
        train(model, data, cfg.train, out, seed=cfg.seed, resume=False, progress=False)
        with open(done, "w") as f:
            json.dump({"wall_s": time.perf_counter() - t0, "preset": preset, "sets": sets}, f)
    return out


def _train(preset: str, sets: list[str]) -> tuple[float, list[dict]]:
    out = trained_run(preset, sets)
    with open(os.path.join(out, "wall.json")) as f:
        wall = json.load(f)["wall_s"]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        hist = [json.loads(line) for line in f]
    return wall, hist


def _note(h: dict) -> str:
    parts = []
    for k in ("mem", "mem_g0", "mem_g1", "asr", "avg_acc", "acc7/acc", "test/acc", "test/ppl_token"):
        if k in h:
            parts.append(f"{k} {h[k]:.3g}")
    return ", ".join(parts)


def _at(hist: list[dict], step: int, key: str) -> float:
    return next(h[key] for h in hist if h["step"] == step)


def _mean_last(runs, n: int = 3) -> str:
    means = []
    for preset, sets in runs:
        _, hist = _train(preset, sets)
        last = [h["mem"] for h in hist if "mem" in h][-n:]
        means.append(sum(last) / len(last))
    return " / ".join(f"{m:.1f}" for m in means)


def _layer_fact() -> list[tuple[str, str]]:
    """BENCH_LAYERS=1: the longer budget (about 25 minutes of training on 2 cores); BENCH_LAYERS=epochs:
    the many-epochs regime (about 20 minutes); BENCH_LAYERS=language: the language preset at 2 / 4 / 8
    layers (about 8 minutes); a comma-separated list runs several."""
    modes = set(os.environ.get("BENCH_LAYERS", "").split(","))
    # no wall times here: these runs are long enough that they are usually trained beside other work
    facts = []
    if "1" in modes:
        facts.append((f"layers at {LAYER_STEPS} steps: mem % at 2 / 4 / 8 layers (mean of the last 3 "
                      "evaluations)", _mean_last(LAYER_RUNS)))
    if "epochs" in modes:
        facts.append(("layers after 150 epochs of a 1,200-row set (400 noised at x1, bf16): mem % at 2 / 4 / "
                      "8 layers (mean of the last 3 evaluations)", _mean_last(EPOCH_LAYER_RUNS)))
    if "language" in modes:
        # evaluations at 200 / 400 / 600 steps, the first of them before any memorization
        for seed, runs in LANGUAGE_LAYER_RUNS.items():
            facts.append((f"language layers at 600 steps, seed {seed}: mem % at 2 / 4 / 8 layers (mean of "
                          "the evaluations at 400 and 600 steps)", _mean_last(runs, 2)))
    return facts


def run(device: str = "cpu", repeats: int = 1) -> list[Row]:
    rows = []
    curves = {}
    for preset, sets in RUNS:
        wall, hist = _train(preset, sets)
        name = preset + (" " + " ".join(sets) if sets else "")
        curves[name] = hist
        rows.append(Row("tinymem_quick", name, "tinymem train (wall s x1000)", wall * 1e3, wall * 1e3,
                        wall * 1e3, note=_note(hist[-1])))
    noise = curves["quick-math-noise"]
    bd = curves["quick-math-backdoor"]
    facts = [
        ("layers: mem % at 2 / 4 / 8 layers",
         " / ".join(f"{curves[n][-1]['mem']:.1f}" for n in (
             "quick-math-noise model.n_layer=2", "quick-math-noise", "quick-math-noise model.n_layer=8"))),
        *_layer_fact(),
        ("duplication: mem % of x1 / x10 group", f"{noise[-1]['mem_g0']:.1f} / {noise[-1]['mem_g1']:.1f}"),
        ("speed: backdoor ASR vs noise mem at step 300 / 500",
         f"{_at(bd, 300, 'asr'):.1f} vs {_at(noise, 300, 'mem'):.1f} / "
         f"{_at(bd, 500, 'asr'):.1f} vs {_at(noise, 500, 'mem'):.1f}"),
        ("noise mem % over evaluations", " -> ".join(f"{h['mem']:.1f}" for h in noise)),
        ("backdoor ASR over evaluations", " -> ".join(f"{h['asr']:.1f}" for h in bd)),
    ]
    for case, note in facts:
        rows.append(Row("tinymem_quick", case, "fact", 0.0, 0.0, 0.0, note=note))
    return rows
