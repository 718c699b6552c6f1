"""Test setup shared by every test module.

Triton kernels run under the interpreter on machines without a GPU; that must be decided before the
first ``import triton``, hence here, at collection time.
"""

import os
import sys

import torch

# tests live in area folders (ops/, eval/, tinymem/, methods/, experiments/, cli/); the shared helpers
# (tiny_models, tiny_runs, scoring_models, memscore_checks, this file) stay here, importable from all of them
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from tinymem_fast.ops import registry  # noqa: E402


def backend_or_skip(backend: str, device: str = "cpu") -> str:
    why = registry.unavailable_reason(backend, torch.device(device))
    if why:
        pytest.skip(f"{backend} unavailable: {why}")
    return backend


def isa_or_skip(name: str | None, monkeypatch) -> None:
    """Run the CPU kernels at instruction-set level ``name`` (TINYMEM_CPU_ISA); None keeps the level in
    force: this CPU's best, or the one the whole run was started with (.ci/run runs the kernel tests once
    per level the machine has). A level this CPU lacks skips (the kernels would cap it to a lower one)."""
    if name is None:
        return
    if name not in registry.cpu_isa_levels():
        pytest.skip(f"this CPU has no {name} (it runs {', '.join(registry.cpu_isa_levels()) or 'none'})")
    monkeypatch.setenv("TINYMEM_CPU_ISA", name)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny trained `tinymem train` run folder (GPT-2), shared by the CLI, sweep and report tests."""
    from tiny_runs import train_tiny

    return train_tiny(tmp_path_factory.mktemp("tiny_run"))


@pytest.fixture(scope="session")
def planted():
    """arch -> (model, clean rows, held-out rows, planted memorized rows); built once per session."""
    from tiny_models import make_planted

    return make_planted()
