"""Hard Concrete: gate sampling formulas, hc_init_p honoured, gradients zeroed every step, the reference's
stop schedule (checked every 10th epoch, ending that epoch only) and the first-step-below rule, ablation of
the top gates on GPT-2 / GPTNeoX / Llama."""

import copy
import math

import pytest
import torch
from tiny_models import NLL_RISE, unlearning_effect

from tinymem_fast.methods import UnlearnInputs, get_method
from tinymem_fast.methods.neuron.ablation import fit_neuron_gates
from tinymem_fast.methods.neuron.hard_concrete import (
    STOP_CHECK_EVERY,
    HardConcreteConfig,
    deterministic_gate,
    hard_concrete_gates,
    l0_penalty,
    sample_gate,
)
from tinymem_fast.methods.registry import make_config


def _inputs(rows):
    z = torch.zeros_like(rows, dtype=torch.bool)
    return UnlearnInputs(rows, z, rows, z)


def test_gate_formulas():
    cfg = HardConcreteConfig()
    la = torch.tensor([-3.0, 0.0, 0.7, 4.0])
    gen = torch.Generator().manual_seed(3)
    u = torch.rand(la.shape, generator=torch.Generator().manual_seed(3)).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((u.log() - (1 - u).log() + la) / cfg.hc_beta)
    want = (s * 1.2 - 0.1).clamp(0, 1)
    torch.testing.assert_close(sample_gate(la, cfg, gen), want)
    torch.testing.assert_close(deterministic_gate(la, cfg), (torch.sigmoid(la) * 1.2 - 0.1).clamp(0, 1))
    want_pen = torch.sigmoid(la - cfg.hc_beta * math.log(0.1 / 1.1)).mean()
    torch.testing.assert_close(l0_penalty(la, cfg), want_pen)


def test_init_p_honoured(planted):
    """The reference ignored its mask_p: with lr 0 the gates stay at their initialisation."""
    base, _, _, secret = planted["gpt2"]
    for p in (0.2, 0.8):
        gates, _ = hard_concrete_gates(copy.deepcopy(base), _inputs(secret),
                                       HardConcreteConfig(hc_init_p=p, lr=0.0, stop_loss=-1, batch_size=6))
        assert abs(gates.mean().item() - p) < 0.01 and gates.std().item() < 0.01


def test_bad_settings():
    m = get_method("hc")
    with pytest.raises(ValueError, match="hc_init_p"):
        make_config(m, {"hc_init_p": 1.0})
    with pytest.raises(ValueError, match="stretch"):
        make_config(m, {"hc_l": 0.1})


def test_gradients_zeroed_every_step(planted, monkeypatch):
    base, _, _, secret = planted["gpt2"]
    calls = []
    real = torch.optim.Adam.zero_grad
    monkeypatch.setattr(torch.optim.Adam, "zero_grad", lambda self, *a, **k: (calls.append(1),
                                                                            real(self, *a, **k)))
    rows = torch.cat([secret, secret, secret])  # 18 rows, batch 6: 3 steps per epoch
    _, fit = hard_concrete_gates(copy.deepcopy(base), _inputs(rows),
                                 HardConcreteConfig(epochs=2, batch_size=6, stop_loss=-1))
    assert fit.steps == 6 and len(calls) == 6


def _scripted_fit(model, rows, epochs, below, stop_rule, check_every=STOP_CHECK_EVERY):
    """fit_neuron_gates with a stub penalty: call number c (1-based) returns 0.0 if c is in ``below``,
    else 1.0 (stop_loss 0.5). Returns (GateFit, penalty calls)."""
    layers, inter = 2, 192
    coef = torch.ones(layers, inter, requires_grad=True)
    calls = []

    def penalty():
        calls.append(1)
        return torch.tensor(0.0 if len(calls) in below else 1.0)

    fit = fit_neuron_gates(model, rows, torch.zeros_like(rows, dtype=torch.bool), coef, lambda: coef,
                           penalty, weight=1.0, epochs=epochs, batch_size=6, lr=0.1, stop_loss=0.5,
                           loss_on_pad=False, desc="t", stop_rule=stop_rule, check_every=check_every)
    return fit, len(calls)


def test_reference_schedule_pinned(planted):
    """Reference: the penalty is compared with stop_loss only in epochs 10, 20, ... (at each batch, before
    its step); the first batch below it is not stepped and ends that epoch, and the next epoch trains."""
    assert STOP_CHECK_EVERY == 10
    base, _, _, secret = planted["gpt2"]
    rows = torch.cat([secret, secret, secret])  # 18 rows, batch 6: 3 batches per epoch
    everything = set(range(1, 100))
    # always below, 20 epochs: epochs 1-9 and 11-19 take 3 steps each (54); epochs 10 and 20 end at their
    # first batch without a step, so the penalty is read 54 + 2 = 56 times
    fit, calls = _scripted_fit(copy.deepcopy(base), rows, 20, everything, "reference_epochs")
    assert (fit.steps, fit.epochs_cut, calls) == (54, (10, 20), 56)
    # 10 epochs, below only at call 29 = epoch 10's second batch (27 calls in epochs 1-9): epoch 10 takes
    # its first step (call 28, above), stops at its second batch; 27 + 1 = 28 steps
    fit, calls = _scripted_fit(copy.deepcopy(base), rows, 10, {29}, "reference_epochs")
    assert (fit.steps, fit.epochs_cut, calls) == (28, (10,), 29)
    # below at calls 1-27 only (epochs 1-9): never checked there, so nothing stops
    fit, calls = _scripted_fit(copy.deepcopy(base), rows, 10, set(range(1, 28)), "reference_epochs")
    assert (fit.steps, fit.epochs_cut, calls) == (30, (), 30)
    # the paper's 1-epoch runs are never checked
    fit, _ = _scripted_fit(copy.deepcopy(base), rows, 1, everything, "reference_epochs")
    assert (fit.steps, fit.epochs_cut) == (3, ())


