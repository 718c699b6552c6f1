"""The one registry of the 17 mitigation methods: name, reference-code aliases, kind, settings
dataclass and how it runs.

Kinds (``Method.category``) and what ``run`` takes:

* ``weight`` / ``neuron`` (unlearning, 11): ``run(model, inputs: UnlearnInputs, cfg) -> info``, editing the
  model in place (:func:`tinymem_fast.experiments.unlearning.unlearn` wraps it into a result row);
* ``regularizer`` (3) and ``fine-tuning`` (3): ``run(run_dir, cfg, out_dir, *, device, seed, progress) ->
  result row``, a training run next to a trained TinyMem run folder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..common.validation import like_default, parse_like


@dataclass
class UnlearnInputs:
    """What an unlearning method sees: the forget set, the retain set (token ids + positional pad masks)
    and where the memorized window starts in each forget row."""

    forget_ids: torch.Tensor
    forget_pad: torch.Tensor
    retain_ids: torch.Tensor
    retain_pad: torch.Tensor
    forget_start: torch.Tensor | None = None

    def __post_init__(self):
        if self.forget_ids.shape[0] == 0:
            raise ValueError("the forget set is empty: nothing is memorized, so there is nothing to unlearn")


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    run: Callable
    category: str
    aliases: tuple = ()


METHODS: dict[str, Method] = {}


def register(name: str, config_cls: type, category: str, aliases: tuple = ()):
    def deco(fn):
        METHODS[name] = Method(name, config_cls, fn, category, aliases)
        return fn

    return deco


def _load_all() -> None:
    # importing a method's module registers it
    from . import finetune, regularizers  # noqa: F401
    from .neuron import activations, hard_concrete, integrated_gradients, slimming, zero_out  # noqa: F401
    from .weight import durable, greedy, second_order, subnet  # noqa: F401


UNLEARNING = ("weight", "neuron")
KINDS = ("regularizer", "fine-tuning", *UNLEARNING)


def method_names(kinds: tuple[str, ...] = UNLEARNING) -> list[str]:
    """Registered methods of the given kinds (default: the 11 unlearning methods), sorted by name."""
    _load_all()
    return sorted(n for n, m in METHODS.items() if m.category in kinds)


def get_method(name: str) -> Method:
    _load_all()
    if name in METHODS:
        return METHODS[name]
    for m in METHODS.values():
        if name in m.aliases:
            return m
    raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")


def get_unlearning_method(name: str) -> Method:
    """An unlearning method by name; a training-time method gets a one-line pointer to its command."""
    m = get_method(name)
    if m.category not in UNLEARNING:
        how = "tinymem train --regularizer" if m.category == "regularizer" else "tinymem finetune"
        raise ValueError(f"{m.name} is a {m.category} method, not an unlearning one: run it with {how} "
                         "(or in a sweep)")
    return m


# settings that count or scale something: zero or negative is never meant (None = the method's default)
POSITIVE = {"epochs", "lr", "batch_size", "forget_batch_size", "retain_batch_size", "max_steps", "ig_steps",
            "sou_num_grads", "sou_grad_batch", "sou_block_size", "weights_per_step", "hc_beta"}


def make_config(method: Method, overrides: dict | None = None):
    cfg = method.config_cls()
    valid = {f.name: f for f in dataclasses.fields(cfg)}
    for k in overrides or {}:
        if k not in valid:
            raise ValueError(f"{method.name} has no setting {k!r}; valid: {', '.join(sorted(valid))}")
    overrides = {k: like_default(f"{method.name}:{k}", v, getattr(cfg, k), parse=parse_like,
                                 annotation=valid[k].type)
                 for k, v in (overrides or {}).items()}
    cfg = dataclasses.replace(cfg, **overrides)  # re-runs the config's own validation
    if hasattr(cfg, "ratio"):
        from ..ops.masked_subnet import check_ratio

        check_ratio(cfg.ratio)  # fail before any long work, not midway
    for name in POSITIVE & valid.keys():
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or value <= 0):
            raise ValueError(f"{method.name}: {name} must be > 0, got {value!r}")
    return cfg
