"""memscore ops on every backend (torch, cpp, triton, cuda): the torch reference against the naive
full-logits oracle, the fast backends against the reference (the cpp one at every instruction-set level
this CPU has), the Triton kernels with their own tiling knobs, reductions, ties, early exit,
lm_head_argmax and input validation.

The backend is a test parameter. Without a GPU the Triton kernels run in the interpreter
(tests/conftest.py sets TRITON_INTERPRET=1): small shapes only, no bfloat16. The cuda backend and
GPU-sized cases carry the ``cuda`` marker and skip without a GPU. Near-tie tolerances come from
tests/memscore_checks.py.
"""

import math
import subprocess
import sys

import backend_cases
import pytest
import torch
from backend_cases import case_id, cases, gpu_only, needs_cuda_backend
from conftest import backend_or_skip, isa_or_skip
from memscore_checks import (
    assert_argmax_close,
    assert_half_nll_rule,
    assert_match_close,
    assert_nll_close,
    naive_logits,
    naive_scores,
    oracle_examples,
    quantised_problem,
    random_problem,
)

from tinymem_fast.ops import registry
from tinymem_fast.ops.memscore import (
    ExampleScores,
    TokenScores,
    lm_head_argmax,
    memscore,
    memscore_examples,
    reduce_scores,
    scores_torch,
)

# --- backends, devices, cases ---------------------------------------------------------------------

GPU_BACKENDS = ["cuda", gpu_only("triton")]


def triton_kernels():
    return backend_cases.triton_kernels("memscore", "_memscore_kernel")


@pytest.fixture
def tk():
    return triton_kernels()


def ready(backend: str, *dtypes) -> str:
    """Skip unless ``backend`` runs here on ``dtypes``; -> the device its tensors go to."""
    return backend_cases.ready(backend, dtypes, triton_kernels)


# --- problems -------------------------------------------------------------------------------------

