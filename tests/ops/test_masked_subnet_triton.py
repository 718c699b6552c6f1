"""Triton masked-subnet kernels against the torch reference (interpreter on CPU, real kernels on CUDA)."""

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

ROOT = pathlib.Path(__file__).resolve().parents[2]
try:
    from tinymem_fast.ops import masked_subnet as ms
except ImportError:
    sys.path.insert(0, str(ROOT))
    from tinymem_fast.ops import masked_subnet as ms
try:
    from tinymem_fast.kernels import masked_subnet as tk
except ImportError:
    # tinymem_fast.kernels exists only once the package is installed (it maps the top-level kernels/)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from kernels import masked_subnet as tk

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

if not CUDA and type(tk._masked_weight_kernel).__name__ != "InterpretedFunction":
    pytest.skip("no CUDA GPU and the kernels were imported before TRITON_INTERPRET=1 was set",
                allow_module_level=True)

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
SHAPES = [(1, 1), (7, 13), (33, 65), (128, 512),
          pytest.param((1000, 4097), marks=cuda_only), pytest.param((4096, 4099), marks=cuda_only)]
# the interpreter's bfloat16 is broken, so bf16 runs only on a real GPU
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=cuda_only)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, seed):
    return torch.randn(shape, generator=_gen(seed)).to(dtype).to(DEVICE)


def _check_threshold(scores: torch.Tensor, k: int) -> None:
    value, cut = tk.threshold(scores, k)
    ref_value, ref_cut = ms.threshold_torch(scores, k)
    assert value.shape == () and value.dtype == torch.float32 and value.device == scores.device
    assert cut.shape == () and cut.dtype == torch.int64 and cut.device == scores.device
    assert torch.equal(value, ref_value), (k, value, ref_value)
    assert torch.equal(cut, ref_cut), (k, cut, ref_cut)
    keep = ms.keep_mask_torch(scores, value, cut)
    assert int((~keep).sum()) == k


def _ks(n: int) -> list[int]:
    return sorted({0, 1, n // 3, n - 1}) if n > 1 else [0]


# --- threshold --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_threshold_random(shape, dtype):
    scores = _randn(shape, dtype, seed=sum(shape))
    for k in _ks(scores.numel()):
        _check_threshold(scores, k)


def _tied(kind: str, shape, dtype, seed: int) -> torch.Tensor:
    g = _gen(seed)
    if kind == "quantised":  # a handful of distinct |s|, both signs
        s = torch.randint(-3, 4, shape, generator=g).float() * 0.25
    elif kind == "all_equal":  # one |s| with random signs
        s = torch.where(torch.rand(shape, generator=g) < 0.5, -0.375, 0.375)
    elif kind == "signed_zeros":  # +0.0 and -0.0 must tie, plus a few nonzeros
        s = torch.where(torch.rand(shape, generator=g) < 0.5, -0.0, 0.0)
        s = torch.where(torch.rand(shape, generator=g) < 0.1, torch.randn(shape, generator=g), s)
    else:
        raise AssertionError(kind)
    return s.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 13), (33, 65), (128, 512)])
@pytest.mark.parametrize("kind", ["quantised", "all_equal", "signed_zeros"])
def test_threshold_ties(kind, shape, dtype):
    scores = _tied(kind, shape, dtype, seed=7)
    n = scores.numel()
    for k in sorted({1, n // 4, n // 2, n - 1}):
        _check_threshold(scores, k)


def test_threshold_all_zero_and_single():
    _check_threshold(torch.zeros(5, 3, device=DEVICE), 7)
    _check_threshold(torch.full((1, 1), -0.0, device=DEVICE), 0)
    _check_threshold(torch.tensor([[-2.5]], device=DEVICE), 1)  # k == numel is allowed too


def test_threshold_tiny_blocks(monkeypatch):
    # small blocks: many tiles per persistent program, ties spread over many blocks, ragged tails
    monkeypatch.setattr(tk, "_HIST_BLOCK", 64)
    monkeypatch.setattr(tk, "_TIE_BLOCK", 32)
    for kind in ("quantised", "all_equal", "signed_zeros"):
        scores = _tied(kind, (20, 33), torch.float32, seed=3)
        n = scores.numel()
        for k in (1, 31, 32, 33, n // 2, n - 1):
            _check_threshold(scores, k)


def test_threshold_extreme_magnitudes():
    vals = torch.tensor([float("inf"), -float("inf"), 3.4e38, -1e-45, 1e-45, 1.2e-38, -0.0, 0.0, 1.0, -1.0])
    scores = vals.repeat(5)[torch.randperm(50, generator=_gen(0))].to(DEVICE)
    for k in range(0, 50, 7):
        _check_threshold(scores, k)
    _check_threshold(scores, 49)


def test_threshold_rejects_bad_k():
    s = torch.randn(4, 4, device=DEVICE)
    for k in (-1, 17):
        with pytest.raises(ValueError):
            tk.threshold(s, k)
    with pytest.raises(ValueError):
        tk.threshold(torch.empty(0, device=DEVICE), 0)


# --- masked weight ----------------------------------------------------------------------------


@pytest.mark.parametrize("s_dtype", DTYPES)
@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (33, 65), pytest.param((1000, 4097), marks=cuda_only)])
def test_masked_weight(shape, w_dtype, s_dtype):
    weight = _randn(shape, w_dtype, seed=1)
    for scores in (_randn(shape, s_dtype, seed=2), _tied("quantised", shape, s_dtype, seed=2)):
        n = scores.numel()
        for k in _ks(n):
            value, cut = ms.threshold_torch(scores, k)
            out = tk.masked_weight(weight, scores, value, cut)
            ref = ms.masked_weight_torch(weight, scores, value, cut)
            assert out.dtype == w_dtype and out.shape == weight.shape
            assert torch.equal(out, ref), k
            # the mask implied by the output, checked on weights that are never zero
            ones = torch.ones_like(weight)
            assert torch.equal(tk.masked_weight(ones, scores, value, cut) != 0,
                               ms.keep_mask_torch(scores, value, cut))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 in numpy
def test_masked_weight_nonfinite_weights():
    scores = _tied("quantised", (7, 13), torch.float32, seed=5)
    weight = _randn((7, 13), torch.float32, seed=6)
    weight.view(-1)[::5] = float("inf")
    weight.view(-1)[1::7] = float("nan")
    value, cut = ms.threshold_torch(scores, 40)
    torch.testing.assert_close(tk.masked_weight(weight, scores, value, cut),
                               ms.masked_weight_torch(weight, scores, value, cut), rtol=0, atol=0,
                               equal_nan=True)


# --- straight-through gradient ----------------------------------------------------------------


@pytest.mark.parametrize("s_dtype", DTYPES)
@pytest.mark.parametrize("g_dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (33, 65), (128, 512),
                                   pytest.param((1000, 4097), marks=cuda_only)])
