"""Training-time regularizers (SPEC 5.2) as hooks of the TinyMem training loop, used through
``TrainConfig.regularizer``:

* ``spectral_norm`` (reference ``spectral_reg``): + (lambda/2) sum sigma_max^power over weight blocks.
* ``loss_truncation`` (``truncate_loss``): sequences above a running loss percentile get weight 0.
* ``example_tied_dropout``: per-example fixed channel masks on the residual stream.

Each is a :class:`~tinymem_fast.tinymem.regularizers.base.TrainHook`; :func:`get_regularizer` returns a
factory ``(model, train_cfg, seed) -> hook``. As mitigation methods (settings, result rows, sweeps) they
are registered in :mod:`tinymem_fast.methods.regularizers`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from .base import TrainHook
from .example_tied_dropout import ExampleTiedDropout
from .loss_truncation import LossTruncation
from .spectral_norm import SpectralNorm


# The settings of each regularizer (TrainConfig fields of the same names hold them during a run); each
# checks its own ranges.
@dataclass
class SpectralNormConfig:
    spectral_lambda: float = 0.01
    spectral_power: int = 1

    def __post_init__(self):
        if self.spectral_lambda < 0 or self.spectral_power not in (1, 2):
            raise ValueError(f"spectral_norm needs spectral_lambda >= 0 and spectral_power in {{1, 2}}, got "
                             f"{self.spectral_lambda}, {self.spectral_power}")


@dataclass
class LossTruncationConfig:
    trunc_drop_frac: float = 0.4
    trunc_buffer: int = 10000
    trunc_min_count: int = 10000

    def __post_init__(self):
        if not 0 <= self.trunc_drop_frac < 1 or self.trunc_buffer < 1 or self.trunc_min_count < 0:
            raise ValueError("loss_truncation needs 0 <= trunc_drop_frac < 1, trunc_buffer >= 1, "
                             f"trunc_min_count >= 0, got {self.trunc_drop_frac}, {self.trunc_buffer}, "
                             f"{self.trunc_min_count}")


@dataclass
class ExampleTiedDropoutConfig:
    etd_p_fixed: float = 0.2
    etd_p_mem: float = 0.1
    etd_per_row_ids: bool = False

    def __post_init__(self):
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
# name -> (factory, the TrainConfig fields it reads: its settings' fields)
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


def get_regularizer(name: str) -> Callable:
    """Factory ``(model, train_cfg, seed) -> TrainHook`` for a regularizer name (reference names accepted)."""
    return REGULARIZERS[canonical_name(name)][0]


def make_regularizer(name: str, model, cfg, seed: int = 0):
    return get_regularizer(name)(model, cfg, seed)


def _settings_of(name: str, cfg):
    """The regularizer's settings dataclass, filled from a TrainConfig (range-checked on construction)."""
    cls = SETTINGS[name]
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def check_config(cfg) -> None:
    """Fail before training on a bad name or value (and store the canonical name)."""
    cfg.regularizer = canonical_name(cfg.regularizer)
    bad = []
    for name in SETTINGS:
        try:
            _settings_of(name, cfg)
        except ValueError as exc:
            bad.append(str(exc))
    if bad:
        raise ValueError("regularizer settings out of range: " + "; ".join(bad))


def hparams(cfg) -> dict:
    return dataclasses.asdict(_settings_of(canonical_name(cfg.regularizer), cfg))


__all__ = ["ALIASES", "REGULARIZERS", "ExampleTiedDropout", "ExampleTiedDropoutConfig", "LossTruncation",
           "LossTruncationConfig", "SpectralNorm", "SpectralNormConfig", "TrainHook",
           "canonical_name", "check_config", "get_regularizer", "hparams", "make_regularizer"]
