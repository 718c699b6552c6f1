"""Named, documented run configurations: the paper's (for GPUs) and quick ones (minutes on a 2-core CPU).

A run config bundles data, model, training and regularizer settings plus the seed. Any field can be
overridden with ``key=value`` strings (``data.num_noise=200``, ``train.epochs=3``, ``model.n_layer=2``,
``regularizer.name=spectral_norm``, ``regularizer.spectral_norm.spectral_lambda=0.02``, ``seed=1``) or a
JSON/YAML file of the same nested shape.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field

from ..common.optional import require
from ..common.validation import like_default, parse_like
from .data.dataset import DataConfig
from .models import ModelConfig
from .regularizers import MOVED, RegularizerConfig, upgrade_tree
from .results import ProtocolConfig
from .training import TrainConfig


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    seed: int = 0
    description: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The paper presets reproduce the paper's choices where ours differ: pads in the loss, windows that run
# on into EOS and padding (its math rows are shorter than prompt 50 + window 50), and, for unlearning,
# SPEC 6.2's retain sets and the paper's utility variants and group-mean memorization in the selection.
def _paper_math(artifact: str) -> RunConfig:
    # 3,500 epochs (noise) / 500 (backdoor), checkpoints every 50 epochs
    epochs = 3500 if artifact == "noise" else 500
    return RunConfig(
        data=DataConfig(kind="math", artifact=artifact, family="increment", window_rule="padded"),
        model=ModelConfig(n_layer=4),
        train=TrainConfig(batch_size=128, epochs=epochs, eval_every_epochs=50, ckpt_every_epochs=50,
                          loss_on_pad=True),
        protocol=ProtocolConfig(retain_size=None, utility_metric="acc_paper", mem_metric="avg_perc_mem"),
        description=f"paper: math + {artifact}, 4 layers, num_extra 3000, {epochs} epochs (GPU)",
    )


def _paper_language(artifact: str) -> RunConfig:
    epochs = 100 if artifact == "noise" else 50
    return RunConfig(
        data=DataConfig(kind="language", artifact=artifact, dup_groups=4 if artifact == "noise" else 0,
                        num_noise=1000, bpe_vocab_size=50257, window_rule="padded"),
        model=ModelConfig(n_layer=4),
        train=TrainConfig(batch_size=128, epochs=epochs, eval_every_epochs=10, ckpt_every_epochs=10,
                          eval_batch_size=64, loss_on_pad=True),
        protocol=ProtocolConfig(retain_size=100_000, utility_metric="ppl_batchmean",
                                mem_metric="avg_perc_mem"),
        description=f"paper: language + {artifact}, 4 layers, {epochs} epochs; pass data.tokenizer=DIR "
                    "(GPT-2 BPE) and a WikiText-103 source to match the paper exactly (GPU)",
    )


# Quick presets: same rules and metric definitions, smaller everything. Measured figures: README.
def _quick_math(artifact: str) -> RunConfig:
    noise = artifact == "noise"
    return RunConfig(
        data=DataConfig(kind="math", artifact=artifact, family="increment", num_main=3000, num_extra=600,
                        num_test=200, seq_numbers=14, max_ctx=72, prompt_len=20, mem_len=20,
                        num_noise=100, dup_groups=2 if noise else 0, dup_base=10,
                        backdoor_dup=1 if noise else 3),
        model=ModelConfig(n_layer=4),
        train=TrainConfig(batch_size=64, epochs=100, max_steps=900 if noise else 600, eval_every=100,
                          ckpt_every=100, eval_batch_size=256),
        description=f"quick: math + {artifact}, 4 layers, minutes on a 2-core CPU",
    )


def _quick_language() -> RunConfig:
    return RunConfig(
        data=DataConfig(kind="language", artifact="noise", max_ctx=64, prompt_len=16, mem_len=16,
                        num_noise=100, dup_groups=2, dup_base=10, bpe_vocab_size=2048,
                        max_train_chunks=3000, max_test_chunks=300),
        model=ModelConfig(n_layer=4),
        train=TrainConfig(batch_size=64, epochs=100, max_steps=600, eval_every=200, ckpt_every=200,
                          eval_batch_size=128),
        description="quick: language (bundled KJV corpus, 2,048-token BPE) + noise, 4 layers",
    )


PRESETS = {
    "paper-math-noise": lambda: _paper_math("noise"),
    "paper-math-backdoor": lambda: _paper_math("backdoor"),
    "paper-language-noise": lambda: _paper_language("noise"),
    "paper-language-backdoor": lambda: _paper_language("backdoor"),
    "quick-math-noise": lambda: _quick_math("noise"),
    "quick-math-backdoor": lambda: _quick_math("backdoor"),
    "quick-language-noise": _quick_language,
}
ALIASES = {"quick": "quick-math-noise", "paper": "paper-math-noise"}


def get_preset(name: str) -> RunConfig:
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        names = sorted(PRESETS) + sorted(ALIASES)
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(names)}")
    return PRESETS[key]()


def _names(obj) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(obj))


def _set_field(obj, dotted: str, value) -> None:
    dotted = MOVED.get(dotted, dotted)
    parts = dotted.split(".")
    target = obj
    for i, p in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(target) or p not in _names(target):
            where = ".".join(parts[:i]) or "the run"
            kinds = [n for n in _names(target) if dataclasses.is_dataclass(getattr(target, n))] \
                if dataclasses.is_dataclass(target) else []
            raise KeyError(f"unknown setting {dotted!r}: {where} has no section {p!r}"
                           + (f" (sections: {', '.join(kinds)})" if kinds else ""))
        target = getattr(target, p)
    name = parts[-1]
    if not dataclasses.is_dataclass(target) or name not in _names(target):
        valid = _names(target) if dataclasses.is_dataclass(target) else []
        where = ".".join(parts[:-1]) or "run"
        raise KeyError(f"unknown setting {dotted!r}; valid {where} settings: {', '.join(valid)}")
    cur = getattr(target, name)
    if dataclasses.is_dataclass(cur):
        raise KeyError(f"{dotted!r} is a section, not a setting: set its keys, e.g. {dotted}."
                       f"{_names(cur)[0]}=VALUE")
    annotation = next(f.type for f in dataclasses.fields(target) if f.name == name)
    setattr(target, name, like_default(dotted, value, cur, parse=parse_like, annotation=annotation))


def read_tree(path: str, what: str):
    """A JSON or YAML file's contents; a parse error names the file and, where known, the line."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith((".yaml", ".yml")):
                yaml = require("yaml", f"the YAML {what} {path!r}")
                try:
                    return yaml.safe_load(f) or {}
                except yaml.YAMLError as exc:
                    mark = getattr(exc, "problem_mark", None)
                    at = f" at line {mark.line + 1}" if mark is not None else ""
                    raise ValueError(f"{what} {path!r} is not valid YAML{at}: "
                                     f"{getattr(exc, 'problem', None) or exc}") from None
            try:
                return json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{what} {path!r} is not valid JSON (line {exc.lineno}: {exc.msg})") \
                    from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path!r} is not UTF-8 text") from None


