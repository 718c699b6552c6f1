"""Shared-prefix branches: each one-token branch's logits equal a separate forward of the prefix up to
its position plus that token, on every model family we support; refusals are loud."""

import types

import pytest
import torch
import transformers as hf
from test_transformers import ARCHS, V, build

from tinymem_fast.integrations.adapters import UnsupportedArchitecture
from tinymem_fast.integrations.branch_attention import (
    BRANCH_ATTENTION,
    branch_attention,
    check_branches_ran,
    shared_prefix_branches,
)

L = 13


def _branches(model, row, positions, tokens):
    prefix = row.numel()
    x = torch.cat([row, tokens])[None]
    position_ids = torch.cat([torch.arange(prefix), positions])[None]
    with shared_prefix_branches(model) as layout:
        layout.set(prefix, positions)
        logits = model(x, position_ids=position_ids, use_cache=False).logits[0]
        check_branches_ran(model, layout)
    return logits[:prefix], logits[prefix:]


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_branches_equal_separate_forwards(arch):
    model = build(arch).eval()
    gen = torch.Generator().manual_seed(1)
    row = torch.randint(3, V, (L,), generator=gen)
    # the first position (no prefix key at all), repeats, the prefix's end and one past it
    positions = torch.tensor([0, 4, 4, 7, L - 1, L])
    tokens = torch.randint(3, V, (positions.numel(),), generator=gen)
    tokens[1] = row[4]  # a branch equal to the clean token reproduces the clean logits
    prefix_logits, got = _branches(model, row, positions, tokens)
    clean = model(row[None]).logits[0]
    torch.testing.assert_close(prefix_logits, clean, rtol=1e-4, atol=1e-5)  # branches never leak back
    for c, (t, w) in enumerate(zip(positions.tolist(), tokens, strict=True)):
        want = model(torch.cat([row[:t], w[None]])[None]).logits[0, -1]
        torch.testing.assert_close(got[c], want, rtol=1e-4, atol=1e-5, msg=f"{arch} branch {c} at {t}")
    torch.testing.assert_close(got[1], clean[4], rtol=1e-4, atol=1e-5)
    assert model.config._attn_implementation != BRANCH_ATTENTION  # restored


def test_branch_gradients_reach_only_their_own_token():
    """d(branch c's logit) / d(input embedding of branch c') is zero for c' != c: branches are independent."""
    model = build("llama").eval()
    row = torch.arange(3, 3 + L)
    positions = torch.tensor([2, 5, 9])
    emb = model.get_input_embeddings()(torch.cat([row, row[positions]]))[None].detach().requires_grad_(True)
    with shared_prefix_branches(model) as layout:
        layout.set(L, positions)
        logits = model(inputs_embeds=emb, position_ids=torch.cat([torch.arange(L), positions])[None]).logits
    (g,) = torch.autograd.grad(logits[0, L + 1].sum(), emb)
    assert g[0, L + 1].abs().sum() > 0 and g[0, :2].abs().sum() > 0     # own token and its prefix
    assert g[0, L].abs().sum() == 0 and g[0, L + 2].abs().sum() == 0    # other branches
    assert g[0, 5:L].abs().sum() == 0                                   # prefix at or after its position


def test_refusals():
    model = build("gpt2").eval()
    with pytest.raises(RuntimeError, match="only inside"):
        q = torch.zeros(1, 1, 2, 4)
        branch_attention(None, q, q, q, None)
    with shared_prefix_branches(model) as layout:
        with pytest.raises(ValueError, match=r"lie in \[0, 4\]"):
            layout.set(4, torch.tensor([5]))
        with pytest.raises(ValueError, match="non-empty"):
            layout.set(4, torch.tensor([], dtype=torch.long))
        with pytest.raises(RuntimeError, match="does not nest"), shared_prefix_branches(model):
            pass
        layout.set(4, torch.tensor([1, 2]))
        with pytest.raises(ValueError, match="branch tokens"):  # the input disagrees with the layout
            model(torch.arange(3, 10)[None], position_ids=torch.tensor([[0, 1, 2, 3, 1, 2, 2]]))
    assert model.config._attn_implementation == "sdpa"

    # a model whose attention bypasses transformers' interface is refused, not run with another mask
    bypass = torch.nn.Linear(2, 2)
    bypass.config = types.SimpleNamespace(_attn_implementation="eager")
    with shared_prefix_branches(bypass) as layout, pytest.raises(UnsupportedArchitecture, match="Attention"):
        layout.set(1, torch.tensor([1]))
        bypass(torch.zeros(1, 2))
        check_branches_ran(bypass, layout)

    cfg = hf.MistralConfig(vocab_size=V, hidden_size=48, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=96, sliding_window=4)
    mistral = hf.AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(UnsupportedArchitecture, match="sliding window"):
        _branches(mistral, torch.arange(3, 3 + L), torch.tensor([2]), torch.tensor([5]))
