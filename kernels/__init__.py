"""Triton kernels, one file per op family.

Each family's entry points are custom ops in the ``tinymem_triton`` namespace, made with
``torch.library.triton_op``: ``torch.compile`` sees through them to the Triton kernels (and their
shapes come from running the Python body on fake tensors, so there is no separate fake to keep in step).
Kernels launch through :func:`launch`, the traceable form of ``kernel[grid](...)``. On a torch without
``triton_op`` (before 2.6) the entry points stay plain functions. Under the interpreter they are opaque
custom ops (see :func:`triton_op`).
"""

from __future__ import annotations

import os

import torch

TRITON_OPS = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def _interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def launch(kernel, grid):
    """``kernel[grid]``, traceable inside a ``triton_op``.

    Under ``TRITON_INTERPRET=1`` the kernels are not ``JITFunction``s and ``wrap_triton`` cannot take them;
    then a launch on fake tensors (the op being traced for its shapes) does nothing, as ``wrap_triton``'s
    own fake implementation does, and a launch on real tensors runs the interpreter."""
    if TRITON_OPS and not _interpreted(kernel):
        return torch.library.wrap_triton(kernel)[grid]

    def run(*args, **kwargs):
        from torch._guards import detect_fake_mode

        if detect_fake_mode(args) is None:
            kernel[grid](*args, **kwargs)

    return run


def triton_op(name: str, mutates_args=(), *, opaque: bool = False):
    """Register the decorated entry point as ``torch.ops.tinymem_triton.<name>`` (where torch can).

    A ``triton_op`` normally. Two cases make a plain (opaque) custom op instead, whose body the compiler
    never traces: ``opaque=True``, for a kernel launched with compile options ``wrap_triton`` does not
    carry (``enable_fp_fusion``; such an op returns nothing, so its fake is trivially right); and the
    interpreter (``TRITON_INTERPRET=1``), whose kernels a graph cannot hold -- there the body is its
    own fake, since :func:`launch` does nothing on fake tensors."""
    def wrap(fn):
        if not TRITON_OPS:
            return fn
        qualname = f"tinymem_triton::{name}"
        if opaque or os.environ.get("TRITON_INTERPRET") == "1":
            op = torch.library.custom_op(qualname, fn, mutates_args=mutates_args)
            op.register_fake((lambda *args, **kwargs: None) if opaque else fn)
            return op
        return torch.library.triton_op(qualname, fn, mutates_args=mutates_args)

    return wrap