def test_first_step_below_pinned(planted):
    """first_step_below: the step whose (pre-step) penalty is below stop_loss is taken, then training ends,
    in whatever epoch; check_every plays no part."""
    base, _, _, secret = planted["gpt2"]
    rows = torch.cat([secret, secret, secret])
    fit, calls = _scripted_fit(copy.deepcopy(base), rows, 20, {5}, "first_step_below")
    assert (fit.steps, fit.epochs_cut, calls) == (5, (2,), 5)  # call 5 = epoch 2, batch 2
    fit, calls = _scripted_fit(copy.deepcopy(base), rows, 3, set(), "first_step_below")
    assert (fit.steps, fit.epochs_cut, calls) == (9, (), 9)


def test_reference_schedule_real_penalty(planted):
    """With the real L0 penalty (about 0.8 at the start, far below stop_loss 10): 20 epochs of one batch
    take 18 steps, epochs 10 and 20 cut; first_step_below stops after one step."""
    base, _, _, secret = planted["gpt2"]
    cfg = HardConcreteConfig(epochs=20, batch_size=6, stop_loss=10.0)
    _, fit = hard_concrete_gates(copy.deepcopy(base), _inputs(secret), cfg)
    assert (fit.steps, fit.epochs_cut) == (18, (10, 20))
    m = get_method("hc")
    info = m.run(copy.deepcopy(base), _inputs(secret), make_config(m, dict(epochs=20, batch_size=6,
                                                                            stop_loss=10.0)))
    assert (info["steps"], info["epochs_cut"]) == (18, [10, 20])
    _, fit = hard_concrete_gates(copy.deepcopy(base), _inputs(secret),
                                 HardConcreteConfig(epochs=5, batch_size=2, stop_loss=10.0,
                                                    stop_rule="first_step_below"))
    assert (fit.steps, fit.epochs_cut) == (1, (1,))


def test_stop_rule_setting():
    m = get_method("hc")
    assert make_config(m).stop_rule == "reference_epochs"
    assert make_config(m, {"stop_rule": "first_step_below"}).stop_rule == "first_step_below"
    with pytest.raises(ValueError, match="stop_rule must be one of"):
        make_config(m, {"stop_rule": "first_below"})


def test_frozen_model_untouched_until_ablation(planted):
    base, _, _, secret = planted["gpt2"]
    model = copy.deepcopy(base)
    hard_concrete_gates(model, _inputs(secret), HardConcreteConfig(epochs=3, batch_size=6, stop_loss=-1))
    for p, p0 in zip(model.parameters(), base.parameters(), strict=True):
        assert torch.equal(p, p0) and p.grad is None and p.requires_grad == p0.requires_grad


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_hard_concrete_runs_and_ablates(planted, arch):
    base, _, _, secret = planted[arch]
    model = copy.deepcopy(base)
    m = get_method("hard_concrete")
    info = m.run(model, _inputs(secret), make_config(m, dict(ratio=0.2, epochs=10, batch_size=6)))
    assert info["ablated"] > 0 and info["steps"] >= 1
    e = unlearning_effect(base, model, secret, f"hard_concrete {arch}")
    assert e.nll_after >= e.nll_before + NLL_RISE["hard_concrete"], e


def test_bf16_hard_concrete_ablates(planted):
    """precision=bf16: bf16 GEMMs under autocast, float32 log-alphas and Adam state; the same steps as
    fp32 and the planted rows' NLL rises by the fp32 test's margin."""
    base, _, _, secret = planted["gpt2"]
    model = copy.deepcopy(base)
    m = get_method("hard_concrete")
    info = m.run(model, _inputs(secret), make_config(m, dict(ratio=0.2, epochs=10, batch_size=6,
                                                             precision="bf16")))
    assert info["ablated"] > 0 and info["steps"] >= 1
    e = unlearning_effect(base, model, secret, "hard_concrete gpt2 bf16")
    assert e.nll_after >= e.nll_before + NLL_RISE["hard_concrete"], e
    assert all(p.dtype == torch.float32 for p in model.parameters())
    gates, _ = hard_concrete_gates(copy.deepcopy(base), _inputs(secret),
                                   HardConcreteConfig(epochs=2, batch_size=6, precision="bf16"))
    assert gates.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown precision"):
        make_config(m, {"precision": "fp16"})