def test_ste_grad(shape, g_dtype, s_dtype):
    grad = _randn(shape, g_dtype, seed=3)
    weight = _randn(shape, g_dtype, seed=4)
    scores = _tied("signed_zeros", shape, s_dtype, seed=5)  # sign(+-0) = 0 must hold
    out = tk.ste_grad(grad, weight, scores)
    ref = ms.ste_grad_torch(grad, weight, scores)
    assert out.dtype == s_dtype and out.shape == scores.shape
    assert torch.equal(out, ref)


# --- SGD step ---------------------------------------------------------------------------------


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("g_dtype", DTYPES)
@pytest.mark.parametrize("s_dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (33, 65), pytest.param((1000, 4097), marks=cuda_only)])
def test_sgd_step(shape, s_dtype, g_dtype, maximize):
    scores = _randn(shape, s_dtype, seed=6)
    buf = torch.zeros(shape, dtype=torch.float32, device=DEVICE)
    ref_scores, ref_buf = scores.clone(), buf.clone()
    for step in range(3):
        grad = _randn(shape, g_dtype, seed=10 + step)
        tk.sgd_step(scores, grad, buf, 0.1, 0.9, 5e-4, maximize)
        ms.sgd_step_torch(ref_scores, grad, ref_buf, 0.1, 0.9, 5e-4, maximize)
    # float32 within a few ulp; low-precision scores within one ulp of their own dtype
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(buf, ref_buf, rtol=4 * eps, atol=4 * eps)
    tol = 4 * eps if s_dtype == torch.float32 else torch.finfo(s_dtype).eps
    torch.testing.assert_close(scores, ref_scores, rtol=tol, atol=tol)
    assert scores.dtype == s_dtype and buf.dtype == torch.float32


def test_sgd_step_without_momentum_or_decay():
    scores = _randn((33, 65), torch.float32, seed=8)
    grad = _randn((33, 65), torch.float32, seed=9)
    buf = torch.full((33, 65), 3.0, device=DEVICE)
    ref_scores, ref_buf = scores.clone(), buf.clone()
    tk.sgd_step(scores, grad, buf, 1.0, 0.0, 0.0, False)
    ms.sgd_step_torch(ref_scores, grad, ref_buf, 1.0, 0.0, 0.0, False)
    torch.testing.assert_close(buf, grad, rtol=0, atol=0)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=0)


def test_float64_inputs():
    # float64 is accepted by the dispatcher; the reference, like the kernels, works in float32
    scores = _tied("quantised", (33, 65), torch.float64, seed=11) + _randn((33, 65), torch.float64, seed=12)
    weight, grad = _randn((33, 65), torch.float64, seed=13), _randn((33, 65), torch.float64, seed=14)
    for k in (1, 700, 2144):
        _check_threshold(scores, k)
    value, cut = ms.threshold_torch(scores, 700)
    assert torch.equal(tk.masked_weight(weight, scores, value, cut),
                       ms.masked_weight_torch(weight, scores, value, cut))
    assert torch.equal(tk.ste_grad(grad, weight, scores), ms.ste_grad_torch(grad, weight, scores))
    buf = torch.zeros_like(scores, dtype=torch.float32)
    ref_scores, ref_buf = scores.clone(), buf.clone()
    tk.sgd_step(scores, grad, buf, 0.1, 0.9, 5e-4, False)
    ms.sgd_step_torch(ref_scores, grad, ref_buf, 0.1, 0.9, 5e-4, False)
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(scores, ref_scores, rtol=4 * eps, atol=4 * eps)
