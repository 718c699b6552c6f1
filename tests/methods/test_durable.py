"""Durable and DurableAggregate on the tiny planted GPT-2, GPTNeoX and Llama models: exactly the top-|grad|
MLP entries are zeroed (per tensor, or globally), nothing else changes, planted rows are extracted less."""

import copy
import math

import pytest
import tiny_models as tsu
import torch

from tinymem_fast.integrations.adapters import mlp_parameters
from tinymem_fast.methods import UnlearnInputs, get_method
from tinymem_fast.methods.registry import make_config
from tinymem_fast.methods.weight.durable import top_k_mask
from tinymem_fast.ops.masked_subnet import num_dropped
from tinymem_fast.tinymem.memorization import score_windows
from tinymem_fast.tinymem.training import token_loss

ARCHS = ["gpt2", "gpt_neox", "llama"]




def _inputs(clean, secret):
    return UnlearnInputs(secret, torch.zeros_like(secret, dtype=torch.bool), clean,
                         torch.zeros_like(clean, dtype=torch.bool))


def _reference_grads(base, secret, batch_size):
    """The forget gradient by plain autograd: sum over batches of the mean per-sequence loss."""
    model = copy.deepcopy(base).eval()
    pad = torch.zeros_like(secret, dtype=torch.bool)
    for i in range(0, secret.shape[0], batch_size):
        token_loss(model, secret[i: i + batch_size], pad[i: i + batch_size], False)[0].mean().backward()
    return [p.grad.detach().clone() for _, p in mlp_parameters(model)]


def _newly_zero(model, base):
    return [(p == 0) & (p0 != 0) for (_, p), (_, p0) in
            zip(mlp_parameters(model), mlp_parameters(base), strict=True)]


def _check_untouched(model, base):
    mlp = {id(p) for _, p in mlp_parameters(model)}
    for (n, p), (_, p0) in zip(model.named_parameters(), base.named_parameters(), strict=True):
        if id(p) not in mlp:
            assert torch.equal(p, p0), f"non-MLP parameter {n} changed"
        assert p.requires_grad == p0.requires_grad and p.grad is None, n


def _run(name, base, clean, secret, **hp):
    model = copy.deepcopy(base)
    m = get_method(name)
    info = m.run(model, _inputs(clean, secret), make_config(m, hp))
    return model, info


def test_top_k_mask_ties_by_index():
    key = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0, 2.0])
    assert top_k_mask(key, 2).tolist() == [False, True, True, False, False, False]
    assert top_k_mask(key, 4).tolist() == [False, True, True, False, True, True]
    assert not top_k_mask(key, 0).any()
    assert top_k_mask(key, 6).all()
    with pytest.raises(ValueError, match="NaN"):
        top_k_mask(torch.tensor([1.0, float("nan")]), 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_durable_zeroes_top_grad_per_tensor(planted, arch):
    base, clean, _, secret = planted[arch]
    assert all(int((p == 0).sum()) == 0 for _, p in mlp_parameters(base)), "fixture: no zeros before"
    ratio, bs = 0.05, 4
    model, info = _run("durable", base, clean, secret, ratio=ratio, batch_size=bs)
    assert info["grad_passes"] == math.ceil(secret.shape[0] / bs)
    zero = _newly_zero(model, base)
    grads = _reference_grads(base, secret, bs)
    total = 0
    for (n, p), z, g in zip(mlp_parameters(model), zero, grads, strict=True):
        k = num_dropped(p.numel(), ratio)
        assert int(z.sum()) == k, n
        # the zeroed entries are the k largest |grad| (stable sort: ties by flat index)
        top = torch.sort(g.abs().reshape(-1), descending=True, stable=True).indices[:k]
        assert torch.equal(torch.nonzero(z.reshape(-1)).reshape(-1), top.sort().values), n
        total += k
    assert info["zeroed"] == total
    _check_untouched(model, base)


@pytest.mark.parametrize("arch", ARCHS)
def test_durable_aggregate_zeroes_global_top_grad(planted, arch):
    base, clean, _, secret = planted[arch]
    ratio, bs = 0.05, 4
    model, info = _run("durable_agg", base, clean, secret, ratio=ratio, batch_size=bs)
    zero = torch.cat([z.reshape(-1) for z in _newly_zero(model, base)])
    k = num_dropped(zero.numel(), ratio)
    assert int(zero.sum()) == k == info["zeroed"]
    g = torch.cat([g.abs().reshape(-1) for g in _reference_grads(base, secret, bs)])
    top = torch.sort(g, descending=True, stable=True).indices[:k]
    assert torch.equal(torch.nonzero(zero).reshape(-1), top.sort().values)
    # layers with larger gradients lose more than a uniform split would take
    per_tensor = [int(z.sum()) for z in _newly_zero(model, base)]
    uniform = [num_dropped(p.numel(), ratio) for _, p in mlp_parameters(base)]
    assert per_tensor != uniform
    _check_untouched(model, base)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["durable", "durable_aggregate"])
def test_durable_reduces_extraction(planted, arch, name):
    base, clean, _, secret = planted[arch]
    before = score_windows(base, secret, tsu.P, tsu.T).match
    assert before.all(), "fixture: the planted rows must be memorized"
    model, _ = _run(name, base, clean, secret, ratio=0.1)
    e = tsu.unlearning_effect(base, model, secret, f"{name} {arch}")
    assert e.nll_after >= e.nll_before + tsu.NLL_RISE[name], e


def test_config_and_names():
    for name, alias in [("durable", "durable"), ("durable_aggregate", "durable_agg")]:
        m = get_method(alias)
        assert m.name == name
        with pytest.raises(ValueError, match="open interval"):
            make_config(m, dict(ratio=5))
        with pytest.raises(ValueError, match="no setting"):
            make_config(m, dict(rate=0.1))
        assert make_config(m, dict(ratio=0.02)).ratio == 0.02
