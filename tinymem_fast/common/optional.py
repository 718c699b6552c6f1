"""Optional dependencies. The core (scoring, training, the 17 methods, the ops) needs only what
pyproject.toml's ``dependencies`` lists; plots, YAML files, ``device_map`` sharding, Hugging Face datasets
and the GPU kernels each come with an extra, and a command that needs a missing one stops with one line
that names it."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

# import name -> (distribution on PyPI, the extra of tinymem_fast that brings it)
EXTRAS: dict[str, tuple[str, str]] = {
    "matplotlib": ("matplotlib", "plot"),
    "yaml": ("pyyaml", "yaml"),
    "accelerate": ("accelerate", "accelerate"),
    "datasets": ("datasets", "datasets"),
    "pyarrow": ("pyarrow", "datasets"),
    "triton": ("triton", "gpu"),
}


class MissingExtra(ImportError):
    """An optional package a command needs is not installed; the message says which extra brings it."""


def require(module: str, needed_for: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtra` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        dist, extra = EXTRAS[module.split(".")[0]]
        # installed but broken (a missing shared library, a version clash): say what the import said
        broken = "" if isinstance(exc, ModuleNotFoundError) or sys.modules.get(module, 0) is None \
            else f" (installed, but importing it failed: {exc})"
        raise MissingExtra(f"{needed_for} needs the optional package {dist}{broken}: "
                           f"pip install 'tinymem_fast[{extra}]'") from None


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    matplotlib = require("matplotlib", "plotting")
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")
