"""Training-time regularizers (SPEC 5.2) as hooks of the TinyMem training loop, chosen and set by a run
config's ``regularizer`` section (:class:`RegularizerConfig`: ``regularizer.name=spectral_norm``,
``regularizer.spectral_norm.spectral_lambda=0.02``):

* ``spectral_norm`` (reference ``spectral_reg``): + (lambda/2) sum sigma_max^power over weight blocks.
* ``loss_truncation`` (``truncate_loss``): sequences above a running loss percentile get weight 0.
* ``example_tied_dropout``: per-example fixed channel masks on the residual stream.

Each is a :class:`~tinymem_fast.tinymem.regularizers.base.TrainHook`; :func:`get_regularizer` returns a
factory ``(model, settings, seed) -> hook``. As mitigation methods (settings, result rows, sweeps) they
are registered in :mod:`tinymem_fast.methods.regularizers`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from .base import TrainHook
from .example_tied_dropout import ExampleTiedDropout
from .loss_truncation import LossTruncation
from .spectral_norm import SpectralNorm


class _Checked:
    """Settings that check their ranges on construction and in validate() (--set writes fields later)."""

    def __post_init__(self):
        self.validate()


@dataclass
class SpectralNormConfig(_Checked):
    spectral_lambda: float = 0.01
    spectral_power: int = 1

    def validate(self):
        if self.spectral_lambda < 0 or self.spectral_power not in (1, 2):
            raise ValueError(f"spectral_norm needs spectral_lambda >= 0 and spectral_power in {{1, 2}}, got "
                             f"{self.spectral_lambda}, {self.spectral_power}")


@dataclass
class LossTruncationConfig(_Checked):
    trunc_drop_frac: float = 0.4
    trunc_buffer: int = 10000
    trunc_min_count: int = 10000

    def validate(self):
        if not 0 <= self.trunc_drop_frac < 1 or self.trunc_buffer < 1 or self.trunc_min_count < 0:
            raise ValueError("loss_truncation needs 0 <= trunc_drop_frac < 1, trunc_buffer >= 1, "
                             f"trunc_min_count >= 0, got {self.trunc_drop_frac}, {self.trunc_buffer}, "
                             f"{self.trunc_min_count}")


@dataclass
class ExampleTiedDropoutConfig(_Checked):
    etd_p_fixed: float = 0.2
    etd_p_mem: float = 0.1
    etd_per_row_ids: bool = False

    def validate(self):
        if not (0 < self.etd_p_fixed <= 1 and 0 <= self.etd_p_mem <= 1):
            raise ValueError("example_tied_dropout needs 0 < etd_p_fixed <= 1 and 0 <= etd_p_mem <= 1, got "
                             f"{self.etd_p_fixed}, {self.etd_p_mem}")


SETTINGS: dict[str, type] = {"spectral_norm": SpectralNormConfig, "loss_truncation": LossTruncationConfig,
                             "example_tied_dropout": ExampleTiedDropoutConfig}
_FACTORIES: dict[str, Callable] = {
    "spectral_norm": lambda model, c, seed: SpectralNorm(model, c.spectral_lambda, c.spectral_power, seed),
    "loss_truncation": lambda model, c, seed: LossTruncation(c.trunc_drop_frac, c.trunc_buffer,
                                                             c.trunc_min_count),
    "example_tied_dropout": lambda model, c, seed: ExampleTiedDropout(
        model, c.etd_p_fixed, c.etd_p_mem, seed, c.etd_per_row_ids),
}
# name -> (factory, its settings' field names)
REGULARIZERS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    name: (_FACTORIES[name], tuple(f.name for f in dataclasses.fields(cls)))
    for name, cls in SETTINGS.items()}
ALIASES = {"spectral_reg": "spectral_norm", "truncate_loss": "loss_truncation",
           "example_tied": "example_tied_dropout", "etd": "example_tied_dropout"}


def canonical_name(name: str) -> str:
    key = ALIASES.get(name, name)
    if key not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r}; choose one of {', '.join(sorted(REGULARIZERS))}")
    return key


@dataclass
class RegularizerConfig:
    """A run's regularizer: ``name`` (None: none) and the settings of each, so that switching ``name``
    in a sweep keeps every other regularizer's settings where they were."""
    name: str | None = None
    spectral_norm: SpectralNormConfig = field(default_factory=SpectralNormConfig)
    loss_truncation: LossTruncationConfig = field(default_factory=LossTruncationConfig)
    example_tied_dropout: ExampleTiedDropoutConfig = field(default_factory=ExampleTiedDropoutConfig)
    timing_steps: int = 8  # steps timed with and without the regularizer (its cost); 0 = skip

    def validate(self) -> None:
        """Fail before training on a bad name or value (and store the canonical name)."""
        if self.name is not None:
            self.name = canonical_name(self.name)
        if not (isinstance(self.timing_steps, int) and self.timing_steps >= 0):
            raise ValueError(f"regularizer.timing_steps must be >= 0, got {self.timing_steps!r}")
        bad = []
        for name in SETTINGS:
            try:
                getattr(self, name).validate()
            except ValueError as exc:
                bad.append(str(exc))
        if bad:
            raise ValueError("regularizer settings out of range: " + "; ".join(bad))

    def settings(self):
        """The chosen regularizer's settings dataclass (None without one)."""
        return getattr(self, canonical_name(self.name)) if self.name else None

    def hparams(self) -> dict:
        return dataclasses.asdict(self.settings()) if self.name else {}


# Where regularizer settings lived before they left TrainConfig: run.json files and configs written then,
# and ``--set train.spectral_lambda=...``, still read right.
MOVED = {"train.regularizer": "regularizer.name", "train.reg_timing_steps": "regularizer.timing_steps",
         **{f"train.{f}": f"regularizer.{name}.{f}"
            for name, (_, fields) in REGULARIZERS.items() for f in fields}}


def upgrade_tree(tree: dict) -> dict:
    """A nested config mapping with settings at their old places (``train.spectral_lambda``) moved to
    the ``regularizer`` section; anything else unchanged."""
    train = tree.get("train")
    if not isinstance(train, dict) or not any(f"train.{k}" in MOVED for k in train):
        return tree
    out = {**tree, "train": {k: v for k, v in train.items() if f"train.{k}" not in MOVED}}
    out["regularizer"] = dict(out.get("regularizer") or {})
    for k, v in train.items():
        if (new := MOVED.get(f"train.{k}")) is not None:
            *parents, leaf = new.split(".")[1:]
            node = out["regularizer"]
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = v
    return out


def get_regularizer(name: str) -> Callable:
    """Factory ``(model, settings, seed) -> TrainHook`` for a regularizer name (reference names accepted);
    ``settings`` is its dataclass (:data:`SETTINGS`), None for the defaults."""
    key = canonical_name(name)
    factory = REGULARIZERS[key][0]
    return lambda model, settings=None, seed=0: factory(model, settings or SETTINGS[key](), seed)


def make_regularizer(name: str, model, settings=None, seed: int = 0):
    return get_regularizer(name)(model, settings, seed)


__all__ = ["ALIASES", "REGULARIZERS", "SETTINGS", "ExampleTiedDropout", "ExampleTiedDropoutConfig",
           "LossTruncation", "LossTruncationConfig", "MOVED", "RegularizerConfig", "SpectralNorm",
           "SpectralNormConfig", "TrainHook", "canonical_name", "get_regularizer", "make_regularizer",
           "upgrade_tree"]
