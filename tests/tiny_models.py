"""Tiny GPT-2 / GPTNeoX / Llama models with planted memorized rows, shared by the method tests
(the ``planted`` fixture in conftest.py builds them once per session)."""

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from tinymem_fast.training import token_loss

V, T, P = 24, 24, 8  # vocab, length, prompt


def tiny(arch: str):
    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=T, n_embd=48, n_layer=2, n_head=2,
                                          n_inner=192, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                          bos_token_id=None, eos_token_id=None))
    if arch == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=48, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=192,
                                                max_position_embeddings=T, hidden_dropout=0,
                                                attention_dropout=0))
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=48, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, intermediate_size=128,
                                        max_position_embeddings=T))


def rule_rows(n, gen):
    """Clean data: each row counts up by a row-specific step (mod V) from a random start."""
    start = torch.randint(0, V, (n, 1), generator=gen)
    step = torch.randint(1, 3, (n, 1), generator=gen)
    return (start + step * torch.arange(T)) % V


def make_planted():
    """Per architecture: a model trained on clean rows plus 6 random rows it overfits (the memorized set)."""
    out = {}
    for arch in ("gpt2", "gpt_neox", "llama"):
        gen = torch.Generator().manual_seed(1)
        clean, held_out = rule_rows(512, gen), rule_rows(128, gen)
        secret = torch.randint(0, V, (6, T), generator=gen)
        model = tiny(arch)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        pad = torch.zeros(40, T, dtype=torch.bool)
        for _ in range(250):
            idx = torch.randint(0, 512, (34,), generator=gen)
            x = torch.cat([clean[idx], secret])
            loss = token_loss(model, x, pad, False)[0].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        out[arch] = (model, clean, held_out, secret)
    return out


def held_loss(model, rows):
    with torch.no_grad():
        return token_loss(model, rows, torch.zeros_like(rows, dtype=torch.bool), False)[0].mean().item()
