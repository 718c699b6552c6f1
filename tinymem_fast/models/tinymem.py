"""TinyMem models: plain Hugging Face GPT-2 with ReLU MLPs, no dropout, tied embeddings."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch

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
        if self.n_layer < 1 or self.d_model < 1 or self.d_mlp < 1:
            raise ValueError("n_layer, d_model and d_mlp must be positive")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"model.vocab_size must be positive, got {self.vocab_size}")
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
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        save_pretrained_quietly(model, tmp)
        if os.path.exists(path):
            old = path + ".old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_model(path: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Any local Hugging Face causal LM folder (never remote code)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path!r} does not exist")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"{path!r} is not a Hugging Face model folder (no config.json)")
    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except ValueError as exc:
        raise ValueError(f"{path!r}: config.json is not a known model type ({exc})") from None
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar per load floods the output of multi-method runs
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=cfg, local_files_only=True,
                                                     trust_remote_code=False, dtype=dtype)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{path!r} is not a causal LM checkpoint: {exc}") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()
