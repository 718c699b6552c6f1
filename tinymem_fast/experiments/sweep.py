"""Sweeps: methods x hyperparameter grid x seeds over one or more trained runs, resumable and shardable.

Every run is keyed by a hash of (model, method, full method settings, seed) and writes exactly one file,
``OUT/rows/<key>.json``, atomically (temporary file + rename) when it finishes; a restarted sweep skips
the keys that have a file, so nothing finished is redone and nothing half-written is ever read. Shards
(``--shard i/n``, or ``RANK``/``WORLD_SIZE`` under ``torchrun``) take every n-th run of the same ordered
plan and write into the same folder without coordination.

Method families:

* unlearning (the 11 registered methods): on a fresh copy of the run's final model, or of each checkpoint
  ``checkpoints`` names (the paper unlearns at four checkpoints of a run); the base evaluation and forget
  set are computed once per model and process;
* regularizers (``spectral_norm``, ``loss_truncation``, ``example_tied_dropout``): a full training run of
  the same preset with the regularizer (``OUT/runs/<key>``, itself resumable), compared with the given
  unregularized run;
* fine-tuning (``clean_ft``, ``extra_ft``, ``both_ft``): from the run's newest (or each named) checkpoint
  and its AdamW state.

Retain size and selection variants follow each run's ``protocol`` section (run.json) unless the sweep
overrides them; every row records them (``retain_size``, ``n_retain``, ``selection``) and its checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field

from ..common import atomic
from .grids import get_grid

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TRAINING_KINDS = ("regularizer", "fine-tuning")  # they train; every setting has a default, no grid needed


def all_methods() -> list[str]:
    """The 17 methods, unlearning first (the registry knows them all)."""
    from ..methods.registry import method_names

    return method_names() + method_names(TRAINING_KINDS)


def canonical(name: str) -> str:
    """The canonical name of any of the 17 methods (reference names accepted)."""
    from ..methods import get_method

    try:
        return get_method(name.strip()).name
    except ValueError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(all_methods())} "
                         "or `all`") from None


def _kind(method: str) -> str:
    from ..methods import get_method

    return get_method(method).category


@dataclass(frozen=True)
class RunSpec:
    model: str          # a `tinymem train` run folder (absolute)
    method: str
    hparams: tuple      # sorted (name, value) pairs of the full settings
    seed: int
    key: str = field(compare=False)
    checkpoint: str = "final"   # "final" or a checkpoints/step-* folder name of the run
    model_path: str = ""        # the weights the run starts from (absolute)
    precision: str = "run"      # training kinds: "run" (the run's train.precision), fp32 or bf16

    @property
    def hp(self) -> dict:
        return dict(self.hparams)


def _full_settings(method: str, point: dict) -> dict:
    """Every setting of the method (defaults filled in), validated, as a plain dict."""
    from ..methods import get_method
    from ..methods.registry import make_config

    cfg = make_config(get_method(method), point)
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("progress", "seed")}


def load_grid(grid: str) -> dict[str, list[dict]]:
    """A named grid (``quick``/``paper``) or a YAML/JSON file mapping method -> list of settings, or
    method -> {setting: [values]} (expanded as a product)."""
    if os.path.exists(grid):
        from ..tinymem.presets import read_tree
        from .grids import expand

        raw = read_tree(grid, "grid file")
        if not isinstance(raw, dict):
            raise ValueError(f"grid file {grid!r} must map method names to settings")
        out = {}
        for k, v in raw.items():
            if v is None:
                v = {}
            if isinstance(v, list) and all(isinstance(p, dict) for p in v):
                out[k] = v
            elif isinstance(v, dict):
                out[k] = expand({a: (b if isinstance(b, list) else [b]) for a, b in v.items()})
            else:
                raise ValueError(f"grid file {grid!r}: {k!r} must map to settings ({{ratio: [0.01, 0.05]}}) "
                                 f"or a list of setting mappings, got {v!r}")
        return out
    return get_grid(grid)


def _targets(models: list[str], checkpoints: str) -> list:
    """(run folder, Checkpoint) pairs: each run folder expanded by ``checkpoints``; a checkpoint folder of a
    run stands for itself."""
    from .runs import locate, run_checkpoints

    out = []
    for model in models:
        if not os.path.isdir(model):
            raise ValueError(f"{model!r} is not a `tinymem train` run folder (no run.json): it does not "
                             "exist")
        if os.path.isfile(os.path.join(model, "run.json")):
            run_dir = os.path.abspath(model)
            out += [(run_dir, c) for c in run_checkpoints(run_dir, checkpoints)]
            continue
        ck = locate(model)
        if ck.run_dir is None:
            raise ValueError(f"{model!r} is not a `tinymem train` run folder or one of its checkpoints "
                             "(no run.json beside it)")
        out.append((ck.run_dir, ck))
    return list(dict.fromkeys(out))


def _has_precision(method: str) -> bool:
    from ..methods import get_method

    return any(f.name == "precision" for f in dataclasses.fields(get_method(method).config_cls))


def plan(models: list[str], methods: list[str] | str, grid: str | dict, seeds: list[int],
         checkpoints: str = "final", precision: str = "run") -> list[RunSpec]:
    """The ordered list of runs. Unknown methods or settings fail here, before any work.

    ``checkpoints``: which models of each run folder (``final``, ``all``, ``500,1500,final``); regularizers
    train a run of their own and are planned once per run, under ``final``. ``precision``: ``run`` (each
    method's own setting; training kinds the run's ``train.precision``), or ``fp32`` / ``bf16`` / ``auto``
    (bf16 where this machine runs it natively) for every method that computes gradients or trains -- part
    of each run's key, so fp32 and bf16 rows of one sweep folder never overwrite each other."""
    from ..integrations.mixed_precision import resolve_precision

    prec = precision if precision == "run" else resolve_precision(precision)
    g = load_grid(grid) if isinstance(grid, str) else grid
    names = all_methods() if methods == "all" or methods == ["all"] else [canonical(m) for m in methods]
    grid_names = {canonical(k): v for k, v in g.items()}
    runs = []
    for m in names:
        if m not in grid_names and _kind(m) not in TRAINING_KINDS:
            raise ValueError(f"the grid has no entry for {m}; grid methods: {', '.join(sorted(grid_names))}")
    targets = _targets(models, checkpoints)
    trained_once = set()
    for run_dir, ck in targets:
        for m in names:
            training = _kind(m) == "regularizer"
            if training and run_dir in trained_once:
                continue
            trains = _kind(m) in TRAINING_KINDS
            for point in grid_names.get(m, [{}]):
                if prec != "run" and not trains and _has_precision(m) and "precision" not in point:
                    point = {**point, "precision": prec}
                full = _full_settings(m, point)
                for seed in seeds:
                    desc = {"model": run_dir, "method": m, "hp": full, "seed": seed}
                    label = "final" if training else ck.label
                    if label != "final":  # keys of final-model runs stay those of earlier sweeps
                        desc["checkpoint"] = label
                    if trains and prec != "run":
                        desc["precision"] = prec
                    blob = json.dumps(desc, sort_keys=True, default=str)
                    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
                    runs.append(RunSpec(run_dir, m, tuple(sorted(full.items())), seed, key, label, ck.path,
                                        prec if trains else "run"))
        trained_once.add(run_dir)
    if not runs:
        raise ValueError("the sweep expands to zero runs (no models, methods, grid points or seeds)")
    return runs


