"""TinyMem models: plain Hugging Face GPT-2 with ReLU MLPs, no dropout, tied embeddings."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...common import atomic
from ...common.validation import at_least
from ...integrations.loading import load_causal_lm

N_LAYERS = (2, 4, 8, 16)
ARCHS = ("gpt2", "gpt_neox", "llama")


@dataclass
class ModelConfig:
    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    d_mlp: int = 512
    activation: str = "relu"
    arch: str = "gpt2"   # gpt2 (TinyMem, the paper's), or gpt_neox / llama of the same sizes
    vocab_size: int | None = None   # head/embedding rows; None = the data's vocabulary (e.g. 50257 = GPT-2's
                                    # head over a smaller tokenizer, for scoring at a realistic vocabulary)

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown model arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        at_least("model", self, 1, "n_layer", "d_model", "n_head", "d_mlp")
        at_least("model", self, 1, "vocab_size", optional=True)
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")


def gpt2_config(mc: ModelConfig, vocab_size: int, max_ctx: int, bos_id: int | None = None,
                eos_id: int | None = None, pad_id: int | None = None):
    from transformers import GPT2Config

    mc.validate()
    return GPT2Config(
        vocab_size=vocab_size, n_positions=max_ctx, n_embd=mc.d_model, n_layer=mc.n_layer,
        n_head=mc.n_head, n_inner=mc.d_mlp, activation_function=mc.activation,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        initializer_range=0.8 / math.sqrt(mc.d_model), tie_word_embeddings=True,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )


def other_config(mc: ModelConfig, vocab_size: int, max_ctx: int, bos_id: int | None = None,
                 eos_id: int | None = None, pad_id: int | None = None):
    """GPTNeoX or Llama-style config with TinyMem's sizes (so methods can be compared across families)."""
    from transformers import GPTNeoXConfig, LlamaConfig

    mc.validate()
    common = dict(vocab_size=vocab_size, hidden_size=mc.d_model, num_hidden_layers=mc.n_layer,
                  num_attention_heads=mc.n_head, intermediate_size=mc.d_mlp, hidden_act=mc.activation,
                  max_position_embeddings=max_ctx, initializer_range=0.8 / math.sqrt(mc.d_model),
                  tie_word_embeddings=False, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    if mc.arch == "gpt_neox":
        return GPTNeoXConfig(hidden_dropout=0.0, attention_dropout=0.0, **common)
    return LlamaConfig(num_key_value_heads=mc.n_head, attention_dropout=0.0, **common)


def build_model(mc: ModelConfig, vocab_size: int, max_ctx: int, seed: int = 0, **ids):
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    torch.manual_seed(seed)
    if mc.arch == "gpt2":
        model = GPT2LMHeadModel(gpt2_config(mc, vocab_size, max_ctx, **ids))
    else:
        model = AutoModelForCausalLM.from_config(other_config(mc, vocab_size, max_ctx, **ids))
    return model.float().eval()


def save_pretrained_quietly(model, path: str) -> None:
    """``save_pretrained`` without the per-shard progress bar (which floods logs of long runs)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        if was:
            hf_logging.enable_progress_bar()


def save_model(model, path: str) -> None:
    """``save_pretrained`` into a temporary sibling folder, then rename: a crash never leaves a half-written
    model where a complete one is expected."""
    with atomic.folder(path) as tmp:
        save_pretrained_quietly(model, tmp)


def load_model(path: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Any local Hugging Face causal LM folder (never remote code), checked as
    :func:`~tinymem_fast.integrations.loading.load_causal_lm` checks it, in eval mode."""
    return load_causal_lm(path, dtype if dtype is not None else "float32", device=device)
