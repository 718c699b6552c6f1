"""Integrated Gradients: the shared-prefix computation equals a one-(row, layer, position, step)-at-a-time
loop, ig_steps is honoured, and the method ablates neurons on GPT-2 / GPTNeoX / Llama."""

import copy

import pytest
import torch
from tiny_models import NLL_RISE, P, T, unlearning_effect

from tinymem_fast.integrations.adapters import mlp_layers
from tinymem_fast.methods import UnlearnInputs, get_method
from tinymem_fast.methods.neuron.ablation import mlp_activation_hook
from tinymem_fast.methods.neuron.integrated_gradients import IntegratedGradientsConfig, ig_attribution
from tinymem_fast.methods.registry import make_config


def _inputs(rows, pad=None, start=None):
    pad = torch.zeros_like(rows, dtype=torch.bool) if pad is None else pad
    return UnlearnInputs(rows, pad, rows, pad, start)


def naive_ig(model, ids, pad, start, steps):
    """Straight from the definition: one forward/backward per (row, layer, position, alpha)."""
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    layers = mlp_layers(model)
    total = torch.zeros(len(layers), layers[0].intermediate_size, dtype=torch.float64)
    rows = 0
    for r in range(ids.shape[0]):
        last = int(torch.nonzero(~pad[r]).max())
        positions = list(range(max(int(start[r]) - 1, 0), last))
        if not positions:
            continue
        rows += 1
        per_row = torch.zeros_like(total)
        for li in range(len(layers)):
            for t in positions:
                grad_sum, act_t = 0.0, None
                for a in torch.linspace(0, 1, steps):
                    box = {}

                    def hook(index, act, li=li, t=t, a=a, box=box):
                        if index != li:
                            return None
                        base = act[0, t].detach()
                        leaf = (base * a).requires_grad_(True)
                        box["base"], box["leaf"] = base, leaf
                        out = act.clone()
                        out[0, t] = leaf
                        return out

                    with mlp_activation_hook(model, hook), torch.enable_grad():
                        logits = model(ids[r: r + 1, : last + 1]).logits[0, t]
                        p = torch.softmax(logits.float(), -1)[ids[r, t + 1]]
                        (g,) = torch.autograd.grad(p, [box["leaf"]])
                    grad_sum = grad_sum + g.double()
                    act_t = box["base"].double()
                per_row[li] += act_t * grad_sum / steps
        total += per_row / len(positions)
    return (total / rows).float()


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_batched_equals_naive(planted, arch):
    base, _, _, secret = planted[arch]
    ids = secret[:3, :14].clone()
    pad = torch.zeros_like(ids, dtype=torch.bool)
    pad[1, 11:] = True                       # a padded row ends earlier
    start = torch.tensor([9, 10, 12])        # windows start at different positions
    want = naive_ig(base, ids, pad, start, steps=3)
    got = ig_attribution(copy.deepcopy(base), _inputs(ids, pad, start),
                         IntegratedGradientsConfig(ig_steps=3, batch_size=7))  # chunks split replicas
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 5])
def test_ig_steps_honoured(planted, steps):
    """The reference ran 20 steps whatever it was told: count the replicas (one-token branches after each
    row's prefix, which ends at its last attributed position T - 2) that reach the model."""
    base, _, _, secret = planted["gpt2"]
    model = copy.deepcopy(base)
    ids = secret[:2]
    start = torch.full((2,), T - 4)
    seen = []
    h = model.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(
        (args[0] if args else kwargs["input_ids"]).shape[1] - (T - 1)), with_kwargs=True)
    cfg = IntegratedGradientsConfig(ig_steps=steps, batch_size=10_000)
    ig_attribution(model, _inputs(ids, None, start), cfg)
    h.remove()
    n_layer = len(mlp_layers(model))
    positions = 4  # start - 1 .. T - 2
    assert len(seen) == 2 and sum(seen) == 2 * n_layer * positions * steps


def test_completeness_single_position(planted):
    """With many steps IG's sum approaches p(a) - p(0) when one layer and one position are attributed."""
    base, _, _, secret = planted["gpt2"]
    model = copy.deepcopy(base)
    ids = secret[:1, :10]
    start = torch.tensor([9])  # only position 8 (predicting token 9)
    ig = ig_attribution(model, _inputs(ids, None, start), IntegratedGradientsConfig(ig_steps=400))
    for li in range(ig.shape[0]):
        def zero(index, act, li=li):
            if index == li:
                out = act.clone()
                out[0, 8] = 0
                return out
            return None
        with torch.no_grad():
            p1 = torch.softmax(model(ids).logits[0, 8], -1)[ids[0, 9]]
            with mlp_activation_hook(model, zero):
                p0 = torch.softmax(model(ids).logits[0, 8], -1)[ids[0, 9]]
        assert abs((p1 - p0).item()) > 0.1  # the check means something
        assert abs(ig[li].sum().item() - (p1 - p0).item()) < 0.01


def test_bad_steps():
    with pytest.raises(ValueError, match="ig_steps"):
        make_config(get_method("ig"), {"ig_steps": 0})


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_integrated_gradients_runs_and_ablates(planted, arch):
    base, _, _, secret = planted[arch]
    model = copy.deepcopy(base)
    m = get_method("integrated_gradients")
    start = torch.full((secret.shape[0],), P)
    info = m.run(model, _inputs(secret, None, start), make_config(m, dict(ratio=0.1, ig_steps=4)))
    assert info["ablated"] > 0
    e = unlearning_effect(base, model, secret, f"integrated_gradients {arch}")
    assert e.nll_after >= e.nll_before + NLL_RISE["integrated_gradients"], e


def test_bf16_attribution_close_and_unlearns(planted):
    """precision=bf16: bf16 GEMMs under autocast, float32 scaled activations and gradients; the
    attribution is within a few percent of fp32 (about 0.6% here) and the planted rows' NLL rises by the
    fp32 test's margin."""
    base, _, _, secret = planted["gpt2"]
    inputs = _inputs(secret, None, torch.full((secret.shape[0],), P))
    a32 = ig_attribution(copy.deepcopy(base), inputs, IntegratedGradientsConfig(ig_steps=4))
    a16 = ig_attribution(copy.deepcopy(base), inputs, IntegratedGradientsConfig(ig_steps=4, precision="bf16"))
    assert a16.dtype == torch.float32 and not torch.equal(a16, a32)
    assert ((a16 - a32).norm() / a32.norm()).item() < 0.05
    model = copy.deepcopy(base)
    m = get_method("integrated_gradients")
    m.run(model, inputs, make_config(m, dict(ratio=0.1, ig_steps=4, precision="bf16")))
    e = unlearning_effect(base, model, secret, "integrated_gradients gpt2 bf16")
    assert e.nll_after >= e.nll_before + NLL_RISE["integrated_gradients"], e
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ValueError, match="unknown precision"):
        make_config(m, {"precision": "fp16"})
