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


def test_one_joint_forward_equals_separate_passes(planted):
    """RowGroups + group_losses: forget and retain rows in one padded-trimmed batch give the same per-row
    losses as a pass over each set alone at full width."""
    from tinymem_fast.methods.steps import RowGroups, group_losses
    from tinymem_fast.tinymem.training import token_loss

    base, clean, _, secret = planted["gpt2"]
    pad_c = torch.zeros_like(clean, dtype=torch.bool)
    pad_c[::2, -3:] = True  # some right padding: the batch is cut to its longest content row
    pad_s = torch.zeros_like(secret, dtype=torch.bool)
    rows = RowGroups([(secret, pad_s), (clean, pad_c)], loss_on_pad=False)
    pf, pr = torch.tensor([1, 0, 1, 1]), torch.tensor([2, 4, 6])
    batch = rows.batch([pf, pr])
    # the forget row drawn three times is computed once and counted three times
    assert batch.sizes == [2, 3] and batch.ids.shape == (5, T)
    lf, lr_ = group_losses(base, batch, False)
    ref_f, _ = token_loss(base, secret[pf], pad_s[pf], False)
    ref_r, _ = token_loss(base, clean[pr], pad_c[pr], False)
    torch.testing.assert_close(lf, ref_f.mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lr_, ref_r.mean(), atol=1e-5, rtol=1e-5)
    # only padded rows: the batch is cut to their content
    batch = RowGroups([(clean, pad_c)], loss_on_pad=False).batch([torch.tensor([0, 2])])
    assert batch.ids.shape[1] == T - 3 and not batch.pad.any() and batch.counts == [None]


def test_loss_watch_names_the_steps():
    from tinymem_fast.methods.steps import LossWatch

    w = LossWatch(torch.device("meta"), every=4)  # a device where reads are deferred
    for step in range(3):
        w.add(step, torch.tensor(1.0), forget_loss=torch.tensor(2.0))
    w.add(3, torch.tensor(1.0))
    w.add(4, torch.tensor(float("nan")))
    w.add(5, torch.tensor(1.0))
    w.add(6, torch.tensor(1.0))
    with pytest.raises(FloatingPointError, match="between steps 4 and 7"):
        w.add(7, torch.tensor(1.0))
    on_cpu = LossWatch(torch.device("cpu"), every=50)  # every step on the CPU: reads cost nothing
    on_cpu.add(0, torch.tensor(1.0), forget_loss=torch.tensor(2.0))
    assert on_cpu.floats() == {"forget_loss": 2.0}
    with pytest.raises(FloatingPointError, match=r"non-finite \(inf\) at step 1"):
        on_cpu.add(1, torch.tensor(float("inf")))


def test_failed_edit_leaves_the_model_unchanged(planted):
    """A loss that turns non-finite raises, and the model gets its own modules and weights back."""
    base = planted["gpt2"][0]
    model = copy.deepcopy(base)
    m = get_method("subnet")
    secret = planted["gpt2"][3]
    zpad = torch.zeros_like(secret, dtype=torch.bool)
    modules_before = [type(mod) for mod in model.modules()]
    with torch.no_grad():  # a weight of inf makes the forget loss non-finite at the first step
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match="non-finite"):
        m.run(model, UnlearnInputs(secret, zpad, secret, zpad), make_config(m, dict(ratio=0.1, epochs=2)))
    assert [type(mod) for mod in model.modules()] == modules_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", ["balanced_subnet", "subnet"])
def test_bf16_edit_removes_planted_sequences(planted, method):
    """precision=bf16: bf16 GEMMs under autocast, float32 scores; the planted rows are still forgotten."""
    base, clean, _, secret = planted["gpt2"]
    model = copy.deepcopy(base)
    m = get_method(method)
    hp = dict(ratio=0.05, lr=1.0, batch_size=16, loss_weight=0.9, epochs=4, forget_batch_size=6,
              retain_batch_size=16, precision="bf16") if method == "balanced_subnet" \
        else dict(ratio=0.1, lr=1.0, batch_size=16, epochs=20, precision="bf16")
    zpad = torch.zeros_like(secret, dtype=torch.bool)
    m.run(model, UnlearnInputs(secret, zpad, clean, torch.zeros_like(clean, dtype=torch.bool)),
          make_config(m, hp))
    e = unlearning_effect(base, model, secret, f"{method} bf16")
    assert e.extracted_after <= MAX_LEFT.get(method, 6), e
    assert all(p.dtype == torch.float32 for p in model.parameters())
