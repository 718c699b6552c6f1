"""Loading a Hugging Face causal LM, once, for every layer: a local folder or a hub model id at a revision
(resolved to its snapshot folder in the Hugging Face cache, downloaded unless downloads are off). The
model must be causal (no encoder whose prediction at position t sees later tokens) and all of its
weights must come from the checkpoint (transformers would initialise missing ones at random and carry
on). Never remote code, never a pickle that holds more than tensors."""

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


# what a snapshot needs for loading and scoring (weights: safetensors first, pickles only when a
# revision has nothing else)
SNAPSHOT_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]
PICKLED_WEIGHTS = ["pytorch_model*.bin"]


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` or ``name`` (what the hub accepts), not a path a user meant as a folder."""
    return bool(name) and not name.startswith((".", "/", "~")) and name.count("/") <= 1 \
        and not name.endswith("/") and "\\" not in name


def resolve_model(name: str, revision: str | None = None, *, local_files_only: bool | None = None,
                  cache_dir: str | None = None) -> str:
    """A local folder for ``name``: the folder itself, or the snapshot folder of a Hugging Face hub model
    id at ``revision`` (a branch, tag or commit; Pythia's checkpoints along training are revisions such
    as ``step143000``). The hub is asked only when ``local_files_only`` is false and ``HF_HUB_OFFLINE`` is
    not set; otherwise the cache alone answers. Nothing is changed process-wide."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if revision:
            raise ModelFolderError(f"{name!r} is a local folder: --revision applies to hub model ids")
        return path
    if not looks_like_hub_id(name):
        raise FileNotFoundError(f"model folder {name!r} does not exist")
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download

    offline = bool(local_files_only) or _env_true("HF_HUB_OFFLINE")
    at = f" at revision {revision!r}" if revision else ""
    try:
        folder = snapshot_download(name, revision=revision, local_files_only=offline, cache_dir=cache_dir,
                                   allow_patterns=SNAPSHOT_FILES)
        if not offline and not any(f.endswith(".safetensors") for f in os.listdir(folder)):
            folder = snapshot_download(name, revision=revision, cache_dir=cache_dir,
                                       allow_patterns=SNAPSHOT_FILES + PICKLED_WEIGHTS)
    except hub_errors.HFValidationError:
        raise FileNotFoundError(f"{name!r} is neither a model folder nor a hub model id") from None
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled):
        why = "--local-files-only" if local_files_only else "HF_HUB_OFFLINE is set" if offline else \
            "the hub cannot be reached"
        raise ModelFolderError(f"{name!r}{at} is not a local folder and not in the Hugging Face cache, and "
                               f"nothing can be downloaded ({why})") from None
    except hub_errors.RevisionNotFoundError:
        raise ModelFolderError(f"{name!r} has no revision {revision!r}") from None
    except hub_errors.GatedRepoError:
        raise ModelFolderError(f"{name!r} is gated: accept its terms on the hub and log in "
                               "(huggingface-cli login)") from None
    except hub_errors.RepositoryNotFoundError:
        raise ModelFolderError(f"no hub model {name!r} (or it is private: log in first)") from None
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise ModelFolderError(f"{name!r}{at}: its snapshot in the cache ({folder}) has no config.json "
                               "(an incomplete download? run again with downloads on)")
    return folder


def load_causal_lm(path: str, dtype: str | torch.dtype = "float32", device: str | None = None,
                   device_map: str | dict | None = None, *, revision: str | None = None,
                   local_files_only: bool | None = None):
    """A Hugging Face causal LM (``trust_remote_code=False``), in eval mode: a local folder, or a hub model
    id at ``revision`` (see :func:`resolve_model`).

    ``device_map`` (e.g. ``"auto"``) shards the model with accelerate; results are then collected on the
    head's device.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelFolderError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if device_map is not None:
        require("accelerate", f"device_map={device_map!r}")  # before a possibly long download
    path = resolve_model(path, revision, local_files_only=local_files_only)
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