# (M tokens, d, V): odd everything, V below one SIMD vector (TinyMem math has V=14), V across many tiles
SHAPES = [(1, 37, 13), (7, 16, 14), (37, 37, 1000), (130, 64, 777)]
# the same on a GPU, plus the GPT-2 vocabulary with few tokens (vocab split across blocks) and many
GPU_SHAPES = [(1, 37, 13), (7, 128, 14), (130, 64, 777), (3, 128, 50257), (2049, 512, 50257)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALF = [torch.float16, torch.bfloat16]
CHUNKS = [None, 7, 333]
ISAS = [None, "avx2", "generic"]  # None: the level in force (this CPU's best, or the run's TINYMEM_CPU_ISA)


def _chunks(dev: str, *chunks) -> tuple:
    # explicit small chunks at GPU sizes would mean thousands of tiny tiles: GPU cases run the tiling the
    # kernels choose (the Triton kernel tests below cover chunk and split in the interpreter too)
    return (None, *chunks) if dev == "cpu" else (None,)


def _flat_scores(h, w, b, y, backend, chunk=None, need_nll=True):
    s = memscore(h[None], w, y[None], bias=b, need_nll=need_nll, chunk_size=chunk, backend=backend)
    return s.match[0], s.nll[0]


def _pruned(h, w, b, y, backend, chunk=None):
    """The early-exit path (reachable through memscore_examples only), one example of all rows."""
    return memscore_examples(h[None], w, y[None], bias=b, need_nll=False, early_exit=True, chunk_size=chunk,
                             backend=backend)


# --- the torch reference ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_reference_matches_naive(shape, dtype, bias):
    m, d, v = shape
    h, w, b, y = random_problem(m, d, v, dtype, bias=bias, seed=m + v)
    arg, match, nll = naive_scores(h, w, b, y)
    lg = naive_logits(h, w, b)
    for chunk in CHUNKS:
        got_match, got_nll = _flat_scores(h, w, b, y, "torch", chunk)
        # same rounded logits, only the matmul's blocking differs: near-ties aside, identical
        assert_match_close(got_match, match, lg, y, dtype)
        assert_nll_close(got_nll, nll, torch.float32)
        assert_argmax_close(lm_head_argmax(h, w, bias=b, chunk_size=chunk, backend="torch"), arg, lg, dtype)
    if m > 1:
        assert bool(match.any()) and not bool(match.all())  # the test sees hits and misses


# (m, d, V, seed): one problem size for the CPU, a small one for the interpreter, a large one for GPUs
@pytest.mark.parametrize("backend,dtype,problem",
                         cases(["torch", "cpp"], HALF, [(64, 48, 500, 5)])
                         + cases(["triton"], HALF, [(40, 48, 300, 3)])
                         + cases(GPU_BACKENDS, HALF, [(512, 256, 8000, 3)]))
def test_half_precision_nll_error_rule(backend, dtype, problem):
    dev = ready(backend, dtype)
    m, d, v, seed = problem
    h, w, b, y = random_problem(m, d, v, dtype, bias=True, seed=seed, device=dev)
    assert_half_nll_rule(_flat_scores(h, w, b, y, backend)[1], h, w, b, y)


# --- the fast backends against the reference -------------------------------------------------------


@pytest.mark.parametrize("backend,shape,dtype,isa", cases(["cpp"], SHAPES, DTYPES, ISAS)
                         + cases(GPU_BACKENDS, GPU_SHAPES, DTYPES, [None]))
def test_matches_reference(backend, shape, dtype, isa, monkeypatch):
    dev = ready(backend, dtype)
    isa_or_skip(isa, monkeypatch)
    m, d, v = shape
    for bias in (True, False):
        h, w, b, y = random_problem(m, d, v, dtype, bias=bias, seed=3 * m + v, device=dev)
        lg = naive_logits(h, w, b)
        ref_match, ref_nll = _flat_scores(h, w, b, y, "torch")
        ref_arg = lm_head_argmax(h, w, bias=b, backend="torch")
        for chunk in _chunks(dev, *CHUNKS[1:]):
            match, nll = _flat_scores(h, w, b, y, backend, chunk)
            assert match.device == h.device and nll.dtype == torch.float32
            assert_match_close(match, ref_match, lg, y, dtype)
            assert_nll_close(nll, ref_nll, dtype)
            no_nll_match, zeros = _flat_scores(h, w, b, y, backend, chunk, need_nll=False)
            assert torch.equal(no_nll_match, match) and not zeros.any()
            ex = _pruned(h, w, b, y, backend, chunk)
            assert int(ex.matched[0]) == int(match.sum())
            first = int((~match).long().argmax()) if not bool(match.all()) else m
            assert int(ex.first_mismatch[0]) == first
            arg = lm_head_argmax(h, w, bias=b, chunk_size=chunk, backend=backend)
            assert arg.dtype == torch.int64 and arg.shape == (m,) and arg.device == h.device
            assert_argmax_close(arg, ref_arg, lg, dtype)
            assert torch.equal(arg == y, match)  # one argmax, whichever op asks


@pytest.mark.parametrize("backend,dtype", cases(["torch", "cpp"], [torch.float32, torch.float16]))
def test_full_gpt2_vocab(backend, dtype):
    """V = 50257 (GPT-2), few tokens: many vocab tiles, and the vocab split across threads."""
    backend_or_skip(backend)
    h, w, b, y = random_problem(6, 64, 50257, dtype, bias=False, seed=11)
    arg, match, nll = naive_scores(h, w, b, y)
    lg = naive_logits(h, w, b)
    got_match, got_nll = _flat_scores(h, w, b, y, backend)
    assert_match_close(got_match, match, lg, y, dtype)
    assert_nll_close(got_nll, nll, dtype)
    assert_argmax_close(lm_head_argmax(h, w, backend=backend), arg, lg, dtype)


@pytest.mark.parametrize("backend", cases(["cpp", "triton", "cuda"]))
def test_public_api_matches_torch_backend(backend):
    """Masked [B, T] inputs through memscore, memscore_examples (with and without early exit) and
    lm_head_argmax on a strided slice."""
    dev = ready(backend)
    bsz, seq, d, v = 3, 5, 24, 300
    h, w, b, y = random_problem(bsz * seq, d, v, torch.float32, bias=True, seed=7, hit_frac=0.7, device=dev)
    h, y = h.view(bsz, seq, d), y.view(bsz, seq)
    mask = (torch.rand(bsz, seq, generator=torch.Generator().manual_seed(0)) < 0.7).to(dev)
    ref = memscore(h, w, y, bias=b, mask=mask, backend="torch")
    got = memscore(h, w, y, bias=b, mask=mask, backend=backend)
    lg = naive_logits(h.view(-1, d), w, b)
    assert_match_close(got.match.view(-1), ref.match.view(-1), lg, y.view(-1), torch.float32)
    assert_nll_close(got.nll, ref.nll, torch.float32)
    ex = memscore_examples(h, w, y, bias=b, mask=mask, need_nll=False, early_exit=True, backend=backend)
    ex_full = memscore_examples(h, w, y, bias=b, mask=mask, need_nll=False, backend=backend)
    assert torch.equal(ex.matched, ex_full.matched) and torch.equal(ex.first_mismatch, ex_full.first_mismatch)
    assert_argmax_close(lm_head_argmax(h[:, -1], w, bias=b, backend=backend),
                        lm_head_argmax(h[:, -1], w, bias=b, backend="torch"),
                        naive_logits(h[:, -1], w, b), torch.float32)


# --- the Triton kernels' own knobs: vocab chunk and split ------------------------------------------

TRITON_SHAPES = [(1, 37, 13), (37, 20, 1000), (70, 64, 777), gpu_only((3000, 256, 50257))]


@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=case_id)
@pytest.mark.parametrize("chunk,split", [(0, 0), (16, 3), (100, 1)])
def test_triton_kernels_match_reference(tk, shape, dtype, chunk, split):
    dev = ready("triton", dtype)
    m, d, v = shape
    for bias in (True, False):
        h, w, b, y = random_problem(m, d, v, dtype, bias=bias, seed=m + v + bias, device=dev)
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


