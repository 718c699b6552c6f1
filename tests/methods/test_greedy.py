"""Greedy: each iteration zeroes exactly the entry a host-side scan of every tensor would pick, batches are
balanced (or the reference's mixed loader), parameters get their own storage back, GPT-2/GPTNeoX/Llama."""

import copy

import pytest
import torch
from tiny_models import NLL_RISE, unlearning_effect

from tinymem_fast.methods import UnlearnInputs, get_method
from tinymem_fast.methods.registry import make_config
from tinymem_fast.methods.weight.greedy import GreedyBatches, GreedyConfig, greedy_unlearn
from tinymem_fast.tinymem.models import save_model
from tinymem_fast.tinymem.training import token_loss


def _inputs(clean, secret):
    return UnlearnInputs(secret, torch.zeros_like(secret, dtype=torch.bool), clean,
                         torch.zeros_like(clean, dtype=torch.bool))


def host_scan_greedy(model, inputs, cfg, iterations):
    """The straightforward algorithm: backward, then scan every tensor on the host for the best w * grad."""
    model = copy.deepcopy(model).eval()
    batches = GreedyBatches(inputs, cfg)
    params = list(dict.fromkeys(model.parameters()))
    for _ in range(iterations):
        ids, pad, y = batches.next()
        for p in params:
            p.grad = None
        seq, _ = token_loss(model, ids, pad, False)
        (-(y * seq).sum()).backward()
        best, where = None, None
        for pi, p in enumerate(params):
            s = (p.detach() * p.grad).flatten().tolist()
            for j, v in enumerate(s):
                if best is None or v > best:
                    best, where = v, (pi, j)
        with torch.no_grad():
            params[where[0]].view(-1)[where[1]] = 0
    return model


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_same_picks_as_host_scan(planted, arch):
    base, clean, _, secret = planted[arch]
    inputs = _inputs(clean[:64], secret)
    cfg = GreedyConfig(ratio=4 / sum(p.numel() for p in dict.fromkeys(base.parameters())) + 1e-12,
                       batch_size=8, seed=5)
    want = host_scan_greedy(base, inputs, cfg, iterations=4)
    model = copy.deepcopy(base)
    info = greedy_unlearn(model, inputs, cfg)
    assert info["iterations"] == 4 and info["zeroed"] == 4
    for (n, p), q in zip(model.named_parameters(), want.parameters(), strict=True):
        assert torch.equal(p, q), n
    changed = sum(int((p != p0).sum()) for p, p0 in zip(model.parameters(), base.parameters(), strict=True))
    assert changed == info["zeroed_nonzero"] and 1 <= changed <= 4


def test_parameters_get_their_storage_back(planted, tmp_path):
    base, clean, _, secret = planted["gpt2"]
    model = copy.deepcopy(base)
    greedy_unlearn(model, _inputs(clean[:32], secret), GreedyConfig(ratio=1e-4, batch_size=8))
    ptrs = [p.untyped_storage().data_ptr() for p in dict.fromkeys(model.parameters())]
    assert len(set(ptrs)) == len(ptrs)
    assert all(p.grad is None for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight   # tying survives
    save_model(model, str(tmp_path / "m"))                         # safetensors refuses shared storage


def test_balanced_and_mixed_batches(planted):
    _, clean, _, secret = planted["gpt2"]
    inputs = _inputs(clean[:200], secret)
    bal = GreedyBatches(inputs, GreedyConfig(batch_size=8))
    for _ in range(10):
        _, _, y = bal.next()
        assert int((y > 0).sum()) == 4 and int((y < 0).sum()) == 4
    mixed = GreedyBatches(inputs, GreedyConfig(batch_size=8, sampling="mixed"))
    ys = torch.cat([mixed.next()[2] for _ in range(26)])  # one pass over 206 rows (and a little more)
    assert int((ys > 0).sum()) >= 6 and ys.numel() == 208


def test_bad_settings():
    m = get_method("greedy")
    with pytest.raises(ValueError, match="sampling"):
        make_config(m, {"sampling": "random"})
    with pytest.raises(ValueError, match="open interval"):
        make_config(m, {"ratio": 0.0})


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_greedy_runs_and_unlearns(planted, arch):
    base, clean, _, secret = planted[arch]
    model = copy.deepcopy(base)
    m = get_method("greedy")
    cfg = make_config(m, dict(ratio=2e-3, batch_size=16, weights_per_step=4))
    info = m.run(model, _inputs(clean, secret), cfg)
    assert info["zeroed"] >= 1 and info["iterations"] == -(-info["zeroed"] // 4)
    pad = torch.zeros_like(secret, dtype=torch.bool)
    with torch.no_grad():
        f0, f1 = (token_loss(x, secret, pad, False)[0].mean().item() for x in (base, model))
    assert f1 > f0  # forget loss ascends
    e = unlearning_effect(base, model, secret, f"greedy {arch}")
    assert e.nll_after >= e.nll_before + NLL_RISE["greedy"], e


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bf16_greedy_unlearns(planted, arch):
    """precision=bf16: bf16 GEMMs under autocast, float32 weights, gradients and scores; the forget loss
    still rises by the fp32 test's margin."""
    base, clean, _, secret = planted[arch]
    model = copy.deepcopy(base)
    m = get_method("greedy")
    cfg = make_config(m, dict(ratio=2e-3, batch_size=16, weights_per_step=4, precision="bf16"))
    info = m.run(model, _inputs(clean, secret), cfg)
    assert info["zeroed"] >= 1 and info["iterations"] == -(-info["zeroed"] // 4)
    e = unlearning_effect(base, model, secret, f"greedy {arch} bf16")
    assert e.nll_after >= e.nll_before + NLL_RISE["greedy"], e
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ValueError, match="unknown precision"):
        make_config(m, {"precision": "fp16"})


def test_repeated_rows_weighted_by_count(planted):
    """A forget row drawn twice in a batch runs once with weight 2: the weights are y times the count
    and add up to the batch's signed size."""
    _, clean, _, secret = planted["gpt2"]
    batches = GreedyBatches(_inputs(clean[:40], secret[:3]), GreedyConfig(batch_size=16, seed=1))
    batch, w = batches.step()
    assert batch.sizes[0] == 3 and batch.ids.shape[0] == 3 + 8      # 8 forget draws of 3 rows
    assert float(w[:3].sum()) == 8.0 and torch.equal(w[3:], -torch.ones(8))


def test_non_finite_objective_names_the_iteration(planted):
    base, clean, _, secret = planted["gpt2"]
    model = copy.deepcopy(base)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    msg = r"greedy objective became non-finite \(nan\) at iteration 0$"
    with pytest.raises(FloatingPointError, match=msg):
        greedy_unlearn(model, _inputs(clean[:32], secret), GreedyConfig(ratio=1e-4, batch_size=8))
    assert all(p.grad is None for p in model.parameters())  # own storage back, no flat gradient left
