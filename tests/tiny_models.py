"""Tiny GPT-2 / GPTNeoX / Llama models with planted memorized rows, shared by the method tests
(the ``planted`` fixture in conftest.py builds them once per session)."""

from dataclasses import dataclass

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from tinymem_fast.tinymem.training import token_loss

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


@dataclass
class Effect:
    """What an unlearning run did to the planted rows: rows still extracted (greedy reproduces the whole
    window) and the mean teacher-forced NLL of their windows, before and after."""

    extracted_before: int
    extracted_after: int
    nll_before: float
    nll_after: float

    def __str__(self):
        return (f"extracted {self.extracted_before} -> {self.extracted_after} of the planted rows, "
                f"window NLL {self.nll_before:.3f} -> {self.nll_after:.3f}")


def window_nll(model, rows, start=P):
    with torch.no_grad():
        logp = model(rows).logits[:, start - 1: -1].float().log_softmax(-1)
        return -logp.gather(-1, rows[:, start:, None]).mean().item()


def unlearning_effect(base, model, secret, label=""):
    """Measure an edit on the planted rows. Printed (``pytest -s``) so the margins of every method test
    can be read off each machine's run."""
    from tinymem_fast.tinymem.memorization import score_windows

    e = Effect(int(score_windows(base, secret, P, T).match.sum()),
               int(score_windows(model, secret, P, T).match.sum()),
               window_nll(base, secret), window_nll(model, secret))
    print(f"EFFECT {label}: {e}")
    return e


# Each method test's claim about the six planted rows (base window NLL about 0.01, every window token's
# logit ahead of the next by >= 3.4), with a margin that another CPU's rounding cannot eat. The planted
# model and the edit both follow float trajectories, so which of the six rows stay extracted moves between
# machines (GPTNeoX Durable: 4 or 5, Activations: 2 or 4); the rise of their window NLL does not move
# much. Measured on Intel Xeon (AVX-512) with the default ISA, with ATEN_CPU_CAPABILITY=avx2, with
# ATEN_CPU_CAPABILITY=default and one thread, and with MKL_CBWR=COMPATIBLE: the smallest rise over the
# three architectures and four settings (in the comment) is at least twice the bound asserted.
NLL_RISE = {
    "balanced_subnet": 0.4,       # 0.87
    "subnet": 0.6,                # 1.22
    "greedy": 2.0,                # 4.46
    "second_order": 0.15,         # 0.29
    "slimming": 0.15,             # 0.33
    "zero_out": 0.08,             # 0.18
    "activations": 0.06,          # 0.13
    "durable": 0.05,              # 0.10
    "durable_aggregate": 0.04,    # 0.08
    "integrated_gradients": 0.03,  # 0.07
    "hard_concrete": 0.005,       # 0.013 (GPTNeoX; GPT-2 0.56): 10 epochs of one batch barely move its gates
}
# Rows still extracted after the edit, at most: the most seen in those runs plus two; no bound where that
# would be all six.
MAX_LEFT = {
    "balanced_subnet": 3,         # 0 or 1
    "subnet": 2,                  # 0
    "greedy": 2,                  # 0
    "second_order": 4,            # 2
    "slimming": 3,                # 1
    "zero_out": 5,                # 3
}
