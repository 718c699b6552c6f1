"""pytest-benchmark suite for the masked-subnet ops: `pytest bench/ --benchmark-only`.

Compare backends with `--benchmark-group-by=param:op`; `python -m bench` gives the ratio table.
Shapes default to one Pythia-2.8B MLP matrix; BENCH_SMALL=1 shrinks them for a quick look.
"""

import os

import pytest
import torch

from tinymem_fast.ops import masked_subnet as ms
from tinymem_fast.ops import registry

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (1024, 256) if os.environ.get("BENCH_SMALL") == "1" else (10240, 2560)
BACKENDS = ["torch", "cpp"] if DEVICE == "cpu" else ["torch", "triton", "cuda"]


def _backend(b):
    why = registry.unavailable_reason(b, torch.device(DEVICE))
    if why:
        pytest.skip(why)
    return b


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def tensors():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    return {n: torch.randn(SHAPE, device=DEVICE, generator=gen) for n in ("w", "s", "g")}


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold(benchmark, tensors, backend):
    b = _backend(backend)
    benchmark.group = "threshold"
    benchmark(lambda: (ms.subnet_threshold(tensors["s"], 0.05, backend=b), _sync()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_weight(benchmark, tensors, backend):
    b = _backend(backend)
    thr = ms.subnet_threshold(tensors["s"], 0.05)
    benchmark.group = "masked_weight"
    benchmark(lambda: (ms.masked_weight(tensors["w"], tensors["s"], thr, backend=b), _sync()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_step(benchmark, tensors, backend):
    b = _backend(backend)
    s, buf = tensors["s"].clone(), torch.zeros_like(tensors["s"])
    benchmark.group = "sgd_step"
    benchmark(lambda: (ms.subnet_sgd_step_(s, tensors["g"], buf, lr=1e-9, backend=b), _sync()))