def parse_shard(shard: str | None) -> tuple[int, int]:
    if shard:
        try:
            i, n = (int(x) for x in shard.split("/"))
        except ValueError:
            raise ValueError(f"--shard expects i/n (e.g. 0/4), got {shard!r}") from None
        if not 0 <= i < n:
            raise ValueError(f"--shard {shard}: need 0 <= i < n")
        return i, n
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


def _write_atomic(path: str, obj) -> None:
    atomic.write_json(path, obj, indent=None, fsync=True)


def check_schema(out: str) -> None:
    meta = os.path.join(out, "sweep.json")
    if os.path.exists(meta):
        with open(meta) as f:
            v = json.load(f).get("schema")
        if v != SCHEMA_VERSION:
            raise ValueError(f"{out!r} holds results of schema version {v}, this tinymem_fast writes version "
                             f"{SCHEMA_VERSION}; use a new --out folder")


KEEP = "run"  # a sweep setting left to each run's protocol section


class _ModelCache:
    """Per trained run: its config and data; per model (final or checkpoint): its base evaluation and
    forget set (computed once per process)."""

    def __init__(self, device: str, retain_size, utility_metric: str | None, mem_metric: str | None):
        self.device, self.retain_size = device, retain_size
        self.utility_metric, self.mem_metric = utility_metric, mem_metric
        self.runs, self.models = {}, {}

    def run(self, run_dir: str):
        if run_dir not in self.runs:
            from ..tinymem.results import check_selection
            from .runs import run_config, run_data

            cfg = run_config(run_dir)
            data = run_data(run_dir, cfg, "its run.json")
            p = cfg.protocol
            proto = {"retain_size": p.retain_size if self.retain_size == KEEP else self.retain_size,
                     "utility_metric": self.utility_metric or p.utility_metric,
                     "mem_metric": self.mem_metric or p.mem_metric}
            check_selection(cfg.data.kind, proto["utility_metric"], proto["mem_metric"])
            self.runs[run_dir] = (cfg, data, proto)
        return self.runs[run_dir]

    def get(self, run_dir: str, model_path: str):
        cfg, data, proto = self.run(run_dir)
        if model_path not in self.models:
            from ..tinymem.models import load_model
            from .unlearning import check_model_fits_data, forget_set, stats

            model = load_model(model_path, device=self.device)
            check_model_fits_data(model, data, model_path)
            self.models[model_path] = (stats(model, data), forget_set(model, data))
        return (cfg, data, proto, *self.models[model_path])