@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("v,chunk", [(13, 16), (200, 32), (1000, 64)])
def test_triton_kernels_forced_ties_exact(tk, dtype, v, chunk):
    dev = ready("triton", dtype)
    h, w, b, y = quantised_problem(24, 16, v, dtype, bias=True, seed=v, chunk=chunk, device=dev)
    arg, match, nll = naive_scores(h, w, b, y)
    assert bool((~match).any()) and bool(match.any())
    for split in (0, 2):  # 0: the kernel's own choice
        got, got_nll = tk.memscore(h, w, b, y, True, False, chunk, split)
        assert torch.equal(got, match)
        torch.testing.assert_close(got_nll, nll, atol=1e-5, rtol=1e-5)
        assert torch.equal(tk.lm_head_argmax(h, w, b, chunk, split), arg)
        pruned, _ = tk.memscore(h, w, b, y, False, True, chunk, split)
        assert torch.equal(pruned, match)


def test_triton_target_upper_bound_bounds_the_rounded_target_logit(tk):
    for dtype in (torch.float32, torch.float16):
        h, w, b, y = random_problem(200, 64, 50, dtype, bias=True, seed=1)
        bound = tk.target_upper_bound(h, w, b, y)
        exact = naive_logits(h, w, b).gather(1, y[:, None]).squeeze(1)
        assert (bound >= exact).all()
        # and barely above it (a worst-case float32 error bound, ~1e-4 relative here, or one fp16 ulp):
        # only logits that close to the target escape pruning
        rel = 2.0 ** -9 if dtype == torch.float16 else 1e-3
        assert ((bound - exact) <= rel * exact.abs().clamp_min(1)).all()


# --- exact cases: ties, early exit -------------------------------------------------------------


# (m, V, chunk): quantised problems, the best row duplicated within a chunk and a chunk further on
@pytest.mark.parametrize("backend,dtype,problem",
                         cases(["torch", "cpp"], DTYPES, [(24, 13, 4), (24, 200, 32), (24, 1000, 333)])
                         + cases(GPU_BACKENDS, DTYPES, [(64, 13, 4), (64, 200, 64), (64, 5000, 64)]))
