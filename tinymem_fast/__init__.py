"""tinymem_fast: measure and remove verbatim memorization in language models, fast.

The fast ops live in :mod:`tinymem_fast.ops` (importable alone); everything else builds on them.
"""

__version__ = "0.1.0"
