"""Neuron ablation helper (top_neurons, ablate_neurons, mlp_activation_hook) and the Activations method on
tiny GPT-2, GPTNeoX and Llama models."""

import copy

import pytest
import tiny_models as S
import torch

from tinymem_fast.integrations.adapters import mlp_layers
from tinymem_fast.methods import UnlearnInputs, get_method
from tinymem_fast.methods.neuron.ablation import ablate_neurons, mlp_activation_hook, top_neurons
from tinymem_fast.methods.neuron.activations import activation_attribution, mean_activations
from tinymem_fast.methods.registry import make_config
from tinymem_fast.ops.masked_subnet import layout_of
from tinymem_fast.tinymem.memorization import score_windows

ARCHS = ["gpt2", "gpt_neox", "llama"]


def hooked(model, x):
    acts = {}
    with torch.no_grad(), mlp_activation_hook(model, lambda li, a: acts.__setitem__(li, a.clone())):
        logits = model(x).logits
    return acts, logits


def input_neuron_zero(layer):
    """[I] bool: neurons whose input weights (every input module) are all zero."""
    dead = torch.ones(layer.intermediate_size, dtype=torch.bool)
    for mod in layer.inputs.values():
        w = mod.weight.detach()
        dead &= (w == 0).all(0) if layout_of(mod) == "conv1d" else (w == 0).all(1)
    return dead


@pytest.mark.parametrize("arch", ARCHS)
def test_ablate_neurons_zeroes_exactly_the_chosen_neurons(arch):
    model = S.tiny(arch).eval()
    base = copy.deepcopy(model)
    chosen = {0: torch.tensor([3, 17, 5]), 1: torch.tensor([0, 100])}
    x = torch.randint(0, S.V, (3, S.T), generator=torch.Generator().manual_seed(0))
    acts0, logits0 = hooked(model, x)
    assert all(bool((acts0[li][..., idx] != 0).any()) for li, idx in chosen.items())
    assert ablate_neurons(model, chosen) == 5
    # expected parameters: the base's, with exactly the chosen input rows/columns and bias entries zeroed
    expected = copy.deepcopy(base)
    with torch.no_grad():
        for li, idx in chosen.items():
            for mod in mlp_layers(expected)[li].inputs.values():
                if layout_of(mod) == "conv1d":
                    mod.weight[:, idx] = 0
                else:
                    mod.weight[idx, :] = 0
                if mod.bias is not None:
                    mod.bias[idx] = 0
    n_changed = 0
    for (n, p), (_, e), (_, b) in zip(model.named_parameters(), expected.named_parameters(),
                                      base.named_parameters(), strict=True):
        assert torch.equal(p, e), n
        n_changed += int((p != b).sum())
    d = 48
    per_neuron = {"gpt2": d, "gpt_neox": d, "llama": 2 * d}[arch]  # (biases start at 0, so unchanged)
    assert n_changed == 5 * per_neuron
    for li, layer in enumerate(mlp_layers(model)):
        dead = input_neuron_zero(layer)
        assert dead.nonzero().flatten().tolist() == sorted(chosen[li].tolist())
    acts1, logits1 = hooked(model, x)
    for li, idx in chosen.items():
        assert bool((acts1[li][..., idx] == 0).all()), "ablated neurons must output exactly 0"
        keep = torch.ones(acts1[li].shape[-1], dtype=torch.bool)
        keep[idx] = False
        assert bool((acts1[li][..., keep] != 0).any())
    assert not torch.allclose(logits0, logits1)


