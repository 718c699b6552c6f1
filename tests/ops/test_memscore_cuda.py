"""The hand-written CUDA memscore kernel (csrc/cuda/memscore*) against the torch reference, on CUDA
tensors, plus the Triton backend on a real GPU at sizes the interpreter cannot run.

Skipped unless a CUDA device is present and the compiled extension was built with CUDA.
"""

from __future__ import annotations

import pytest
import torch
from memscore_checks import (
    assert_argmax_close,
    assert_half_nll_rule,
    assert_match_close,
    assert_nll_close,
    naive_logits,
    naive_scores,
    quantised_problem,
    random_problem,
)

from tinymem_fast.ops import registry
from tinymem_fast.ops.memscore import lm_head_argmax, memscore, memscore_examples


def _cuda_backend_ready() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    st = registry.ext_status()
    if not st["loaded"]:
        return False, f"compiled extension not loaded: {st['reason']}"
    if not st["cuda"]:
        return False, "compiled extension was built without CUDA"
    return True, ""


_READY, _WHY = _cuda_backend_ready()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not _READY, reason=_WHY or "ready")]

DEV = "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# odd everything; TinyMem math (V=14); GPT-2 vocab with few tokens (vocab split across blocks) and many
SHAPES = ((1, 37, 13), (7, 128, 14), (130, 64, 777), (3, 128, 50257), (2049, 512, 50257))
GPU_BACKENDS = ("cuda", "triton")


def _on_gpu(*ts):
    return tuple(t.to(DEV) if t is not None else None for t in ts)


def _flat(h, w, b, y, backend, need_nll=True):
    s = memscore(h[None], w, y[None], bias=b, need_nll=need_nll, backend=backend)
    return s.match[0], s.nll[0]


def _pruned(h, w, b, y, backend):
    """The early-exit path (reachable through memscore_examples only), one example of all rows."""
    return memscore_examples(h[None], w, y[None], bias=b, need_nll=False, early_exit=True, backend=backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gpu_matches_reference(shape, dtype, backend):
    m, d, v = shape
    for bias in (True, False):
        h, w, b, y = _on_gpu(*random_problem(m, d, v, dtype, bias=bias, seed=m + v))
        lg = naive_logits(h, w, b)
        ref_match, ref_nll = _flat(h, w, b, y, "torch")
        match, nll = _flat(h, w, b, y, backend)
        assert match.is_cuda and nll.dtype == torch.float32
        assert_match_close(match, ref_match, lg, y, dtype)
        assert_nll_close(nll, ref_nll, dtype)
        no_nll, zeros = _flat(h, w, b, y, backend, need_nll=False)
        assert torch.equal(no_nll, match) and not zeros.any()
        ex = _pruned(h, w, b, y, backend)
        assert int(ex.matched[0]) == int(match.sum())
        first = int((~match).long().argmax()) if not bool(match.all()) else m
        assert int(ex.first_mismatch[0]) == first
        arg = lm_head_argmax(h, w, bias=b, backend=backend)
        assert arg.dtype == torch.int64 and arg.is_cuda
        assert_argmax_close(arg, lm_head_argmax(h, w, bias=b, backend="torch"), lg, dtype)
        assert torch.equal(arg == y, match)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v,chunk", [(13, 4), (200, 64), (5000, 64)])
def test_gpu_forced_ties_exact(backend, dtype, v, chunk):
    h, w, b, y = _on_gpu(*quantised_problem(64, 16, v, dtype, bias=True, seed=v, chunk=chunk))
    arg, match, nll = naive_scores(h, w, b, y)
    got, got_nll = _flat(h, w, b, y, backend)
    assert torch.equal(got, match)
    torch.testing.assert_close(got_nll, nll, atol=1e-5, rtol=1e-5)
    assert torch.equal(lm_head_argmax(h, w, bias=b, backend=backend), arg)
    ex = _pruned(h, w, b, y, backend)
    assert int(ex.matched[0]) == int(match.sum())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_gpu_half_nll_rule(backend, dtype):
    h, w, b, y = _on_gpu(*random_problem(512, 256, 8000, dtype, bias=True, seed=3))
    assert_half_nll_rule(_flat(h, w, b, y, backend)[1], h, w, b, y)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_early_exit_equals_full_with_masks(backend):
    bsz, seq, d, v = 16, 50, 128, 50257
    h, w, b, y = _on_gpu(*random_problem(bsz * seq, d, v, torch.float16, bias=False, seed=9, hit_frac=0.9))
    h, y = h.view(bsz, seq, d), y.view(bsz, seq)
    mask = torch.rand(bsz, seq, device=DEV) < 0.9
    full = memscore_examples(h, w, y, mask=mask, need_nll=False, backend=backend)
    pruned = memscore_examples(h, w, y, mask=mask, need_nll=False, early_exit=True, backend=backend)
    for f in ("exact", "first_mismatch", "matched"):
        assert torch.equal(getattr(pruned, f), getattr(full, f)), f
    ref = memscore_examples(h, w, y, mask=mask, need_nll=False, backend="torch")
    assert (full.matched - ref.matched).abs().max() <= 2  # near-ties only


def test_cuda_op_rejects_bad_input():
    ops = torch.ops.tinymem
    h, w = torch.randn(4, 8, device=DEV), torch.randn(10, 8, device=DEV)
    y = torch.zeros(4, dtype=torch.long, device=DEV)
    with pytest.raises(RuntimeError, match="weight is"):
        ops.memscore(h, w.half(), None, y, True, False, 0)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        ops.memscore(h, w.cpu(), None, y, True, False, 0)
    with pytest.raises(RuntimeError, match="targets must be int64"):
        ops.memscore(h, w, None, y.int(), True, False, 0)
    with pytest.raises(RuntimeError, match="early_exit needs need_nll=false"):
        ops.memscore(h, w, None, y, True, True, 0)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.lm_head_argmax(h, w, torch.randn(9, device=DEV), 0)
