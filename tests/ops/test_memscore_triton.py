"""Triton memscore kernels against the torch reference (interpreter on CPU, real kernels on CUDA)."""

import os

import torch

if not torch.cuda.is_available():
    # must happen before triton (or any kernel module) is imported: @triton.jit picks the interpreter
    # at decoration time
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pathlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

from memscore_checks import (  # noqa: E402
    assert_argmax_close,
    assert_half_nll_rule,
    assert_match_close,
    assert_nll_close,
    naive_logits,
    naive_scores,
    quantised_problem,
    random_problem,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
from tinymem_fast.ops.memscore import lm_head_argmax, memscore, memscore_examples, scores_torch  # noqa: E402

try:
    from tinymem_fast.kernels import memscore as tk
except ImportError:
    # tinymem_fast.kernels exists only once the package is installed (it maps the top-level kernels/)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from kernels import memscore as tk

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

if not CUDA and type(tk._memscore_kernel).__name__ != "InterpretedFunction":
    pytest.skip("no CUDA GPU and the kernels were imported before TRITON_INTERPRET=1 was set",
                allow_module_level=True)

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
# the interpreter's bfloat16 is broken, so bf16 runs only on a real GPU
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=cuda_only)]
SHAPES = [(1, 37, 13), (37, 20, 1000), (70, 64, 777),
          pytest.param((3000, 256, 50257), marks=cuda_only)]


def _problem(m, d, v, dtype, *, bias, seed, **kw):
    return tuple(t.to(DEVICE) if t is not None else None
                 for t in random_problem(m, d, v, dtype, bias=bias, seed=seed, **kw))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk,split", [(0, None), (16, 3), (100, 1)])
def test_triton_matches_reference(shape, dtype, chunk, split):
    m, d, v = shape
    for bias in (True, False):
        h, w, b, y = _problem(m, d, v, dtype, bias=bias, seed=m + v + bias)
        lg = naive_logits(h, w, b)
        ref_arg, ref_nll = scores_torch(h, w, b, y, True, 0)
        match, nll = tk.memscore(h, w, b, y, True, False, chunk, split)
        assert match.dtype == torch.bool and nll.dtype == torch.float32 and match.shape == (m,)
        assert_match_close(match, ref_arg == y, lg, y, dtype)
        assert_nll_close(nll, ref_nll, dtype)
        arg = tk.lm_head_argmax(h, w, b, chunk, split)
        assert arg.dtype == torch.int64
        assert_argmax_close(arg, ref_arg, lg, dtype)
        pruned, zeros = tk.memscore(h, w, b, y, False, True, chunk, split)
        assert torch.equal(pruned, match) and not zeros.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v,chunk", [(13, 16), (200, 32), (1000, 64)])
def test_triton_forced_ties_exact(dtype, v, chunk):
    h, w, b, y = (t.to(DEVICE) for t in quantised_problem(24, 16, v, dtype, bias=True, seed=v, chunk=chunk))
    arg, match, nll = naive_scores(h, w, b, y)
    assert bool((~match).any()) and bool(match.any())
    for split in (None, 2):
        got, got_nll = tk.memscore(h, w, b, y, True, False, chunk, split)
        assert torch.equal(got, match)
        torch.testing.assert_close(got_nll, nll, atol=1e-5, rtol=1e-5)
        assert torch.equal(tk.lm_head_argmax(h, w, b, chunk, split), arg)
        pruned, _ = tk.memscore(h, w, b, y, False, True, chunk, split)
        assert torch.equal(pruned, match)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=cuda_only)])
def test_triton_half_nll_rule(dtype):
    h, w, b, y = _problem(40, 48, 300, dtype, bias=True, seed=3)
    assert_half_nll_rule(tk.memscore(h, w, b, y, True, False)[1].cpu(), h.cpu(), w.cpu(), b.cpu(), y.cpu())


def test_target_upper_bound_bounds_the_rounded_target_logit():
    for dtype in (torch.float32, torch.float16):
        h, w, b, y = random_problem(200, 64, 50, dtype, bias=True, seed=1)
        bound = tk.target_upper_bound(h, w, b, y)
        exact = naive_logits(h, w, b).gather(1, y[:, None]).squeeze(1)
        assert (bound >= exact).all()
        # and barely above it (a worst-case float32 error bound, ~1e-4 relative here, or one fp16 ulp):
        # only logits that close to the target escape pruning
        rel = 2.0 ** -9 if dtype == torch.float16 else 1e-3
        assert ((bound - exact) <= rel * exact.abs().clamp_min(1)).all()


def test_public_api_on_triton_backend():
    bsz, seq, d, v = 3, 5, 24, 300
    h, w, b, y = _problem(bsz * seq, d, v, torch.float32, bias=True, seed=7, hit_frac=0.7)
    h, y = h.view(bsz, seq, d), y.view(bsz, seq)
    mask = torch.rand(bsz, seq, generator=torch.Generator().manual_seed(0)) < 0.7
    mask = mask.to(DEVICE)
    ref = memscore(h, w, y, bias=b, mask=mask, backend="torch")
    got = memscore(h, w, y, bias=b, mask=mask, backend="triton")
    lg = naive_logits(h.view(-1, d), w, b)
    assert_match_close(got.match.view(-1), ref.match.view(-1), lg, y.view(-1), torch.float32)
    assert_nll_close(got.nll, ref.nll, torch.float32)
    ex = memscore_examples(h, w, y, bias=b, mask=mask, need_nll=False, early_exit=True, backend="triton")
    ex_full = memscore_examples(h, w, y, bias=b, mask=mask, need_nll=False, backend="triton")
    assert torch.equal(ex.matched, ex_full.matched) and torch.equal(ex.first_mismatch, ex_full.first_mismatch)
    assert_argmax_close(lm_head_argmax(h[:, -1], w, bias=b, backend="triton"),
                        lm_head_argmax(h[:, -1], w, bias=b, backend="torch"),
                        naive_logits(h[:, -1], w, b), torch.float32)
