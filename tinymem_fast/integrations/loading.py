"""Loading a local Hugging Face causal LM folder, once, for every layer: the model must be causal (no
encoder whose prediction at position t sees later tokens) and all of its weights must come from the
checkpoint (transformers would initialise missing ones at random and carry on). Never remote code,
never a pickle that holds more than tensors."""

from __future__ import annotations

import os
import pickle

import torch

from ..common.optional import require

# files a local Hugging Face tokenizer folder may hold; one is enough to try loading it
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "vocab.txt", "spiece.model")


class ModelFolderError(ValueError):
    """A model folder that cannot be loaded as what memorization scoring needs (one line, why)."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_causal_lm(path: str, dtype: str | torch.dtype = "float32", device: str | None = None,
                   device_map: str | dict | None = None):
    """A local Hugging Face causal LM folder (``trust_remote_code=False``), in eval mode.

    ``device_map`` (e.g. ``"auto"``) shards the model with accelerate; results are then collected on the
    head's device.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelFolderError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path!r} does not exist")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ModelFolderError(f"{path!r} is not a Hugging Face model folder (no config.json)")
    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelFolderError(f"{path!r}: config.json is not a known model type "
                                f"({first_line(exc)})") from None
    import transformers
    from transformers.utils import logging as hf_logging

    kw = {}
    if device_map is not None:
        require("accelerate", f"device_map={device_map!r}")
        kw["device_map"] = device_map
    # transformers < 4.56 names the argument torch_dtype
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kw["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = dtype
    check_causal_config(path, cfg)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor loading bar is noise next to our own
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would bury our one-line verdict on it
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, config=cfg, local_files_only=True,
                                                           trust_remote_code=False, output_loading_info=True,
                                                           **kw)
    except pickle.UnpicklingError:
        raise ModelFolderError(unsafe_pickle_message(path)) from None
    except (ValueError, KeyError, OSError, TypeError, ImportError) as exc:
        raise ModelFolderError(f"{path!r} is not a causal LM checkpoint: {first_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    check_loading_info(path, info)
    if device_map is None and device is not None:
        model = model.to(device)
    return model.eval()




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


def load_tokenizer(path: str):
    """Load a tokenizer from a local Hugging Face tokenizer folder (e.g. GPT-2's), never from the Hub.

    Remote code is never run (``trust_remote_code=False``): a tokenizer folder is data, not a program.
    """
    from transformers import AutoTokenizer

    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder {path!r} not found")
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise ModelFolderError(f"folder {path!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - report any loader failure in one line
        raise ModelFolderError(f"cannot load the tokenizer in {path!r} ({first_line(e)})") from None


def has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)