def execute(spec: RunSpec, out: str, cache: _ModelCache, progress: bool = False) -> dict:
    from ..methods import get_method
    from ..methods.registry import make_config
    from ..tinymem.models import load_model
    from ..tinymem.results import rescore
    from .unlearning import unlearn

    m = get_method(spec.method)
    model_path = spec.model_path or os.path.join(spec.model, "final")
    if m.category in TRAINING_KINDS:  # a training run of its own beside the trained one
        _, _, proto = cache.run(spec.model)
        src = spec.model if spec.checkpoint == "final" else model_path
        extra = {} if spec.precision == "run" else {"precision": spec.precision}
        row = m.run(src, make_config(m, spec.hp), os.path.join(out, "runs", spec.key),
                    device=cache.device, seed=spec.seed, progress=progress, **extra)
        row = rescore(row, proto["utility_metric"], proto["mem_metric"])
        row["checkpoint"] = spec.checkpoint
        row["precision"] = cache.run(spec.model)[0].train.precision if spec.precision == "run" \
            else spec.precision
        return row
    cfg, data, proto, base, forget = cache.get(spec.model, model_path)
    model = load_model(model_path, device=cache.device)
    return unlearn(model, data, spec.method, {**spec.hp, "progress": progress}, seed=spec.seed,
                   model_tag=spec.model, base=base, forget=forget, retain_size=proto["retain_size"],
                   utility_metric=proto["utility_metric"], mem_metric=proto["mem_metric"],
                   checkpoint=spec.checkpoint)


def run_sweep(runs: list[RunSpec], out: str, *, shard: tuple[int, int] = (0, 1), device: str = "cpu",
              retain_size: int | None | str = KEEP, utility_metric: str | None = None,
              mem_metric: str | None = None, progress: bool = True) -> dict:
    """Run this shard's share of ``runs``; returns a summary (counts, wall time, bookkeeping share).

    ``retain_size`` (None: every clean row), ``utility_metric`` and ``mem_metric`` override each run's
    ``protocol`` section; ``"run"`` / None keep it."""
    from tqdm.auto import tqdm

    from .unlearning import NothingMemorized

    t_start = time.perf_counter()
    os.makedirs(os.path.join(out, "rows"), exist_ok=True)
    check_schema(out)
    i, n = shard
    if i == 0:
        _write_atomic(os.path.join(out, "sweep.json"), {"schema": SCHEMA_VERSION, "n_runs": len(runs)})
    mine = runs[i::n]
    todo = [r for r in mine if not os.path.exists(os.path.join(out, "rows", f"{r.key}.json"))]
    cache = _ModelCache(device, retain_size, utility_metric, mem_metric)
    in_runs = 0.0
    done = nothing = 0
    bar = tqdm(todo, desc=f"sweep shard {i}/{n}", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(f"{spec.method} {spec.hp.get('ratio', '')}")
        t0 = time.perf_counter()
        try:
            row = execute(spec, out, cache)
        except NothingMemorized as exc:
            # an early checkpoint of the several-checkpoint protocol may not have memorized anything yet
            if spec.checkpoint == "final":
                raise
            log.warning("%s @ %s: %s; no row", spec.model, spec.checkpoint, exc)
            nothing += 1
            continue
        finally:
            in_runs += time.perf_counter() - t0
        row.update(sweep_key=spec.key, schema=SCHEMA_VERSION, grid_point=spec.hp, model_dir=spec.model,
                   checkpoint=spec.checkpoint)
        _write_atomic(os.path.join(out, "rows", f"{spec.key}.json"), row)
        done += 1
    wall = time.perf_counter() - t_start
    summary = {"shard": f"{i}/{n}", "planned": len(mine), "skipped": len(mine) - len(todo), "ran": done,
               "nothing_memorized": nothing,
               "wall_s": wall, "in_runs_s": in_runs,
               "bookkeeping_s": wall - in_runs, "bookkeeping_frac": (wall - in_runs) / wall if wall else 0.0}
    _write_atomic(os.path.join(out, f"summary-shard{i}of{n}.json"), summary)
    return summary


def _parse_row(raw: bytes, where: str) -> dict:
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{where}: a result row that is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: a broken result row ({exc.msg} at character {exc.pos}); remove it (a "
                         "sweep redoes missing rows) or restore it") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a result row must be a JSON object, got {type(row).__name__}")
    return row


def load_rows(out: str) -> list[dict]:
    """Every finished row of a sweep folder (or a results.jsonl file), schema-checked."""
    rows = []
    if os.path.isfile(out):
        with open(out, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if raw.strip():
                    rows.append(_parse_row(raw, f"{out}:{lineno}"))
    else:
        check_schema(out)
        d = os.path.join(out, "rows")
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{out!r} has no rows/ folder: not a sweep output")
        for name in sorted(os.listdir(d)):
            if name.endswith(".json") and not name.startswith(".tmp"):
                path = os.path.join(d, name)
                with open(path, "rb") as f:
                    rows.append(_parse_row(f.read(), path))
    for r in rows:
        if r.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise ValueError(f"a row has schema version {r.get('schema')}, expected {SCHEMA_VERSION}")
    return rows