def test_ablate_neurons_phi3_zeroes_both_halves_of_the_stacked_matrix():
    """Phi-3 keeps gate and up in one gate_up_proj: neuron i owns rows i and I + i; both are zeroed, and
    the neuron's activation act(gate) * up is exactly 0 (whatever the activation's value at 0)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(vocab_size=S.V, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2, intermediate_size=40,
                                       max_position_embeddings=S.T, pad_token_id=0)).eval()
    base = copy.deepcopy(model)
    chosen = {1: torch.tensor([2, 39])}
    assert ablate_neurons(model, chosen) == 2
    w, w0 = (mlp_layers(m)[1].inputs["gate_up_proj"].weight.detach() for m in (model, base))
    zeroed = (w != w0).any(1).nonzero().flatten().tolist()
    assert zeroed == [2, 39, 42, 79] and bool((w[[2, 39, 42, 79]] == 0).all())
    x = torch.randint(0, S.V, (2, 9), generator=torch.Generator().manual_seed(1))
    acts, _ = hooked(model, x)
    assert bool((acts[1][..., [2, 39]] == 0).all()) and bool((acts[1][..., :2] != 0).any())


def test_ablate_neurons_bad_input():
    model = S.tiny("gpt2")
    with pytest.raises(IndexError, match="layer 5"):
        ablate_neurons(model, {5: torch.tensor([0])})
    with pytest.raises(IndexError, match="out of range"):
        ablate_neurons(model, {0: torch.tensor([192])})
    assert ablate_neurons(model, {0: torch.tensor([1, 1, 2]), 1: torch.tensor([], dtype=torch.long)}) == 2


def test_hook_is_removed():
    model = S.tiny("llama")
    seen = []
    with mlp_activation_hook(model, lambda li, a: seen.append((li, tuple(a.shape)))):
        model(torch.zeros(2, 5, dtype=torch.long))
    assert seen == [(0, (2, 5, 128)), (1, (2, 5, 128))]
    model(torch.zeros(2, 5, dtype=torch.long))
    assert len(seen) == 2


def test_top_neurons_count_and_ties():
    a = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                      [0.0] * 10])
    assert [t.tolist() for t in top_neurons(a, 0.25).values()] == [[1, 2], [0, 1]]
    assert [t.tolist() for t in top_neurons(a, 0.3).values()] == [[1, 2, 4], [0, 1, 2]]  # exact floor: 3
    assert [t.tolist() for t in top_neurons(a, 0.05).values()] == [[], []]
    big = torch.rand(3, 16384, generator=torch.Generator().manual_seed(0))
    top = top_neurons(big, 0.01)
    for li, idx in top.items():
        assert idx.numel() == 163
        assert float(big[li, idx].min()) >= float(big[li].topk(163).values.min())
    with pytest.raises(ValueError, match="NaN"):
        top_neurons(torch.tensor([[float("nan"), 1.0]]), 0.5)


def test_attribution_positions_rule():
    """Rows average positions start-1 .. last non-pad; pad tokens after it never contribute."""
    model = S.tiny("gpt2").eval()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, S.V, (3, S.T), generator=gen)
    pad = torch.zeros(3, S.T, dtype=torch.bool)
    pad[1, 6:] = True              # pad-heavy row: only positions 0..5 are real
    start = torch.tensor([8, 3, 1])
    inputs = UnlearnInputs(ids, pad, ids, pad, start)
    mean = mean_activations(model, inputs, batch_size=2)
    acts, _ = hooked(model, ids)
    lo, hi = [7, 2, 0], [S.T - 1, 5, S.T - 1]
    for li in range(2):
        want = torch.stack([acts[li][r, lo[r]: hi[r] + 1].mean(0) for r in range(3)]).mean(0)
        torch.testing.assert_close(mean[li], want, rtol=1e-5, atol=1e-6)
    # other token ids in the pad region change nothing
    ids2 = ids.clone()
    ids2[1, 6:] = (ids[1, 6:] + 7) % S.V
    attr = activation_attribution(model, inputs)
    attr2 = activation_attribution(model, UnlearnInputs(ids2, pad, ids2, pad, start))
    assert torch.equal(attr, attr2)
    # ... while they would if the pad mask did not mark them
    nopad = torch.zeros_like(pad)
    assert not torch.equal(activation_attribution(model, UnlearnInputs(ids, nopad, ids, nopad, start)),
                           activation_attribution(model, UnlearnInputs(ids2, nopad, ids2, nopad, start)))
    with pytest.raises(ValueError, match="non-pad"):
        mean_activations(model, UnlearnInputs(ids[:1], torch.ones_like(pad[:1]), ids, pad))




RATIO = 0.2


@pytest.mark.parametrize("arch", ARCHS)
def test_activations_method_reduces_extraction(planted, arch):
    base, clean, held_out, secret = planted[arch]
    before = int(score_windows(base, secret, S.P, S.T).match.sum())
    assert before == secret.shape[0]
    model = copy.deepcopy(base)
    m = get_method("act")
    assert m.name == "activations" and m.category == "neuron"
    zpad = torch.zeros_like(secret, dtype=torch.bool)
    info = m.run(model, UnlearnInputs(secret, zpad, clean, torch.zeros_like(clean, dtype=torch.bool)),
                 make_config(m, dict(ratio=RATIO)))
    inner = mlp_layers(model)[0].intermediate_size
    k = int(RATIO * inner)
    assert info["ablated"] == 2 * k and info["time_edit_s"] >= 0
    for layer in mlp_layers(model):
        assert int(input_neuron_zero(layer).sum()) == k
    e = S.unlearning_effect(base, model, secret, f"activations {arch}")
    print(f"held-out loss {S.held_loss(base, held_out):.3f} -> {S.held_loss(model, held_out):.3f}")
    assert e.nll_after >= e.nll_before + S.NLL_RISE["activations"], e
