"""Tiny GPT-2 / GPTNeoX / Llama models for the scoring and extraction tests, each trained for a few dozen
steps until it reproduces a handful of planted random sequences (so exact matches are not trivial), built
once per process."""

from __future__ import annotations

import functools

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

V, T, P = 40, 28, 8  # vocab, sequence length, prompt
K = 16               # suffix scored (P + K < T: the rows run past the window)
ARCHS = ("gpt2", "gpt_neox", "llama")


def tiny(arch: str, vocab: int = V, ctx: int = 40, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=ctx, n_embd=32, n_layer=2, n_head=2,
                                       n_inner=64, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                       bos_token_id=None, eos_token_id=None))
    elif arch == "gpt_neox":
        m = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64,
                                             max_position_embeddings=ctx, hidden_dropout=0,
                                             attention_dropout=0, bos_token_id=None, eos_token_id=None))
    else:
        m = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                         max_position_embeddings=ctx, bos_token_id=None, eos_token_id=None))
    return m.float().eval()


@functools.cache
def planted(arch: str):
    """(model, secret rows [8, T] it memorizes, other random rows [24, T]) -- the model is trained on the
    secrets only, so their suffixes decode exactly and the other rows' mostly do not."""
    gen = torch.Generator().manual_seed(3)
    secret = torch.randint(0, V, (8, T), generator=gen)
    other = torch.randint(0, V, (24, T), generator=gen)
    model = tiny(arch).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(50):
        loss = model(input_ids=secret, labels=secret).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, secret, other


def probe_rows(arch: str) -> torch.Tensor:
    """Secrets, secrets with one suffix token changed at varied offsets (partial matches), random rows."""
    model, secret, other = planted(arch)
    flipped = secret.clone()
    for r in range(flipped.shape[0]):
        j = P + (3 * r) % K
        flipped[r, j] = (flipped[r, j] + 1) % V
    return torch.cat([secret, flipped, other[:8]])


def generate(model, prefix: torch.Tensor, k: int) -> torch.Tensor:
    """Hugging Face greedy decoding of exactly ``k`` tokens (EOS stopping off), the suffix only."""
    out = model.generate(prefix, attention_mask=torch.ones_like(prefix), do_sample=False, max_new_tokens=k,
                         min_new_tokens=k, eos_token_id=None, pad_token_id=0)
    return out[:, prefix.shape[1]:]
