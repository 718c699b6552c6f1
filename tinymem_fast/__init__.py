"""tinymem_fast: measure and remove verbatim memorization in language models, fast.

The fast ops live in :mod:`tinymem_fast.ops` (importable alone); everything else builds on them. The
names most people want are importable from here too (loaded on first use, so ``import tinymem_fast``
stays cheap):

* scoring your own model: :func:`load_causal_lm`, :func:`score_exact`, :func:`extract`, :func:`greedy_decode`
* ops for your own loop: :func:`memscore`, :func:`memscore_examples`, :func:`fused_linear_cross_entropy`,
  :class:`FusedLinearCrossEntropyLoss`, :class:`MaskedSubnet`
* a Hugging Face model in one line: :func:`apply_tinymem`, :func:`unapply_tinymem`,
  :func:`apply_masked_subnet`, :func:`fold_masked_subnet`
"""

__version__ = "0.1.0"

# public name -> module defining it
_EXPORTS = {
    "load_causal_lm": "tinymem_fast.integrations.loading",
    "score_exact": "tinymem_fast.eval.scoring",
    "extract": "tinymem_fast.eval.scoring",
    "greedy_decode": "tinymem_fast.ops.greedy",
    "memscore": "tinymem_fast.ops.memscore",
    "memscore_examples": "tinymem_fast.ops.memscore",
    "fused_linear_cross_entropy": "tinymem_fast.ops.linear_cross_entropy",
    "FusedLinearCrossEntropyLoss": "tinymem_fast.ops.linear_cross_entropy",
    "MaskedSubnet": "tinymem_fast.ops.masked_subnet",
    "apply_tinymem": "tinymem_fast.integrations.transformers",
    "unapply_tinymem": "tinymem_fast.integrations.transformers",
    "apply_masked_subnet": "tinymem_fast.integrations.transformers",
    "fold_masked_subnet": "tinymem_fast.integrations.transformers",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tinymem_fast' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
