"""Subnet and BalancedSubnet on tiny GPT-2, GPTNeoX and Llama models: planted memorized sequences stop
being extracted while held-out clean data keeps its loss; MLP adapters; bad input."""

import copy

import pytest
import torch
from tiny_models import MAX_LEFT, NLL_RISE, P, T, held_loss, tiny, unlearning_effect

from tinymem_fast.integrations.adapters import mlp_layers, mlp_parameters
from tinymem_fast.methods import UnlearnInputs, get_method
from tinymem_fast.methods.registry import make_config
from tinymem_fast.tinymem.memorization import score_windows


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_adapter_finds_every_mlp_matrix(planted, arch):
    model = planted[arch][0]
    layers = mlp_layers(model)
    assert len(layers) == 2
    inner = 128 if arch == "llama" else 192
    assert all(layer.intermediate_size == inner for layer in layers)
    names = {n.split(".")[2] for n, _ in mlp_parameters(model)}
    expected = {"gpt2": {"c_fc", "c_proj"}, "gpt_neox": {"dense_h_to_4h", "dense_4h_to_h"},
                "llama": {"gate_proj", "up_proj", "down_proj"}}[arch]
    assert names == expected


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
@pytest.mark.parametrize("method", ["balanced_subnet", "subnet"])
def test_unlearning_removes_planted_sequences(planted, arch, method):
    base, clean, held_out, secret = planted[arch]
    before = score_windows(base, secret, P, T).match
    assert before.all(), "fixture: the planted rows must be memorized"
    model = copy.deepcopy(base)
    names_before = [n for n, _ in model.named_parameters()]
    m = get_method(method)
    hp = dict(ratio=0.05, lr=1.0, batch_size=16, loss_weight=0.9, epochs=4, forget_batch_size=6,
              retain_batch_size=16) if method == "balanced_subnet" \
        else dict(ratio=0.1, lr=1.0, batch_size=16, epochs=20)
    zpad = torch.zeros_like(secret, dtype=torch.bool)
    info = m.run(model, UnlearnInputs(secret, zpad, clean, torch.zeros_like(clean, dtype=torch.bool)),
                 make_config(m, hp))
    assert info["steps"] > 0
    # the edit is folded back into plain modules: same parameter names, no score tensors left
    assert [n for n, _ in model.named_parameters()] == names_before
    e = unlearning_effect(base, model, secret, f"{method} {arch}")
    assert e.extracted_after <= MAX_LEFT.get(method, 6), e
    assert e.nll_after >= e.nll_before + NLL_RISE[method], e
    # utility: BalancedSubnet keeps held-out loss close; Subnet (no retain term) may lose more
    bound = 0.1 if method == "balanced_subnet" else 1.5
    assert held_loss(model, held_out) <= held_loss(base, held_out) + bound
    # exactly floor(ratio * numel) weights of each MLP matrix were zeroed (none were zero before)
    for (n, p), (_, p0) in zip(mlp_parameters(model), mlp_parameters(base), strict=True):
        if n.endswith("weight"):
            assert int((p == 0).sum()) - int((p0 == 0).sum()) == int(p.numel() * hp["ratio"]), n


def test_bad_input():
    model = tiny("gpt2")
    m = get_method("balanced_subnet")
    empty = torch.zeros(0, T, dtype=torch.long)
    with pytest.raises(ValueError, match="forget set is empty"):
        UnlearnInputs(empty, empty.bool(), empty, empty.bool())
    rows = torch.zeros(2, T, dtype=torch.long)
    inputs = UnlearnInputs(rows, rows.bool(), rows, rows.bool())
    with pytest.raises(ValueError, match="open interval"):
        m.run(model, inputs, make_config(m, dict(ratio=5)))
    with pytest.raises(ValueError, match="no setting"):
        make_config(m, dict(rate=0.1))
    with pytest.raises(ValueError, match="unknown method"):
        get_method("forgetful")
    with pytest.raises(TypeError, match="no MLP adapter for Linear"):
        mlp_layers(torch.nn.Linear(2, 2))