def test_forced_ties_lowest_index_wins(backend, dtype, problem):
    dev = ready(backend, dtype)
    m, v, chunk = problem
    h, w, b, y = quantised_problem(m, 16, v, dtype, bias=True, seed=v, chunk=chunk, device=dev)
    arg, match, nll = naive_scores(h, w, b, y)
    lg = naive_logits(h, w, b)
    n_tied_miss = int(((lg.gather(1, y[:, None]).squeeze(1) == lg.max(1).values) & ~match).sum())
    assert n_tied_miss > 0, "the problem must contain targets that tie the maximum at a higher index"
    for c in _chunks(dev, chunk):
        got_match, got_nll = _flat_scores(h, w, b, y, backend, c)
        assert torch.equal(got_match, match)  # exact logits: no tolerance
        torch.testing.assert_close(got_nll, nll, atol=1e-5, rtol=1e-5)
        assert torch.equal(lm_head_argmax(h, w, bias=b, chunk_size=c, backend=backend), arg)
        assert int(_pruned(h, w, b, y, backend, c).matched[0]) == int(match.sum())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_early_exit_equals_full(dtype, isa, monkeypatch):
    backend_or_skip("cpp")
    isa_or_skip(isa, monkeypatch)
    g = torch.Generator().manual_seed(4)
    bsz, seq = 5, 9
    problems = [random_problem(bsz * seq, 40, 2000, dtype, bias=True, seed=8, hit_frac=0.8),
                quantised_problem(bsz * seq, 16, 2000, dtype, bias=True, seed=9, chunk=64)]
    for h, w, b, y in problems:
        h, y = h.view(bsz, seq, -1), y.view(bsz, seq)
        mask = torch.rand(bsz, seq, generator=g) < 0.8
        mask[0] = True  # one fully scored row, which is mostly hits
        for chunk in (None, 64, 257):
            full = memscore_examples(h, w, y, bias=b, mask=mask, need_nll=False, chunk_size=chunk,
                                     backend="cpp")
            pruned = memscore_examples(h, w, y, bias=b, mask=mask, need_nll=False, early_exit=True,
                                       chunk_size=chunk, backend="cpp")
            for f in ("exact", "first_mismatch", "matched"):
                assert torch.equal(getattr(pruned, f), getattr(full, f)), f
            assert torch.isnan(pruned.mean_nll).all()
        assert not bool(full.exact.all()) and int(full.matched.sum()) > 0  # both hits and misses


@pytest.mark.parametrize("backend", cases(GPU_BACKENDS))
def test_early_exit_equals_full_gpt2_vocab(backend):
    dev = ready(backend)
    bsz, seq, d, v = 16, 50, 128, 50257
    h, w, b, y = random_problem(bsz * seq, d, v, torch.float16, bias=False, seed=9, hit_frac=0.9, device=dev)
    h, y = h.view(bsz, seq, d), y.view(bsz, seq)
    mask = torch.rand(bsz, seq, device=dev) < 0.9
    full = memscore_examples(h, w, y, mask=mask, need_nll=False, backend=backend)
    pruned = memscore_examples(h, w, y, mask=mask, need_nll=False, early_exit=True, backend=backend)
    for f in ("exact", "first_mismatch", "matched"):
        assert torch.equal(getattr(pruned, f), getattr(full, f)), f
    ref = memscore_examples(h, w, y, mask=mask, need_nll=False, backend="torch")
    assert (full.matched - ref.matched).abs().max() <= 2  # near-ties only


def test_results_do_not_depend_on_batch():
    """A row's scores are the same alone and inside a batch (the match bits bit for bit)."""
    backend_or_skip("cpp")
    h, w, b, y = random_problem(300, 32, 3000, torch.float32, bias=True, seed=21)
    match, nll = _flat_scores(h, w, b, y, "cpp")
    arg = lm_head_argmax(h, w, bias=b, backend="cpp")
    for lo, hi in ((0, 1), (17, 30), (100, 300)):
        m2, n2 = _flat_scores(h[lo:hi], w, b, y[lo:hi], "cpp")
        assert torch.equal(m2, match[lo:hi])
        assert torch.equal(lm_head_argmax(h[lo:hi], w, bias=b, backend="cpp"), arg[lo:hi])
        torch.testing.assert_close(n2, nll[lo:hi], atol=1e-5, rtol=1e-6)


def test_thread_count_does_not_change_results():
    backend_or_skip("cpp")
    h, w, b, y = random_problem(40, 32, 3000, torch.float16, bias=True, seed=2)
    code = (
        "import torch, sys; sys.path.insert(0, 'tests'); torch.set_num_threads({n});"
        "from memscore_checks import random_problem;"
        "from tinymem_fast.ops.memscore import memscore, lm_head_argmax;"
        "h, w, b, y = random_problem(40, 32, 3000, torch.float16, bias=True, seed=2);"
        "s = memscore(h[None], w, y[None], bias=b, backend='cpp');"
        "print(''.join('1' if x else '0' for x in s.match[0].tolist()));"
        "print(lm_head_argmax(h, w, bias=b, backend='cpp').tolist())"
    )
    outs = [subprocess.run([sys.executable, "-c", code.format(n=n)], capture_output=True, text=True,
                           check=True).stdout for n in (1, 2)]
    assert outs[0] == outs[1]
    assert outs[0].splitlines()[1] == str(lm_head_argmax(h, w, bias=b, backend="cpp").tolist())


