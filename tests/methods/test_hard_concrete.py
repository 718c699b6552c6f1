"""Hard Concrete: gate sampling formulas, hc_init_p honoured, gradients zeroed every step, early stop,
ablation of the top gates on GPT-2 / GPTNeoX / Llama."""

import copy
import math

import pytest
import torch
from tiny_models import NLL_RISE, unlearning_effect

from tinymem_fast.methods import UnlearnInputs, get_method
from tinymem_fast.methods.neuron.hard_concrete import (
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
    _, steps = hard_concrete_gates(copy.deepcopy(base), _inputs(rows),
                                   HardConcreteConfig(epochs=2, batch_size=6, stop_loss=-1))
    assert steps == 6 and len(calls) == 6


def test_early_stop_ends_all_epochs(planted):
    base, _, _, secret = planted["gpt2"]
    _, steps = hard_concrete_gates(copy.deepcopy(base), _inputs(secret),
                                   HardConcreteConfig(epochs=5, batch_size=2, stop_loss=10.0))
    assert steps == 1


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
