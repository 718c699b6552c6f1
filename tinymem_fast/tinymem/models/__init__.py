"""Model construction (TinyMem GPT-2 configs) and loading of Hugging Face causal LMs."""

from .tinymem import ModelConfig, build_model, load_model, save_model

__all__ = ["ModelConfig", "build_model", "load_model", "save_model"]