# --- masks and reductions ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_mask_and_reductions(backend):
    backend_or_skip(backend)
    bsz, seq, d, v = 4, 11, 24, 300
    h, w, b, y = random_problem(bsz * seq, d, v, torch.float32, bias=True, seed=13, hit_frac=0.7)
    h, y = h.view(bsz, seq, d), y.view(bsz, seq)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(bsz, seq, generator=g) < 0.6
    mask[1] = False  # a row with nothing scored
    mask[2, 3:] = True
    y = torch.where(mask, y, torch.full_like(y, -100))  # padding ids outside [0, V) are never looked at
    s = memscore(h, w, y, bias=b, mask=mask, backend=backend)
    assert isinstance(s, TokenScores) and s.match.shape == (bsz, seq) and s.nll.dtype == torch.float32
    assert not s.match[~mask].any() and not s.nll[~mask].any()
    full = memscore(h, w, torch.where(mask, y, 0), bias=b, backend=backend)
    assert torch.equal(s.match[mask], full.match[mask])
    torch.testing.assert_close(s.nll[mask], full.nll[mask])

    ex = memscore_examples(h, w, y, bias=b, mask=mask, backend=backend)
    assert isinstance(ex, ExampleScores)
    exact, first, matched, mean = oracle_examples(s.match, s.nll, mask)
    assert torch.equal(ex.exact, exact) and torch.equal(ex.first_mismatch, first)
    assert torch.equal(ex.matched, matched)
    torch.testing.assert_close(ex.mean_nll, mean, equal_nan=True)
    assert bool(ex.exact[1]) and int(ex.first_mismatch[1]) == 0 and math.isnan(float(ex.mean_nll[1]))
    assert ex.first_mismatch.dtype == torch.int64 and ex.matched.dtype == torch.int64

    no_nll = memscore_examples(h, w, y, bias=b, mask=mask, need_nll=False, backend=backend)
    assert torch.isnan(no_nll.mean_nll).all() and torch.equal(no_nll.matched, ex.matched)


def test_reduce_scores_counts_within_scored_positions():
    match = torch.tensor([[True, False, True, False], [True, True, True, True]])
    nll = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]])
    mask = torch.tensor([[False, True, True, True], [True, True, False, False]])
    ex = reduce_scores(TokenScores(match, nll), mask)
    assert ex.exact.tolist() == [False, True]
    assert ex.first_mismatch.tolist() == [0, 2]  # the miss at column 1 is the first scored position
    assert ex.matched.tolist() == [1, 2]
    torch.testing.assert_close(ex.mean_nll, torch.tensor([3.0, 0.5]))
    ex_all = reduce_scores(TokenScores(match, nll))
    assert ex_all.first_mismatch.tolist() == [1, 4] and ex_all.matched.tolist() == [2, 4]


def test_dispatch_defaults_to_cpp_on_cpu():
    backend_or_skip("cpp")
    from tinymem_fast.ops import OP_FAMILIES

    assert "memscore" in OP_FAMILIES
    assert registry.select("memscore", "cpu") == "cpp"


# --- validation ---------------------------------------------------------------------------------


