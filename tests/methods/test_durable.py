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
from tinymem_fast.methods.weight.durable import _zero_, forget_gradient, top_k_mask
from tinymem_fast.methods.weight.topk import top_k_masks
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


def _concat_reference(keys, k):
    """The masks of top_k_mask on the concatenation, split back (what top_k_masks must equal)."""
    mask = top_k_mask(torch.cat([key.reshape(-1) for key in keys]), k)
    return [m.view(key.shape) for m, key in zip(mask.split([key.numel() for key in keys]), keys, strict=True)]


def _boundary_ks(keys):
    """0, 1, total, and every k at, just below and just above a boundary between tied groups."""
    flat = torch.cat([key.reshape(-1).double() for key in keys])
    total = flat.numel()
    ks = {0, 1, total - 1, total}
    for v in flat.unique():
        for edge in (int((flat > v).sum()), int((flat >= v).sum())):
            ks |= {edge - 1, edge, edge + 1}
    return sorted(x for x in ks if 0 <= x <= total)


SHAPES = [(0,), (), (3, 5), (1,), (2, 0, 4), (17,), (4, 4, 4), (6, 1)]


def _check_masks(keys, ks=None):
    for k in ks if ks is not None else _boundary_ks(keys):
        want = _concat_reference(keys, k)
        got = top_k_masks(keys, k)
        assert len(got) == len(keys)
        for w, g, key in zip(want, got, keys, strict=True):
            assert g.dtype == torch.bool and g.shape == key.shape and g.device == key.device
            assert torch.equal(g, w), (k, [key.dtype for key in keys])
        assert sum(int(g.sum()) for g in got) == k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, "mixed"])
@pytest.mark.parametrize("seed", [0, 1])
def test_top_k_masks_equals_concat_reference_with_ties(dtype, seed):
    """Values from a few integers (many ties across and within tensors, zeros and -0.0 among them), in
    shapes with empty and 0-d tensors, at every tie boundary."""
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    keys = []
    for j, shape in enumerate(SHAPES):
        x = torch.randint(0, 4, shape, generator=g).float() * 0.75
        x[torch.rand(shape, generator=g) < 0.2] = -0.0
        keys.append(x.to(dtypes[j % 3] if dtype == "mixed" else dtype))
    _check_masks(keys)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_k_masks_neighbouring_values(dtype):
    """Values one ulp apart (they differ only in the last radix digit), subnormals, inf, and repeats."""
    one = torch.tensor(1.0, dtype=dtype)
    up = [one]
    for _ in range(4):
        up.append(torch.nextafter(up[-1], torch.tensor(2.0, dtype=dtype)))
    tiny = torch.nextafter(torch.tensor(0.0, dtype=dtype), one)
    more = [tiny, 2 * tiny] + [torch.tensor(v, dtype=dtype) for v in (0.0, -0.0, float("inf"), 3.0e38)]
    pool = torch.stack(up + more)
    g = torch.Generator().manual_seed(2)
    keys = [pool[torch.randint(0, len(pool), shape, generator=g)] for shape in SHAPES]
    _check_masks(keys)


