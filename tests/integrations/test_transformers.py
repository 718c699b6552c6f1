"""apply_tinymem / apply_masked_subnet on tiny models of every family the adapters know.

Numerical claims use the 2x-reference-error rule: against a float64 copy of the model, the patched
model's error is at most twice the unpatched model's own error (plus a floor of a few float32 ulps of the
value's norm), so no CPU's rounding is assumed. Errors are norms of whole tensors.
"""

import copy
import os

import pytest
import torch
import transformers as hf

from tinymem_fast.integrations import transformers as tt
from tinymem_fast.integrations.adapters import UnsupportedArchitecture, mlp_layers
from tinymem_fast.integrations.transformers import (
    ATTENTION,
    apply_masked_subnet,
    apply_tinymem,
    fold_masked_subnet,
    is_patched,
    masked_subnet_scores,
    unapply_tinymem,
)
from tinymem_fast.ops.attention import causal_attention_available
from tinymem_fast.ops.masked_subnet import MaskedSubnet, subnet_keep_mask, subnet_threshold

V, T, B = 160, 12, 3
ARCHS = ("gpt2", "gpt_neox", "llama", "qwen2", "mistral", "phi3", "gemma")


def config(arch: str):
    # 4 heads of 12; grouped-query attention where the family has it; nothing random at run time
    common = dict(vocab_size=V, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=96, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":
        return hf.GPT2Config(vocab_size=V, n_positions=64, n_embd=48, n_layer=2, n_head=4, n_inner=96,
                             resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=1, eos_token_id=2)
    if arch == "gpt_neox":
        return hf.GPTNeoXConfig(**common, hidden_dropout=0, attention_dropout=0)
    if arch == "llama":
        return hf.LlamaConfig(**common, num_key_value_heads=4)
    if arch == "qwen2":
        return hf.Qwen2Config(**common, num_key_value_heads=2)
    if arch == "mistral":
        return hf.MistralConfig(**common, num_key_value_heads=2)
    if arch == "phi3":
        return hf.Phi3Config(**common, num_key_value_heads=2, pad_token_id=0)
    if arch == "gemma":
        return hf.GemmaConfig(**common, num_key_value_heads=1, head_dim=12)
    raise ValueError(arch)


def build(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = hf.AutoModelForCausalLM.from_config(config(arch))
    with torch.no_grad():  # larger weights than the init's, so attention is not near-uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


def batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(3, V, (B, T), generator=gen)
    labels = x.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[2, 7] = -100
    return x, labels


def err(got, ref) -> float:
    # the norm of the whole error tensor: a max over a few elements is one draw of rounding noise
    return (got.detach().double() - ref.detach().double()).norm().item()


def within_rule(got, base, ref, what: str) -> None:
    e_got, e_base = err(got, ref), err(base, ref)
    floor = 4 * torch.finfo(torch.float32).eps * ref.detach().norm().item() + 1e-30
    assert e_got <= 2 * e_base + floor, f"{what}: error {e_got:.3g} vs the unpatched model's {e_base:.3g}"


def grads_within_rule(got_model, base_model, ref_model, what: str) -> None:
    ref = dict(ref_model.named_parameters())
    base = dict(base_model.named_parameters())
    for name, p in got_model.named_parameters():
        assert p.grad is not None, f"{what}: no gradient for {name}"
        within_rule(p.grad, base[name].grad, ref[name].grad, f"{what} grad {name}")


def kernel_expected() -> bool:
    return causal_attention_available() and os.environ.get("TINYMEM_BACKEND", "").lower() != "torch"


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many attention calls took the fused kernel."""
    calls = []
    real = tt.causal_attention

    def spy(q, k, v, scale=None, **kw):
        calls.append(q.dtype)
        return real(q, k, v, scale=scale, **kw)

    monkeypatch.setattr(tt, "causal_attention", spy)
    return calls


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_logits_loss_and_gradients_match(arch, kernel_calls):
    pytest.importorskip("tinymem_fast.ops.linear_cross_entropy")
    base = build(arch).train()
    ref = copy.deepcopy(base).double()
    got = apply_tinymem(copy.deepcopy(base))
    assert got.config._attn_implementation == ATTENTION and base.config._attn_implementation == "sdpa"
    x, labels = batch()

    with torch.no_grad():
        out = got(x)
        within_rule(out.logits, base(x).logits, ref(x).logits, f"{arch} logits")
    if kernel_expected():
        assert len(kernel_calls) == config(arch).num_hidden_layers  # the fused kernel really ran

    outs = [m(x, labels=labels) for m in (got, base, ref)]
    assert outs[0].logits is None and outs[0].loss.dtype == torch.float32
    within_rule(outs[0].loss, outs[1].loss, outs[2].loss, f"{arch} loss")
    for o in outs:
        o.loss.backward()
    grads_within_rule(got, base, ref, arch)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bf16_autocast(arch):
    pytest.importorskip("tinymem_fast.ops.linear_cross_entropy")
    base = build(arch).train()
    ref = copy.deepcopy(base).double()
    got = apply_tinymem(copy.deepcopy(base))
    x, labels = batch(1)
    with torch.no_grad():
        ref_logits = ref(x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_logits, base_logits = got(x).logits, base(x).logits
    assert got_logits.dtype == base_logits.dtype == torch.bfloat16  # the matmuls did run in bf16
    within_rule(got_logits, base_logits, ref_logits, f"{arch} bf16 logits")

    losses = []
    for m in (got, base):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(m(x, labels=labels).loss)
    losses.append(ref(x, labels=labels).loss)
    # A mean over tokens cancels much of bf16's rounding by chance, so the unpatched loss's own error is
    # no stable yardstick; a token's loss moves by at most 2 max|dz| when its logits move by dz, so the
    # unpatched model's largest logit error bounds what the loss may be off by.
    e_loss = err(losses[0], losses[2])
    bound = 2 * (base_logits.double() - ref_logits).abs().max().item()
    assert e_loss <= bound, f"{arch} bf16 loss error {e_loss:.3g} > {bound:.3g}"
    for loss in losses:
        loss.backward()
    assert all(p.dtype == torch.float32 for p in got.parameters())
    grads_within_rule(got, base, ref, f"{arch} bf16")


def test_num_items_in_batch_shift_labels_and_tuples():
    pytest.importorskip("tinymem_fast.ops.linear_cross_entropy")
    base = build("llama")
    got = apply_tinymem(copy.deepcopy(base))
    x, labels = batch(2)
    n = int((labels[:, 1:] != -100).sum()) + 5  # as if the batch were one of several accumulated ones
    with torch.no_grad():
        for kw in ({"num_items_in_batch": n}, {"num_items_in_batch": torch.tensor(n)}):
            want = base(x, labels=labels, **kw).loss
            assert torch.allclose(got(x, labels=labels, **kw).loss, want, rtol=1e-5, atol=0)
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        want = base(x, labels=labels).loss
        assert torch.allclose(got(x, shift_labels=shifted).loss, want, rtol=1e-5, atol=0)
        assert torch.allclose(got(x, None, None, None, None, labels).loss, want, rtol=1e-5, atol=0)
        tup = got(x, labels=labels, return_dict=False)
        assert isinstance(tup, tuple) and torch.allclose(tup[0], want, rtol=1e-5, atol=0)
        # without labels the original forward runs, logits_to_keep included
        assert got(x, logits_to_keep=1).logits.shape == (B, 1, V)


@pytest.mark.parametrize("arch", ARCHS)
def test_from_config_attn_implementation(arch, kernel_calls):
    model = hf.AutoModelForCausalLM.from_config(config(arch), attn_implementation="tinymem").eval()
    assert model.config._attn_implementation == ATTENTION
    base = build(arch).eval()
    model.load_state_dict(base.state_dict())
    x, _ = batch(3)
    ref = copy.deepcopy(base).double()
    with torch.no_grad():
        within_rule(model(x).logits, base(x).logits, ref(x).logits, f"{arch} from_config logits")
    if kernel_expected():
        assert kernel_calls


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_padding_masks_and_generation_still_work(arch, kernel_calls):
    base = build(arch).eval()
    got = apply_tinymem(copy.deepcopy(base), cross_entropy=False)
    x, _ = batch(4)
    mask = torch.ones_like(x)
    mask[1, :5] = 0  # left padding: the kernel must step aside and the mask must count
    with torch.no_grad():
        want, plain = base(x, attention_mask=mask).logits, base(x).logits
        kernel_calls.clear()
        have = got(x, attention_mask=mask).logits
        assert not kernel_calls
        assert torch.allclose(have, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        assert (plain[1, 5:] - want[1, 5:]).abs().max() > 1e-2 * want.abs().max()  # the mask mattered
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(got.generate(x[:1], **kw), base.generate(x[:1], **kw))


def test_instance_only_and_unapply_restores():
    pytest.importorskip("tinymem_fast.ops.linear_cross_entropy")
    model, other = build("gpt2"), build("gpt2")
    x, labels = batch()
    with torch.no_grad():
        want = model(x, labels=labels)
    apply_tinymem(model)
    assert is_patched(model) and not is_patched(other)
    assert other.config._attn_implementation == "sdpa" and other(x, labels=labels).logits is not None
    with pytest.raises(ValueError, match="already patched"):
        apply_tinymem(model)
    assert unapply_tinymem(model) is model
    assert not is_patched(model) and "forward" not in model.__dict__
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        back = model(x, labels=labels)
    assert torch.equal(back.logits, want.logits) and torch.equal(back.loss, want.loss)
    with pytest.raises(ValueError, match="not patched"):
        unapply_tinymem(model)
    # attention only: labels still give logits
    apply_tinymem(model, cross_entropy=False)
    with torch.no_grad():
        assert model(x, labels=labels).logits is not None
    unapply_tinymem(model)


def test_refusals_leave_the_model_unchanged():
    cfg = hf.Gemma2Config(vocab_size=V, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=12, intermediate_size=96,
                          final_logit_softcapping=30.0)
    model = hf.Gemma2ForCausalLM(cfg)
    impl = model.config._attn_implementation
    with pytest.raises(UnsupportedArchitecture, match="final_logit_softcapping.*cross_entropy=False"):
        apply_tinymem(model)
    assert not is_patched(model) and model.config._attn_implementation == impl
    assert "forward" not in model.__dict__
    with pytest.raises(UnsupportedArchitecture, match="no MLP adapter"):
        apply_tinymem(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="nothing to do"):
        apply_tinymem(build("gpt2"), attention=False, cross_entropy=False)


# --- masked subnet --------------------------------------------------------------------------------


def masked_reference(model, ratio, scores):
    """A deep copy of the plain model with each MLP weight multiplied by its keep mask."""
    ref = copy.deepcopy(model)
    mats = [m for layer in mlp_layers(ref) for m in layer.matrices().values()]
    assert len(mats) == len(scores)
    with torch.no_grad():
        for mod, s in zip(mats, scores, strict=True):
            mod.weight.mul_(subnet_keep_mask(s, subnet_threshold(s, ratio)).to(mod.weight.dtype))
    return ref


@pytest.mark.parametrize("arch", ARCHS)
def test_masked_subnet_forward_step_and_fold(arch):
    ratio = 0.3
    plain = build(arch).eval()
    model = copy.deepcopy(plain)
    scores = apply_masked_subnet(model, ratio, seed=1)
    assert scores == masked_subnet_scores(model) and all(s.requires_grad for s in scores)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(s) for s in scores}
    x, labels = batch(5)

    ref32 = masked_reference(plain, ratio, scores)
    ref64 = copy.deepcopy(ref32).double()
    with torch.no_grad():
        within_rule(model(x).logits, ref32(x).logits, ref64(x).logits, f"{arch} masked logits")

    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(scores, lr=1.0)
    model(x, labels=labels).loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(".scores") for k in changed), sorted(changed)

    with torch.no_grad():
        wrapped = model(x).logits
        folded_model = fold_masked_subnet(model)
        folded = folded_model(x).logits
    assert folded_model is model
    assert not any(isinstance(m, MaskedSubnet) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # the flags from before wrapping
    assert set(model.state_dict()) == set(plain.state_dict())
    assert torch.allclose(folded, wrapped, rtol=1e-5, atol=1e-5 * wrapped.abs().max().item())


def test_masked_subnet_bad_arguments():
    model = build("llama")
    with pytest.raises(ValueError, match="unknown modules 'attention'.*'mlp'"):
        apply_masked_subnet(model, 0.3, modules="attention")
    for bad in (0.0, 1.0, 30):
        with pytest.raises(ValueError, match="open interval"):
            apply_masked_subnet(model, bad)
    with pytest.raises(ValueError, match="score_init"):
        apply_masked_subnet(model, 0.3, score_init="zeros")
    with pytest.raises(UnsupportedArchitecture):
        apply_masked_subnet(torch.nn.Linear(2, 2), 0.3)
    with pytest.raises(ValueError, match="no masked subnet"):
        fold_masked_subnet(model)
    with pytest.raises(ValueError, match="no masked subnet"):
        masked_subnet_scores(model)
    # nothing above touched the model
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, MaskedSubnet) for m in model.modules())
    apply_masked_subnet(model, 0.3)
    with pytest.raises(ValueError, match="already wrapped"):
        apply_masked_subnet(model, 0.3)
    fold_masked_subnet(model)


def test_phi3_neurons_own_both_halves_of_gate_up():
    layer = mlp_layers(build("phi3"))[0]
    assert layer.intermediate_size == 96 and layer.stacked == 2
    assert layer.input_rows(torch.tensor([0, 5])).tolist() == [0, 5, 96, 101]