def _ok():
    return torch.randn(2, 3, 8), torch.randn(10, 8), torch.randint(0, 10, (2, 3))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_bad_inputs_raise(backend):
    backend_or_skip(backend)
    h, w, y = _ok()
    checks = [
        (ValueError, "hidden must be", lambda: memscore(h[0], w, y, backend=backend)),
        (ValueError, "weight", lambda: memscore(h, w[None], y, backend=backend)),
        (ValueError, "d=8", lambda: memscore(h, torch.randn(10, 9), y, backend=backend)),
        (TypeError, "cast them", lambda: memscore(h, w.half(), y, backend=backend)),
        (TypeError, "float32, float16 or bfloat16", lambda: memscore(h.double(), w.double(), y,
                                                                     backend=backend)),
        (ValueError, "bias must be", lambda: memscore(h, w, y, bias=torch.randn(9), backend=backend)),
        (TypeError, "bias is", lambda: memscore(h, w, y, bias=torch.randn(10).half(), backend=backend)),
        (ValueError, "targets must be", lambda: memscore(h, w, y[:, :2], backend=backend)),
        (TypeError, "integer token ids", lambda: memscore(h, w, y.float(), backend=backend)),
        (ValueError, "id 10 at position", lambda: memscore(h, w, torch.full((2, 3), 10), backend=backend)),
        (ValueError, "id -1 at position", lambda: memscore(h, w, torch.full((2, 3), -1), backend=backend)),
        (TypeError, "mask must be bool", lambda: memscore(h, w, y, mask=torch.ones(2, 3), backend=backend)),
        (ValueError, "mask must be", lambda: memscore(h, w, y, mask=torch.ones(2, 2, dtype=torch.bool),
                                                      backend=backend)),
        (ValueError, "empty input", lambda: memscore(h[:, :0], w, y[:, :0], backend=backend)),
        (ValueError, "empty input", lambda: memscore(h, w[:0], y, backend=backend)),
        (ValueError, "chunk_size", lambda: memscore(h, w, y, chunk_size=0, backend=backend)),
        (ValueError, "early_exit", lambda: memscore_examples(h, w, y, early_exit=True, backend=backend)),
        (ValueError, "hidden must be", lambda: lm_head_argmax(h, w, backend=backend)),
    ]
    for exc, msg, fn in checks:
        with pytest.raises(exc, match=msg):
            fn()


def test_masked_out_bad_targets_are_ignored():
    h, w, y = _ok()
    y[0, 1] = 99
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 1] = False
    memscore(h, w, y, mask=mask)  # fine: the bad id is never scored
    with pytest.raises(ValueError, match="id 99 at position \\[0, 1\\]"):
        memscore(h, w, y)


def test_cpp_op_checks_targets_itself():
    """The compiled op is public (torch.ops.tinymem.memscore): it must not read out of bounds either."""
    backend_or_skip("cpp")
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(RuntimeError, match="id 12 at row 2"):
        torch.ops.tinymem.memscore(h, w, None, torch.tensor([0, 1, 12, 3]), True, False, 0)


@pytest.mark.cuda
@needs_cuda_backend
def test_cuda_op_rejects_bad_input():
    ops = torch.ops.tinymem
    h, w = torch.randn(4, 8, device="cuda"), torch.randn(10, 8, device="cuda")
    y = torch.zeros(4, dtype=torch.long, device="cuda")
    with pytest.raises(RuntimeError, match="weight is"):
        ops.memscore(h, w.half(), None, y, True, False, 0)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        ops.memscore(h, w.cpu(), None, y, True, False, 0)
    with pytest.raises(RuntimeError, match="targets must be int64"):
        ops.memscore(h, w, None, y.int(), True, False, 0)
    with pytest.raises(RuntimeError, match="early_exit needs need_nll=false"):
        ops.memscore(h, w, None, y, True, True, 0)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.lm_head_argmax(h, w, torch.randn(9, device="cuda"), 0)


# (M, d, V, chunk_size): one row and a few (decoding: the vocabulary cut into many slices), a V that is
# no whole number of 16-byte vectors (the scalar tail), several vocabulary chunks with a partial last one,
# and more rows than one GEMM takes (two row blocks)
CUDA_HEAD_SHAPES = [(1, 64, 50257, 0), (3, 128, 50304, 0), (37, 40, 1001, 300), (130, 64, 777, 256),
                    (8200, 64, 700, 0)]


