"""Zero-Out removes the neuron (not keeps it), scores the memorized suffix, and is batched exactly."""

import copy

import pytest
import torch
from tiny_models import MAX_LEFT, NLL_RISE, P, unlearning_effect

from tinymem_fast.integrations.adapters import mlp_layers
from tinymem_fast.methods import UnlearnInputs, get_method
from tinymem_fast.methods.neuron.ablation import ablate_neurons
from tinymem_fast.methods.neuron.zero_out import (
    ZeroOutConfig,
    suffix_loss,
    suffix_weights,
    zero_out_attribution,
)
from tinymem_fast.methods.registry import make_config


def _inputs(secret):
    zpad = torch.zeros_like(secret, dtype=torch.bool)
    return UnlearnInputs(secret, zpad, secret, zpad, torch.full((secret.shape[0],), P))


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_batched_attribution_equals_one_neuron_at_a_time(planted, arch):
    base, _, _, secret = planted[arch]
    inputs = _inputs(secret)
    attr = zero_out_attribution(base, inputs, ZeroOutConfig(rows_per_pass=20))
    w = suffix_weights(secret, inputs.forget_pad, inputs.forget_start)
    with torch.no_grad():
        l0 = suffix_loss(base(secret).logits, secret, w).mean()
        for layer, neuron in [(0, 0), (0, 7), (1, 31)]:
            m = copy.deepcopy(base)
            ablate_neurons(m, {layer: torch.tensor([neuron])})  # input side zeroed: activation exactly 0
            l1 = suffix_loss(m(secret).logits, secret, w).mean()
            assert attr[layer, neuron].item() == pytest.approx((l1 - l0).item(), abs=1e-5)
    inverted = zero_out_attribution(base, inputs, ZeroOutConfig(compat_inverted_mask=True))
    assert not torch.allclose(inverted, attr)  # keeping only neuron i is a different (wrong) signal


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_replayed_blocks_equal_running_them(planted, arch, monkeypatch):
    """Replicas skip the decoder blocks below the scored layer (their clean outputs are replayed): every
    attribution equals the one from running every block, and the model is left as it was."""
    import tinymem_fast.methods.neuron.zero_out as zo

    base, _, _, secret = planted[arch]
    inputs = _inputs(secret)
    blocks = zo.decoder_blocks(base, mlp_layers(base))
    assert blocks is not None and len(blocks) == len(mlp_layers(base))
    calls = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda *_a, k=layer.index: calls.append(k))
             for layer in mlp_layers(base)]  # a replayed block runs none of its modules
    replayed = zero_out_attribution(base, inputs, ZeroOutConfig(rows_per_pass=100))
    ran_replayed = len(calls)
    monkeypatch.setattr(zo, "decoder_blocks", lambda *_a: None)
    calls.clear()
    full = zero_out_attribution(base, inputs, ZeroOutConfig(rows_per_pass=100))
    for h in hooks:
        h.remove()
    torch.testing.assert_close(replayed, full, rtol=1e-4, atol=1e-5)  # the one-at-a-time test's margin
    assert ran_replayed < len(calls)  # block 0 never ran for layer 1's replicas
    assert all("forward" not in vars(b) for b in blocks)


def test_suffix_weights_cover_window_only():
    ids = torch.zeros(2, 10, dtype=torch.long)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 7:] = True
    w = suffix_weights(ids, pad, torch.tensor([4, 4]))
    assert torch.equal(w[0] > 0, torch.arange(10) >= 4)
    assert torch.equal(w[1] > 0, (torch.arange(10) >= 4) & (torch.arange(10) < 7))
    assert torch.allclose(w.sum(1), torch.ones(2))


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_zero_out_reduces_extraction(planted, arch):
    base, _, _, secret = planted[arch]
    model = copy.deepcopy(base)
    m = get_method("zero")
    info = m.run(model, _inputs(secret), make_config(m, dict(ratio=0.2)))
    assert info["ablated"] > 0
    e = unlearning_effect(base, model, secret, f"zero_out {arch}")
    assert e.extracted_after <= MAX_LEFT["zero_out"], e
    assert e.nll_after >= e.nll_before + NLL_RISE["zero_out"], e


def test_bf16_zero_out_reduces_extraction(planted):
    """precision=bf16: bf16 GEMMs under autocast (baseline and removals alike), float32 losses; the
    fp32 test's bounds hold."""
    base, _, _, secret = planted["gpt2"]
    model = copy.deepcopy(base)
    m = get_method("zero")
    info = m.run(model, _inputs(secret), make_config(m, dict(ratio=0.2, precision="bf16")))
    assert info["ablated"] > 0
    e = unlearning_effect(base, model, secret, "zero_out gpt2 bf16")
    assert e.extracted_after <= MAX_LEFT["zero_out"], e
    assert e.nll_after >= e.nll_before + NLL_RISE["zero_out"], e
    assert all(p.dtype == torch.float32 for p in model.parameters())
    attribution = zero_out_attribution(copy.deepcopy(base), _inputs(secret), ZeroOutConfig(precision="bf16"))
    assert attribution.dtype == torch.float32 and attribution.device.type == "cpu"
    with pytest.raises(ValueError, match="unknown precision"):
        make_config(m, {"precision": "fp16"})
