"""TinyMem models: plain Hugging Face GPT-2 with ReLU MLPs, no dropout, tied embeddings."""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass

import torch

from .. import atomic
from ..validation import at_least

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


def unsafe_pickle_message(path: str) -> str:
    return (f"{path!r}: its pickled weights (pytorch_model.bin) hold more than tensors and are never "
            "unpickled here (weights_only=True); convert them to safetensors where you trust their source")


def check_causal_config(path: str, cfg) -> None:
    """Refuse models whose prediction at position t sees tokens after t: the memorization metric (and
    the one-pass scoring that equals greedy decoding) holds only for causal LMs."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    kind = getattr(cfg, "model_type", None)
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(cfg, "is_decoder", False):
        raise ValueError(f"{path!r} is a {kind} encoder (bidirectional attention, config.is_decoder is "
                         "false): memorization is measured on causal LMs, whose prediction of token t sees "
                         "only the tokens before it")


def check_loading_info(path: str, info: dict) -> None:
    """Refuse a model some of whose weights were not in its checkpoint (transformers would initialise them
    at random and carry on): every score of it would be a random model's."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [k[0] if isinstance(k, tuple) else k for k in (info.get("mismatched_keys") or [])]
    if missing or mismatched:
        bad = missing or mismatched
        raise ValueError(f"{path!r}: {len(missing)} weights are missing from its checkpoint and "
                         f"{len(mismatched)} have other shapes (e.g. {', '.join(bad[:2])}): the weights do "
                         "not belong to this config.json, and the model would run with random weights")


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

    check_causal_config(path, cfg)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar per load floods the output of multi-method runs
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would bury our one-line verdict on it
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, config=cfg, local_files_only=True,
                                                           trust_remote_code=False, dtype=dtype,
                                                           output_loading_info=True)
    except pickle.UnpicklingError:
        raise ValueError(unsafe_pickle_message(path)) from None
    except (ValueError, KeyError, OSError) as exc:
        raise ValueError(f"{path!r} is not a causal LM checkpoint: {str(exc).strip().splitlines()[0]}") \
            from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    check_loading_info(path, info)
    return model.to(device).eval()
