"""Slimming: gradients zeroed every step, early stop ends training, ablation of the top coefficients."""

import copy

import pytest
import torch
from tiny_models import NLL_RISE, unlearning_effect

from tinymem_fast.methods import UnlearnInputs, get_method
from tinymem_fast.methods.neuron.slimming import SlimmingConfig, slimming_coefficients
from tinymem_fast.methods.registry import make_config


def _inputs(rows):
    z = torch.zeros_like(rows, dtype=torch.bool)
    return UnlearnInputs(rows, z, rows, z)


def test_gradients_zeroed_every_step(planted, monkeypatch):
    """The reference zeroed once per epoch, so gradients piled up across batches: count the zeroings."""
    base, _, _, secret = planted["gpt2"]
    calls = []
    real = torch.optim.Adam.zero_grad
    monkeypatch.setattr(torch.optim.Adam, "zero_grad", lambda self, *a, **k: (calls.append(1),
                                                                            real(self, *a, **k)))
    rows = torch.cat([secret, secret, secret])  # 18 rows, batch 6: 3 steps per epoch
    _, steps = slimming_coefficients(copy.deepcopy(base), _inputs(rows),
                                     SlimmingConfig(epochs=2, batch_size=6, stop_loss=-1))
    assert steps == 6 and len(calls) == 6


def test_early_stop_ends_all_epochs(planted):
    base, _, _, secret = planted["gpt2"]
    _, steps = slimming_coefficients(copy.deepcopy(base), _inputs(secret),
                                     SlimmingConfig(epochs=5, batch_size=2, stop_loss=10.0))
    assert steps == 1  # the sparsity term (1.0) is below 10 at once: no further batch, no further epoch


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_slimming_runs_and_ablates(planted, arch):
    base, _, _, secret = planted[arch]
    model = copy.deepcopy(base)
    m = get_method("slim")
    info = m.run(model, _inputs(secret), make_config(m, dict(ratio=0.2, epochs=10, batch_size=6)))
    assert info["ablated"] > 0 and info["steps"] >= 1
    e = unlearning_effect(base, model, secret, f"slimming {arch}")
    assert e.nll_after >= e.nll_before + NLL_RISE["slimming"], e
