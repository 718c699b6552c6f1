"""Slimming: gradients zeroed every step, the reference's stop schedule (checked every 100th epoch, so never
in the paper's 1/10/20-epoch runs) and the first-step-below rule, ablation of the top coefficients."""

import copy

import pytest
import torch
from tiny_models import NLL_RISE, unlearning_effect

from tinymem_fast.methods import UnlearnInputs, get_method
from tinymem_fast.methods.neuron.slimming import STOP_CHECK_EVERY, SlimmingConfig, slimming_coefficients
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
    _, fit = slimming_coefficients(copy.deepcopy(base), _inputs(rows),
                                   SlimmingConfig(epochs=2, batch_size=6, stop_loss=-1))
    assert fit.steps == 6 and len(calls) == 6


def test_reference_schedule_paper_epochs_never_stop(planted):
    """The sparsity term starts at 1.0, below stop_loss 10: the reference checks it only in epoch 100,
    200, ..., so the paper's 1/10/20-epoch runs train every batch of every epoch."""
    assert STOP_CHECK_EVERY == 100
    base, _, _, secret = planted["gpt2"]
    rows = torch.cat([secret, secret])  # 12 rows, batch 6: 2 steps per epoch
    for epochs in (1, 10, 20):
        _, fit = slimming_coefficients(copy.deepcopy(base), _inputs(rows),
                                       SlimmingConfig(epochs=epochs, batch_size=6, stop_loss=10.0))
        assert (fit.steps, fit.epochs_cut) == (2 * epochs, ())


def test_reference_schedule_epoch_100_cut(planted):
    """101 epochs of one batch: epoch 100 is checked, its only batch is below stop_loss and not stepped,
    epoch 101 trains again: 100 steps."""
    base, _, _, secret = planted["gpt2"]
    m = get_method("slim")
    info = m.run(copy.deepcopy(base), _inputs(secret),
                 make_config(m, dict(epochs=101, batch_size=6, stop_loss=10.0)))
    assert (info["steps"], info["epochs_cut"]) == (100, [100])


def test_first_step_below_ends_all_epochs(planted):
    base, _, _, secret = planted["gpt2"]
    _, fit = slimming_coefficients(copy.deepcopy(base), _inputs(secret),
                                   SlimmingConfig(epochs=5, batch_size=2, stop_loss=10.0,
                                                  stop_rule="first_step_below"))
    assert (fit.steps, fit.epochs_cut) == (1, (1,))  # 1.0 < 10 at once: no further batch or epoch


def test_stop_rule_setting():
    m = get_method("slimming")
    assert make_config(m).stop_rule == "reference_epochs"
    assert make_config(m, {"stop_rule": "first_step_below"}).stop_rule == "first_step_below"
    with pytest.raises(ValueError, match="stop_rule must be one of"):
        make_config(m, {"stop_rule": "never"})


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_slimming_runs_and_ablates(planted, arch):
    base, _, _, secret = planted[arch]
    model = copy.deepcopy(base)
    m = get_method("slim")
    info = m.run(model, _inputs(secret), make_config(m, dict(ratio=0.2, epochs=10, batch_size=6)))
    assert info["ablated"] > 0 and info["steps"] >= 1
    e = unlearning_effect(base, model, secret, f"slimming {arch}")
    assert e.nll_after >= e.nll_before + NLL_RISE["slimming"], e


def test_bf16_slimming_ablates(planted):
    """precision=bf16: bf16 GEMMs under autocast, float32 coefficients and Adam state; the same steps
    as fp32 and the planted rows' NLL rises by the fp32 test's margin."""
    base, _, _, secret = planted["gpt2"]
    model = copy.deepcopy(base)
    m = get_method("slim")
    info = m.run(model, _inputs(secret), make_config(m, dict(ratio=0.2, epochs=10, batch_size=6,
                                                             precision="bf16")))
    assert info["ablated"] > 0 and info["steps"] == 10
    e = unlearning_effect(base, model, secret, "slimming gpt2 bf16")
    assert e.nll_after >= e.nll_before + NLL_RISE["slimming"], e
    assert all(p.dtype == torch.float32 for p in model.parameters())
    coef, _ = slimming_coefficients(copy.deepcopy(base), _inputs(secret),
                                    SlimmingConfig(epochs=2, batch_size=6, precision="bf16"))
    assert coef.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown precision"):
        make_config(m, {"precision": "fp8"})


def test_non_finite_loss_raises(planted):
    base, _, _, secret = planted["gpt2"]
    model = copy.deepcopy(base)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"slimming loss became non-finite \(nan\) at step 0"):
        slimming_coefficients(model, _inputs(secret), SlimmingConfig(epochs=2, batch_size=6))
    assert all(p.requires_grad for p in model.parameters())
