"""One registry for all 17 methods: kinds, settings dataclasses, reference-code aliases; the sweep reads
only the registry, and the unlearning pipeline refuses training-time methods in one line."""

import dataclasses

import pytest

from tinymem_fast.experiments.sweep import all_methods, canonical
from tinymem_fast.methods import get_method
from tinymem_fast.methods.registry import KINDS, get_unlearning_method, make_config, method_names


def test_seventeen_methods_in_four_kinds():
    by_kind = {k: method_names((k,)) for k in KINDS}
    assert {k: len(v) for k, v in by_kind.items()} == {"regularizer": 3, "fine-tuning": 3, "weight": 6,
                                                        "neuron": 5}
    assert len(all_methods()) == 17 and all_methods()[:11] == method_names()
    for name in all_methods():
        m = get_method(name)
        assert dataclasses.is_dataclass(m.config_cls) and callable(m.run)


@pytest.mark.parametrize("alias,name", [
    ("spectral_reg", "spectral_norm"), ("truncate_loss", "loss_truncation"), ("etd", "example_tied_dropout"),
    ("random_greedy", "balanced_subnet"), ("clean_finetune", "clean_ft")])
def test_reference_aliases(alias, name):
    assert canonical(alias) == name


def test_training_time_settings_are_checked_like_the_others():
    cfg = make_config(get_method("loss_truncation"), {"trunc_drop_frac": 0.05})
    assert cfg.trunc_drop_frac == 0.05 and cfg.trunc_buffer == 10000
    with pytest.raises(ValueError, match="trunc_drop_frac < 1"):
        make_config(get_method("loss_truncation"), {"trunc_drop_frac": 1.5})
    with pytest.raises(ValueError, match="has no setting 'ratio'"):
        make_config(get_method("clean_ft"), {"ratio": 0.1})
    with pytest.raises(ValueError, match="epochs must be > 0"):
        make_config(get_method("both_ft"), {"epochs": 0})


def test_unlearning_refuses_training_time_methods():
    assert get_unlearning_method("hc").name == "hard_concrete"
    with pytest.raises(ValueError, match="spectral_norm is a regularizer method.*train --regularizer"):
        get_unlearning_method("spectral_norm")
    with pytest.raises(ValueError, match="extra_ft is a fine-tuning method.*tinymem finetune"):
        get_unlearning_method("extra_ft")
