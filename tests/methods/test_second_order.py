"""Second-Order Unlearning: the Fisher inverse built from batched per-example gradients equals the rank-1
Sherman-Morrison loop over separately computed per-example gradients; cycling; only MLP tensors edited."""

import copy

import pytest
import torch
from tiny_models import NLL_RISE, unlearning_effect

from tinymem_fast.methods import UnlearnInputs, get_method
from tinymem_fast.methods.registry import make_config
from tinymem_fast.methods.weight.second_order import (
    PerExampleGrads,
    SecondOrderConfig,
    fisher_inverse_diagonals,
    gradient_groups,
)
from tinymem_fast.tinymem.training import token_loss


def _inputs(clean, secret):
    return UnlearnInputs(secret, torch.zeros_like(secret, dtype=torch.bool), clean,
                         torch.zeros_like(clean, dtype=torch.bool))


def sherman_morrison_diagonals(model, rows, groups, tensors_of, block, damping):
    """One gradient per group by its own backward (grads cleared each time), then rank-1 updates in fp64."""
    model = copy.deepcopy(model).eval()
    tensors = tensors_of(model)
    m = len(groups)
    finv = []
    for t in tensors:
        n = t.numel()
        sizes = [block] * (n // block) + ([n % block] if n % block else [])
        finv.append([torch.eye(s, dtype=torch.float64) / damping for s in sizes])
    for grp in groups:
        x = rows[grp]
        loss = token_loss(model, x, torch.zeros_like(x, dtype=torch.bool), False)[0].mean()
        gs = torch.autograd.grad(loss, tensors)
        for blocks, g in zip(finv, gs, strict=True):
            flat = g.reshape(-1).double()
            off = 0
            for bi, f in enumerate(blocks):
                v = flat[off: off + f.shape[0]]
                off += f.shape[0]
                fg = f @ v
                blocks[bi] = f - torch.outer(fg, fg) / (m + v @ fg)
    return [torch.cat([f.diagonal() for f in blocks]).view(t.shape)
            for blocks, t in zip(finv, tensors, strict=True)]


def test_gradient_groups_cycle():
    groups, w = gradient_groups(3, 5, 1)
    assert [g.tolist() for g in groups] == [[0], [1], [2]] and w.tolist() == [2, 2, 1]
    groups, w = gradient_groups(4, 3, 2)
    assert [g.tolist() for g in groups] == [[0, 1], [2, 3], [0, 1]] and w.tolist() == [1, 1, 1]


@pytest.mark.parametrize("arch,grad_batch", [("gpt2", 1), ("llama", 1), ("gpt_neox", 2)])
def test_fisher_matches_rank1_loop(planted, arch, grad_batch):
    base, clean, _, secret = planted[arch]
    cfg = SecondOrderConfig(sou_num_grads=9, sou_grad_batch=grad_batch, sou_block_size=7, sou_damping=1e-3,
                            batch_size=4)
    tensors, diags = fisher_inverse_diagonals(copy.deepcopy(base), _inputs(clean, secret), cfg)
    groups = [(torch.arange(9 * grad_batch) % secret.shape[0]).view(9, grad_batch)[j] for j in range(9)]

    def tensors_of(model):
        return PerExampleGrads(model, True).tensors()

    want = sherman_morrison_diagonals(base, secret, groups, tensors_of, 7, 1e-3)
    assert len(diags) == len(want)
    for d, w in zip(diags, want, strict=True):
        torch.testing.assert_close(d, w, rtol=1e-5, atol=1e-9)


def test_only_mlp_tensors_edited_top_k(planted):
    base, clean, _, secret = planted["gpt2"]
    model = copy.deepcopy(base)
    m = get_method("obs")
    info = m.run(model, _inputs(clean, secret), make_config(m, dict(ratio=0.05, sou_num_grads=32)))
    hooks = PerExampleGrads(model, True)
    mlp = {id(t) for t in hooks.tensors()}
    for (n, p), p0 in zip(model.named_parameters(), base.parameters(), strict=True):
        if id(p) not in mlp:
            assert torch.equal(p, p0), n
        assert p.grad is None and p.requires_grad == p0.requires_grad
    newly = sum(int(((p == 0) & (p0 != 0)).sum())
                for p, p0 in zip(model.parameters(), base.parameters(), strict=True))
    assert newly <= info["zeroed"] and info["zeroed"] == sum(int(0.05 * t.numel()) for t in hooks.tensors())


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_second_order_runs(planted, arch):
    base, clean, _, secret = planted[arch]
    model = copy.deepcopy(base)
    m = get_method("second_order")
    m.run(model, _inputs(clean, secret), make_config(m, dict(ratio=0.05, sou_num_grads=64)))
    e = unlearning_effect(base, model, secret, f"second_order {arch}")
    assert e.nll_after >= e.nll_before + NLL_RISE["second_order"], e


def test_bf16_second_order_runs(planted):
    """precision=bf16: bf16 GEMMs in the gradient passes, float32 per-example gradients, float64 Fisher;
    the planted rows' NLL rises by the fp32 test's margin."""
    base, clean, _, secret = planted["gpt2"]
    model = copy.deepcopy(base)
    m = get_method("second_order")
    m.run(model, _inputs(clean, secret), make_config(m, dict(ratio=0.05, sou_num_grads=64, precision="bf16")))
    e = unlearning_effect(base, model, secret, "second_order gpt2 bf16")
    assert e.nll_after >= e.nll_before + NLL_RISE["second_order"], e
    assert all(p.dtype == torch.float32 and p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="unknown precision"):
        make_config(m, {"precision": "float16"})


def test_non_finite_forget_loss_raises(planted):
    base, clean, _, secret = planted["gpt2"]
    model = copy.deepcopy(base)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite .* at gradient pass 0; the Fisher is undefined"):
        fisher_inverse_diagonals(model, _inputs(clean, secret), SecondOrderConfig(sou_num_grads=8))