@pytest.mark.cuda
@needs_cuda_backend
@pytest.mark.parametrize("head", ["gemm", "simt"])
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("shape", CUDA_HEAD_SHAPES, ids=case_id)
def test_cuda_head_paths_match_reference(shape, dtype, head, monkeypatch):
    """Both CUDA paths (cuBLAS blocks + reductions, the default; SIMT tiles) against the torch reference,
    through the raw op so the chunk size reaches the cuBLAS path."""
    monkeypatch.setenv("TINYMEM_CUDA_HEAD", head)
    m, d, v, chunk = shape
    for bias in (True, False):
        h, w, b, y = random_problem(m, d, v, dtype, bias=bias, seed=m + v, device="cuda")
        lg = naive_logits(h, w, b)
        ref_arg, ref_nll = scores_torch(h, w, b, y, True, 0)
        match, nll = torch.ops.tinymem.memscore(h, w, b, y, True, False, chunk)
        assert match.dtype == torch.bool and nll.dtype == torch.float32 and match.shape == (m,)
        assert_match_close(match, ref_arg == y, lg, y, dtype)
        assert_nll_close(nll, ref_nll, dtype)
        only_match, zeros = torch.ops.tinymem.memscore(h, w, b, y, False, False, chunk)
        assert torch.equal(only_match, match) and not zeros.any()
        pruned, _ = torch.ops.tinymem.memscore(h, w, b, y, False, True, chunk)
        assert torch.equal(pruned, match)
        arg = torch.ops.tinymem.lm_head_argmax(h, w, b, chunk)
        assert arg.dtype == torch.int64
        assert_argmax_close(arg, ref_arg, lg, dtype)


@pytest.mark.cuda
@needs_cuda_backend
@pytest.mark.parametrize("head", ["gemm", "simt"])
@pytest.mark.parametrize("v,chunk", [(13, 0), (1000, 256), (5000, 1024), (50257, 0)])
def test_cuda_head_paths_forced_ties_exact(v, chunk, head, monkeypatch):
    """Exact logits (a coarse grid) with the best row duplicated within and across chunks and slices:
    the lowest index wins in both paths, bit for bit, whatever the block and slice boundaries."""
    monkeypatch.setenv("TINYMEM_CUDA_HEAD", head)
    for dtype in DTYPES:
        h, w, b, y = quantised_problem(64, 16, v, dtype, bias=True, seed=v, chunk=max(chunk, 64),
                                       device="cuda")
        arg, match, nll = naive_scores(h, w, b, y)
        got, got_nll = torch.ops.tinymem.memscore(h, w, b, y, True, False, chunk)
        assert torch.equal(got, match)
        torch.testing.assert_close(got_nll, nll, atol=1e-5, rtol=1e-5)
        assert torch.equal(torch.ops.tinymem.lm_head_argmax(h, w, b, chunk), arg)


@pytest.mark.cuda
@needs_cuda_backend
def test_cuda_head_rejects_unknown_path(monkeypatch):
    monkeypatch.setenv("TINYMEM_CUDA_HEAD", "wmma")
    h, w = torch.randn(4, 8, device="cuda"), torch.randn(10, 8, device="cuda")
    with pytest.raises(RuntimeError, match="TINYMEM_CUDA_HEAD must be"):
        torch.ops.tinymem.lm_head_argmax(h, w, None, 0)


def test_compiled_ops_have_fake_implementations():
    """Shape-only kernels let torch.compile / FakeTensor trace through the compiled ops."""
    backend_or_skip("cpp")
    from torch._subclasses.fake_tensor import FakeTensorMode

    h, w, y = _ok()
    memscore(h, w, y, backend="cpp")  # loads the extension and registers the fakes
    with FakeTensorMode():
        fh, fw, fy = torch.empty(5, 8), torch.empty(10, 8), torch.zeros(5, dtype=torch.long)
        match, nll = torch.ops.tinymem.memscore(fh, fw, None, fy, True, False, 0)
        arg = torch.ops.tinymem.lm_head_argmax(fh, fw, None, 0)
    assert match.shape == (5,) and match.dtype == torch.bool and nll.dtype == torch.float32
    assert arg.shape == (5,) and arg.dtype == torch.int64


# --- suppressed ids and non-finite inputs, on every backend ---------------------------------------


