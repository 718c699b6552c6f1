"""What the op tests of every family share: where each backend's tensors live, the marks a backend or a
GPU-sized case carries, backend x case grids as pytest params, and the Triton kernel modules (the
interpreter on CPU tensors without a GPU)."""

import importlib
import itertools

import pytest
import torch
from conftest import backend_or_skip

from tinymem_fast.ops import registry

CUDA = torch.cuda.is_available()
# where each backend's tensors live; Triton without a GPU means the interpreter on CPU tensors
DEVICES = {"torch": "cpu", "cpp": "cpu", "triton": "cuda" if CUDA else "cpu", "cuda": "cuda"}
_NO_CUDA_BACKEND = registry.unavailable_reason("cuda", torch.device("cuda")) if CUDA else "no CUDA device"
needs_cuda_backend = pytest.mark.skipif(bool(_NO_CUDA_BACKEND), reason=f"cuda backend: {_NO_CUDA_BACKEND}")
BACKEND_MARKS = {"cuda": (pytest.mark.cuda, needs_cuda_backend)}
_Param = type(pytest.param(None))


def gpu_only(value):
    """A case value too large for the CPU (or the Triton interpreter): runs on a GPU only."""
    return pytest.param(value, marks=pytest.mark.cuda)


def case_id(v) -> str:
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    return str(v)


def cases(backends, *axes) -> list:
    """backend x axes as pytest.params; a backend's marks, and those of values given as pytest.param
    (gpu_only), go with every combination they are in. None values stay out of the ids."""
    out = []
    for combo in itertools.product(backends, *axes):
        values, marks = [], []
        for v in combo:
            if isinstance(v, _Param):
                marks += v.marks
                v = v.values[0]
            values.append(v)
        marks += BACKEND_MARKS.get(values[0], ())
        name = "-".join(case_id(v) for v in values if v is not None)
        out.append(pytest.param(*values, marks=marks, id=name))
    return out


def triton_kernels(module: str, probe: str):
    """``tinymem_fast.kernels.<module>``; ``probe`` names one of its jitted kernels."""
    pytest.importorskip("triton")
    tk = importlib.import_module(f"tinymem_fast.kernels.{module}")
    # @triton.jit picks the interpreter when it decorates: a module imported before conftest set
    # TRITON_INTERPRET=1 holds real GPU kernels, which cannot run on CPU tensors
    if not CUDA and type(getattr(tk, probe)).__name__ != "InterpretedFunction":
        pytest.skip("no CUDA GPU and the kernels were imported before TRITON_INTERPRET=1 was set")
    return tk


def ready(backend: str, dtypes, kernels) -> str:
    """Skip unless ``backend`` runs here on ``dtypes``; -> the device its tensors go to. ``kernels()``
    loads the family's Triton module."""
    dev = DEVICES[backend]
    if backend == "triton":
        kernels()
        if dev == "cpu" and torch.bfloat16 in dtypes:
            pytest.skip("the Triton interpreter's bfloat16 is broken: bf16 runs on a GPU only")
    backend_or_skip(backend, dev)
    return dev