def test_top_k_masks_continuous_values():
    """Distinct values (each tie group a single entry): the path that takes every tie in one mask pass."""
    g = torch.Generator().manual_seed(3)
    keys = [torch.rand(shape, generator=g) for shape in [(64, 33), (0, 5), (7,), (), (128,)]]
    total = sum(key.numel() for key in keys)
    _check_masks(keys, [0, 1, 2, 37, total // 2, total - 1, total])


def test_top_k_masks_deterministic_mode_counts_by_bincount():
    g = torch.Generator().manual_seed(4)
    keys = [torch.randint(0, 3, shape, generator=g).float() for shape in SHAPES]
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _check_masks(keys)
    finally:
        torch.use_deterministic_algorithms(was)


def test_top_k_masks_errors():
    keys = [torch.ones(3), torch.zeros(0), torch.tensor(2.0)]
    assert [m.tolist() for m in top_k_masks(keys, 0)] == [[False] * 3, [], False]
    assert [m.tolist() for m in top_k_masks(keys, 4)] == [[True] * 3, [], True]
    assert top_k_masks([], 0) == []
    for k in (-1, 5):
        with pytest.raises(ValueError, match=r"k must be in \[0, 4\]"):
            top_k_masks(keys, k)
    for k in (0, 2, 4):   # like top_k_mask: NaN raises whatever k is
        with pytest.raises(ValueError, match="NaN"):
            top_k_masks([torch.ones(3), torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)], k)
        with pytest.raises(ValueError, match="non-negative"):
            top_k_masks([torch.ones(3), torch.tensor([1.0, -1e-3])], k)
    with pytest.raises(ValueError, match="floating point"):
        top_k_masks([torch.ones(3, dtype=torch.int64)], 1)
    key = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0, 2.0])
    before = key.clone()
    assert top_k_masks([key[:3], key[3:]], 2)[0].tolist() == [False, True, True]
    assert torch.equal(key, before)     # keys are read, never written


@pytest.mark.parametrize("arch", ARCHS)
def test_durable_aggregate_unchanged_from_concat_selection(planted, arch):
    """The method's result equals the previous implementation: |grad| concatenated, top_k_mask, split."""
    base, clean, _, secret = planted[arch]
    for ratio in (0.01, 0.3):
        model, info = _run("durable_aggregate", base, clean, secret, ratio=ratio, batch_size=4)
        old = copy.deepcopy(base)
        params, grads, _ = forget_gradient(old, _inputs(clean, secret), 4, False)
        flat = torch.cat([g.abs().reshape(-1) for g in grads])
        mask = top_k_mask(flat, num_dropped(flat.numel(), ratio))
        zeroed = _zero_(params, [m.view(g.shape) for m, g in
                                 zip(mask.split([g.numel() for g in grads]), grads, strict=True)])
        assert info["zeroed"] == zeroed
        for (n, p), (_, p0) in zip(model.named_parameters(), old.named_parameters(), strict=True):
            assert torch.equal(p, p0), n


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


def test_bf16_forget_gradient_is_float32(planted):
    """precision=bf16: the accumulated gradient is a float32 tensor per MLP parameter, close to the fp32
    one (and not equal to it: the bf16 GEMMs ran)."""
    base, clean, _, secret = planted["gpt2"]
    inputs = _inputs(clean, secret)
    _, g32, _ = forget_gradient(copy.deepcopy(base), inputs, 4, False)
    _, g16, _ = forget_gradient(copy.deepcopy(base), inputs, 4, False, precision="bf16")
    for a, b in zip(g32, g16, strict=True):
        assert b.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(a.reshape(-1), b.reshape(-1), dim=0)
        assert cos > 0.99, float(cos)
    assert any(not torch.equal(a, b) for a, b in zip(g32, g16, strict=True))


@pytest.mark.parametrize("name", ["durable", "durable_aggregate"])
def test_bf16_durable_reduces_extraction(planted, name):
    base, clean, _, secret = planted["gpt2"]
    model, info = _run(name, base, clean, secret, ratio=0.1, precision="bf16")
    e = tsu.unlearning_effect(base, model, secret, f"{name} gpt2 bf16")
    assert e.nll_after >= e.nll_before + tsu.NLL_RISE[name], e
    assert all(p.dtype == torch.float32 for p in model.parameters())
    _check_untouched(model, base)
    with pytest.raises(ValueError, match="unknown precision"):
        make_config(get_method(name), {"precision": "half"})


def test_non_finite_forget_loss_names_the_batch(planted):
    base, clean, _, secret = planted["gpt2"]
    model = copy.deepcopy(base)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"forget loss became non-finite \(nan\) at batch 0$"):
        forget_gradient(model, _inputs(clean, secret), 4, False)
    assert all(p.requires_grad for p in model.parameters()) and not model.training