@pytest.mark.parametrize("where", ["last_id", "first_chunk", "all_but_target_chunk"])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("backend", cases(["torch", "cpp", "triton", "cuda"]))
def test_suppressed_ids_filling_a_vocab_chunk(backend, rows, where):
    """A vocabulary tile or slice whose logits are all -inf (ids suppressed with a -inf bias; an EOS as the
    last id with V = 1 mod the chunk size) adds nothing to the NLL. Its online sum of exps used to take
    exp(-inf - -inf) = NaN, and the row's NLL became NaN where the reference is finite."""
    dev = ready(backend, torch.float32)
    chunk, vocab = 16, 3 * 16 + 1
    g = torch.Generator().manual_seed(rows)
    h, w = torch.randn(rows, 8, generator=g), torch.randn(vocab, 8, generator=g)
    bias = torch.randn(vocab, generator=g)
    allowed = torch.ones(vocab, dtype=torch.bool)
    if where == "last_id":
        allowed[-1] = False
    elif where == "first_chunk":
        allowed[:chunk] = False
    else:
        allowed[: 2 * chunk] = False
        allowed[3 * chunk:] = False
    bias[~allowed] = float("-inf")
    ids = allowed.nonzero().squeeze(1)
    y = ids[torch.randint(0, ids.numel(), (rows,), generator=g)]
    logits = h.double() @ w.double().t() + bias.double()
    nll_ref = (torch.logsumexp(logits, 1) - logits.gather(1, y[:, None]).squeeze(1)).float()
    for split in (0, 2, 4) if backend == "triton" else (None,):
        if split is None:
            got = memscore(h[None].to(dev), w.to(dev), y[None].to(dev), bias=bias.to(dev), chunk_size=chunk,
                           backend=backend)
            match, nll = got.match[0].cpu(), got.nll[0].cpu()
        else:
            match, nll = triton_kernels().memscore(h.to(dev), w.to(dev), bias.to(dev), y.to(dev), True, False,
                                                   chunk, split)
            match, nll = match.cpu(), nll.cpu()
        assert torch.isfinite(nll).all(), (split, nll)
        torch.testing.assert_close(nll, nll_ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(match, logits.argmax(1) == y)
        arg = lm_head_argmax(h.to(dev), w.to(dev), bias=bias.to(dev), chunk_size=chunk, backend=backend)
        assert bool(allowed[arg.cpu()].all())


@pytest.mark.parametrize("backend", cases(["torch", "cpp", "triton", "cuda"]))
def test_non_finite_hidden_or_weight_raise(backend):
    dev = ready(backend, torch.float32)
    h, w, y = (t.to(dev) for t in _ok())
    for bad, name in ((float("nan"), "hidden"), (float("inf"), "hidden"), (float("nan"), "weight"),
                      (float("-inf"), "weight")):
        hh, ww = h.clone(), w.clone()
        (hh if name == "hidden" else ww)[1, 2 if name == "hidden" else 3] = bad
        pattern = ("hidden contains NaN or inf .* at position \\[1, 2" if name == "hidden"
                   else "weight contains NaN or inf .* at position \\[1, 3\\]")
        with pytest.raises(ValueError, match=pattern):
            memscore(hh, ww, y, backend=backend)
        with pytest.raises(ValueError, match=pattern):
            memscore_examples(hh, ww, y, need_nll=False, early_exit=True, backend=backend)
        with pytest.raises(ValueError, match=f"{name} contains NaN or inf"):
            lm_head_argmax(hh[1], ww, backend=backend)
    # a -inf bias is how ids are suppressed: accepted; validate=False skips the checks (and their sync)
    bias = torch.zeros(10, device=dev)
    bias[3] = float("-inf")
    s = memscore(h, w, torch.full_like(y, 3), bias=bias, backend=backend)
    assert not bool(s.match.any()) and bool(torch.isinf(s.nll).all())  # a suppressed id: never, +inf NLL
    h[0, 0, 0] = float("nan")
    memscore(h, w, y, backend=backend, validate=False)


def test_weight_checked_again_only_after_it_changed():
    w = torch.randn(10, 8)
    h, _, y = _ok()
    memscore(h, w, y)
    with torch.no_grad():
        w[0, 0] = float("nan")  # an in-place write bumps the version counter: checked again
    with pytest.raises(ValueError, match="weight"):
        memscore(h, w, y)


def test_nll_has_gradients_when_inputs_require_them():
    """memscore as a loss: the NLL carries gradients (via the fused linear cross-entropy), equal to those of
    the plain logits path; match never has any."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 4, 8, generator=g, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(11, 8, generator=g).requires_grad_()
    y = torch.randint(0, 11, (2, 4), generator=g)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 3] = False
    s = memscore(h, w, y, mask=mask)
    assert s.nll.requires_grad and not s.match.requires_grad
    s.nll.sum().backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy((h2 @ w2.t()).view(-1, 11), y.view(-1), reduction="none")
    (ref * mask.view(-1)).sum().backward()
    torch.testing.assert_close(s.nll.detach(), (ref * mask.view(-1)).detach().view(2, 4))
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    with torch.no_grad():
        assert not memscore(h, w, y).nll.requires_grad