def _apply_tree(cfg: RunConfig, tree: dict, where: str) -> None:
    """Set every leaf of a nested mapping (a config file, a run.json's config), typed by the defaults."""

    def walk(prefix: str, node):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                walk(key, v)
            else:
                _set_field(cfg, key, v)

    try:
        walk("", upgrade_tree(tree))
    except KeyError as exc:
        raise ValueError(f"{where}: {exc.args[0]}") from None


def from_dict(tree: dict, where: str = "a run's config") -> RunConfig:
    """The RunConfig a ``run.json`` records (its ``config``), checked like a config file."""
    cfg = RunConfig()
    _apply_tree(cfg, tree, where)
    return apply_overrides(cfg)


def apply_overrides(cfg: RunConfig, sets: list[str] | None = None, file: str | None = None) -> RunConfig:
    cfg = copy.deepcopy(cfg)
    if file:
        if not os.path.exists(file):
            raise FileNotFoundError(f"config file {file!r} does not exist")
        tree = read_tree(file, "config file")
        if not isinstance(tree, dict):
            raise ValueError(f"config file {file!r} must hold a mapping of sections (data:, model:, train:, "
                             f"regularizer:), got a {type(tree).__name__}")
        _apply_tree(cfg, tree, f"config file {file!r}")
    for s in sets or []:
        if "=" not in s:
            raise ValueError(f"--set expects key=value, got {s!r}")
        k, v = s.split("=", 1)
        try:
            _set_field(cfg, k.strip(), v.strip())
        except KeyError as exc:
            raise ValueError(str(exc.args[0]) if exc.args else f"unknown setting {k!r}") from None
    cfg.data.validate()
    cfg.model.validate()
    cfg.train.validate()
    cfg.regularizer.validate()
    cfg.protocol.validate(cfg.data.kind)
    return cfg
