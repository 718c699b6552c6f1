"""The one op dispatcher (ops.registry.select): every family asks it, every unavailable backend says why,
and every compiled op has a shape-only implementation registered at import (torch.compile, FakeTensor)."""

import pytest
import torch
from conftest import backend_or_skip
from torch._subclasses.fake_tensor import FakeTensorMode

from tinymem_fast.ops import OP_FAMILIES, registry


def test_every_family_has_a_dispatch_spec():
    assert set(OP_FAMILIES) == {"masked_subnet", "memscore", "causal_attention", "linear_cross_entropy"}
    for spec in OP_FAMILIES.values():
        assert "torch" in spec["backends"] and spec["ext_ops"]


def test_reasons_name_every_backend(monkeypatch):
    r = registry.backend_reasons("causal_attention", "cpu", **OP_FAMILIES["causal_attention"])
    assert r["torch"] == "" and "has no triton backend" in r["triton"] and "has no cuda backend" in r["cuda"]
    if registry.ext() is not None:
        monkeypatch.setattr(registry, "ext_has", lambda op: op != "memscore")
        r = registry.backend_reasons("memscore", "cpu", **OP_FAMILIES["memscore"])
        assert "no tinymem::memscore (stale build)" in r["cpp"]


def test_explicit_and_process_wide_choices(monkeypatch):
    spec = OP_FAMILIES["causal_attention"]
    with pytest.raises(registry.BackendUnavailable, match="no triton backend"):
        registry.select("causal_attention", "cpu", "triton", **spec)
    monkeypatch.setenv("TINYMEM_BACKEND", "triton")  # a GPU choice for the whole process
    assert registry.select("causal_attention", "cpu", **spec) in ("cpp", "torch")
    monkeypatch.setenv("TINYMEM_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown backend 'fast' .from TINYMEM_BACKEND"):
        registry.select("memscore", "cpu", **OP_FAMILIES["memscore"])


def test_input_reasons_steer_only_automatic_choices():
    backend_or_skip("cpp")
    spec = OP_FAMILIES["causal_attention"]
    assert registry.select("causal_attention", "cpu", **spec) == "cpp"
    assert registry.select("causal_attention", "cpu", **spec, suits=False) == "torch"
    assert registry.select("causal_attention", "cpu", "cpp", **spec, suits=False) == "cpp"


def test_subnet_ops_have_fakes():
    backend_or_skip("cpp")
    with FakeTensorMode():
        s = torch.empty(7, 13)
        value, cut = torch.ops.tinymem.subnet_threshold(s, 5)
        assert value.shape == () and value.dtype == torch.float32 and cut.dtype == torch.int64
        w = torch.empty(7, 13, dtype=torch.float16)
        assert torch.ops.tinymem.subnet_masked_weight(w, s, value, cut).dtype == torch.float16
        assert torch.ops.tinymem.subnet_ste_grad(s, s, s).shape == (7, 13)
        torch.ops.tinymem.subnet_sgd_step_(s, s, torch.empty(7, 13), 0.1, 0.9, 5e-4, False)


def test_memscore_ops_have_fakes():
    backend_or_skip("cpp")
    with FakeTensorMode():
        h, w, y = torch.empty(5, 8), torch.empty(11, 8), torch.empty(5, dtype=torch.long)
        match, nll = torch.ops.tinymem.memscore(h, w, None, y, True, False, 0)
        assert match.shape == (5,) and match.dtype == torch.bool and nll.dtype == torch.float32
        assert torch.ops.tinymem.lm_head_argmax(h, w, None, 0).dtype == torch.int64
