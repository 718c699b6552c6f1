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

from collections.abc import Callable

from .base import TrainHook
from .example_tied_dropout import ExampleTiedDropout
from .loss_truncation import LossTruncation
from .spectral_norm import SpectralNorm

# name -> (factory, the TrainConfig fields it reads)
REGULARIZERS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "spectral_norm": (lambda model, c, seed: SpectralNorm(model, c.spectral_lambda, c.spectral_power, seed),
                      ("spectral_lambda", "spectral_power")),
    "loss_truncation": (lambda model, c, seed: LossTruncation(c.trunc_drop_frac, c.trunc_buffer,
                                                              c.trunc_min_count),
                        ("trunc_drop_frac", "trunc_buffer", "trunc_min_count")),
    "example_tied_dropout": (lambda model, c, seed: ExampleTiedDropout(
        model, c.etd_p_fixed, c.etd_p_mem, seed, c.etd_per_row_ids),
                             ("etd_p_fixed", "etd_p_mem", "etd_per_row_ids")),
}
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


def check_config(cfg) -> None:
    """Fail before training on a bad name or value (and store the canonical name)."""
    cfg.regularizer = canonical_name(cfg.regularizer)
    bad = []
    if cfg.spectral_lambda < 0 or cfg.spectral_power not in (1, 2):
        bad.append(f"spectral_lambda >= 0 and spectral_power in {{1, 2}} (got {cfg.spectral_lambda}, "
                   f"{cfg.spectral_power})")
    if not 0 <= cfg.trunc_drop_frac < 1 or cfg.trunc_buffer < 1 or cfg.trunc_min_count < 0:
        bad.append(f"0 <= trunc_drop_frac < 1, trunc_buffer >= 1, trunc_min_count >= 0 (got "
                   f"{cfg.trunc_drop_frac}, {cfg.trunc_buffer}, {cfg.trunc_min_count})")
    if not (0 < cfg.etd_p_fixed <= 1 and 0 <= cfg.etd_p_mem <= 1):
        bad.append(f"0 < etd_p_fixed <= 1 and 0 <= etd_p_mem <= 1 (got {cfg.etd_p_fixed}, {cfg.etd_p_mem})")
    if bad:
        raise ValueError("regularizer settings out of range: need " + "; ".join(bad))


def hparams(cfg) -> dict:
    name = canonical_name(cfg.regularizer)
    return {k: getattr(cfg, k) for k in REGULARIZERS[name][1]}


__all__ = ["ALIASES", "REGULARIZERS", "ExampleTiedDropout", "LossTruncation", "SpectralNorm", "TrainHook",
           "canonical_name", "check_config", "get_regularizer", "hparams", "make_regularizer"]
