"""Masked-subnet ops on every backend (torch, cpp, triton, cuda) against the plain-PyTorch reference, plus
the autograd path, the module, the optimizer and input validation.

The backend is a test parameter. Public-API tests go through ``tinymem_fast.ops.masked_subnet``; kernel
tests call each backend's kernels directly (the compiled ops, or the Triton module), which also reach
``k`` values the public API cannot ask for. Without a GPU the Triton kernels run in the interpreter
(tests/conftest.py sets TRITON_INTERPRET=1): small shapes only, no bfloat16. The cuda backend and
GPU-sized cases carry the ``cuda`` marker and skip without a GPU.
"""

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import backend_cases
import pytest
import torch
from backend_cases import DEVICES, case_id, cases, gpu_only, needs_cuda_backend
from conftest import backend_or_skip

from tinymem_fast.ops import masked_subnet as ms
from tinymem_fast.ops import registry

# --- backends, devices, cases ---------------------------------------------------------------------

FAST = ["cpp", "triton", "cuda"]  # every backend but the reference


GPU_BACKENDS = [gpu_only("triton"), "cuda"]
# the interpreter runs the Triton kernels in the kernel tests; through the public API (a thin dispatch over
# the same kernels) Triton runs on a GPU only, where it is the default backend
PUBLIC = ["cpp", gpu_only("triton"), "cuda"]


def triton_kernels():
    return backend_cases.triton_kernels("masked_subnet", "_masked_weight_kernel")


@pytest.fixture
def tk():
    return triton_kernels()


def ready(backend: str, *dtypes) -> str:
    """Skip unless ``backend`` runs here on ``dtypes``; -> the device its tensors go to."""
    return backend_cases.ready(backend, dtypes, triton_kernels)


def kernel_ops(backend: str) -> SimpleNamespace:
    """The kernels under the public API, with one signature on every backend."""
    if backend == "triton":
        tk = triton_kernels()
        return SimpleNamespace(threshold=tk.threshold, masked_weight=tk.masked_weight, ste_grad=tk.ste_grad,
                               sgd_step=tk.sgd_step)
    registry.ext()  # importing tinymem_fast._C registers the compiled ops (cpp and cuda dispatch on device)
    ops = torch.ops.tinymem
    return SimpleNamespace(threshold=ops.subnet_threshold, masked_weight=ops.subnet_masked_weight,
                           ste_grad=ops.subnet_ste_grad, sgd_step=ops.subnet_sgd_step_)


# --- problems and checks --------------------------------------------------------------------------

SHAPES = [(1, 1), (7, 13), (33, 65), (128, 512)]
# the interpreter runs a kernel one Python pass per program: at (128, 512) a masked-weight or SGD case takes
# seconds, so those kernels meet that shape on a GPU only
INTERPRETED_SMALL = SHAPES[:3]
GPU_SHAPES = [(1000, 4097), (2560, 10240), (4096, 4099)]  # ragged tails, many blocks, tens of millions
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KINDS = ["randn", "quantised", "all_equal", "signed_zeros"]
KERNEL_KINDS = KINDS + ["zeros", "tiny"]


def make_scores(kind: str, shape, dtype=torch.float32, seed: int = 0, device="cpu") -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    kw = dict(generator=g, device=device)
    if kind == "randn":
        s = torch.randn(shape, **kw)
    elif kind == "quantised":  # nine levels, both signs of every magnitude: heavy ties
        s = torch.randint(-4, 5, shape, **kw).float() / 8
    elif kind == "all_equal":  # one |s|, random signs
        s = torch.where(torch.rand(shape, **kw) < 0.5, -0.375, 0.375)
    elif kind == "signed_zeros":  # +0.0 and -0.0 must tie (and sign(+-0) = 0), plus a few nonzeros
        s = torch.where(torch.rand(shape, **kw) < 0.5, -0.0, 0.0)
        s = torch.where(torch.rand(shape, **kw) < 0.1, torch.randn(shape, **kw), s)
    elif kind == "zeros":  # only +0 and -0: every entry ties
        s = torch.zeros(shape, device=device)
        s.view(-1)[::3] = -0.0
    elif kind == "tiny":  # float32 denormals (zeros in float16, denormals in bfloat16)
        s = torch.randn(shape, **kw) * 1e-39
    else:
        raise ValueError(kind)
    return s.to(dtype)


def kernel_cases(gpu_shapes, *axes, interpreted=SHAPES) -> list:
    """Kernel-test cases: cpp and cuda at SHAPES, triton at the ``interpreted`` ones in the interpreter
    (the others on a GPU), and ``gpu_shapes`` for triton and cuda on a GPU."""
    triton_shapes = [shape if shape in interpreted else gpu_only(shape) for shape in SHAPES]
    return (cases(["cpp", "cuda"], SHAPES, *axes) + cases(["triton"], triton_shapes, *axes)
            + cases(GPU_BACKENDS, gpu_shapes, *axes))


def randn(shape, dtype, seed: int, device) -> torch.Tensor:
    return make_scores("randn", shape, dtype, seed, device)


def oracle_dropped(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Independent of the library: a stable full sort of |s| (ties by flat index), first k dropped."""
    key = scores.reshape(-1).float().abs()
    order = torch.sort(key, stable=True).indices
    dropped = torch.zeros_like(key, dtype=torch.bool)
    dropped[order[:k]] = True
    return dropped.view(scores.shape)


def ratios_for(n: int):
    # masks 0 entries, exactly 1 entry, a middle value, and the large end
    return sorted({0.5 / n if n > 1 else 1e-9, min(0.999, 1.0 / n + 1e-12), 0.05, 0.3, 0.8})


def ks(n: int) -> list[int]:
    """k for the kernels: none, one, fractions whose cut lands inside a run of ties, all but one."""
    return sorted({k for k in (0, 1, n // 4, n // 3, n // 2, n - 1) if 0 <= k < n})


def check_threshold(threshold, scores: torch.Tensor, k: int) -> None:
    value, cut = threshold(scores, k)
    ref_value, ref_cut = ms.threshold_torch(scores, k)
    assert value.shape == () and value.dtype == torch.float32 and value.device == scores.device
    assert cut.shape == () and cut.dtype == torch.int64 and cut.device == scores.device
    assert torch.equal(value, ref_value), (k, value, ref_value)
    assert torch.equal(value.view(torch.int32), ref_value.view(torch.int32)), k  # same bits: +0, not -0
    assert torch.equal(cut, ref_cut), (k, cut, ref_cut)
    assert int((~ms.keep_mask_torch(scores, value, cut)).sum()) == k


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.element_size() == 4 else t.view(torch.int16)


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Same bits (so the same rounding), except that +0 and -0 count as equal."""
    assert got.dtype == want.dtype and got.shape == want.shape and got.device == want.device, what
    diff = (_bits(got) != _bits(want)) & ~((got == 0) & (want == 0))
    if diff.any():
        i = int(diff.reshape(-1).nonzero()[0])
        raise AssertionError(f"{what}: {int(diff.sum())} entries differ, first at flat index {i}: "
                             f"got {got.reshape(-1)[i].item()!r}, want {want.reshape(-1)[i].item()!r}")


# the kernels round op by op like sgd_step_torch: float32 to a few ulp, half-precision scores to one ulp
# of their own dtype (atol below that ulp for values near zero)
_EPS32 = torch.finfo(torch.float32).eps
_SGD_TOL = {torch.float32: dict(rtol=4 * _EPS32, atol=1e-7),
            torch.float16: dict(rtol=2.0 ** -10, atol=1e-6),
            torch.bfloat16: dict(rtol=2.0 ** -7, atol=1e-6)}


def assert_sgd_close(scores, ref_scores, buf, ref_buf) -> None:
    assert buf.dtype == torch.float32
    torch.testing.assert_close(buf, ref_buf, **_SGD_TOL[torch.float32])
    torch.testing.assert_close(scores.float(), ref_scores.float(), **_SGD_TOL[scores.dtype])


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """Same values, contiguous, but starting one element past a 16-byte boundary (scalar kernel path)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


# --- threshold: public API --------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_reference_matches_sort_oracle(shape, kind):
    s = make_scores(kind, shape, seed=1)
    for r in ratios_for(s.numel()):
        thr = ms.subnet_threshold(s, r, backend="torch")
        dropped = ~ms.subnet_keep_mask(s, thr)
        assert int(dropped.sum()) == thr.k == ms.num_dropped(s.numel(), r)
        assert torch.equal(dropped, oracle_dropped(s, thr.k)), (shape, kind, r)


@pytest.mark.parametrize("backend,shape,dtype,kind",
                         cases(PUBLIC, SHAPES + [(2560, 1030)], DTYPES, KINDS))
def test_threshold_matches_reference(backend, shape, dtype, kind):
    dev = ready(backend, dtype)
    s = make_scores(kind, shape, dtype, seed=2, device=dev)
    for r in ratios_for(s.numel()):
        ref = ms.subnet_threshold(s, r, backend="torch")
        got = ms.subnet_threshold(s, r, backend=backend)
        assert got.k == ref.k
        assert got.value.dtype == torch.float32 and got.cut.dtype == torch.int64
        assert got.value.item() == ref.value.item(), (r, got, ref)
        assert got.cut.item() == ref.cut.item(), (r, got, ref)


def test_num_dropped_is_exact_floor():
    assert ms.num_dropped(10, 0.3) == 3  # 0.3 * 10 in binary floating point is 2.999...
    assert ms.num_dropped(100, 0.07) == 7
    assert ms.num_dropped(10, 0.05) == 0
    assert ms.num_dropped(26_214_400, 0.05) == 1_310_720


# --- threshold: kernels -----------------------------------------------------------------------


@pytest.mark.parametrize("backend,shape,dtype,kind", kernel_cases(GPU_SHAPES, DTYPES, KERNEL_KINDS))
def test_threshold_kernel_matches_reference(backend, shape, dtype, kind):
    dev = ready(backend, dtype)
    scores = make_scores(kind, shape, dtype, seed=sum(shape), device=dev)
    threshold = kernel_ops(backend).threshold
    for k in ks(scores.numel()):
        check_threshold(threshold, scores, k)


@pytest.mark.parametrize("backend,dtype", cases(FAST, DTYPES))
def test_threshold_kernel_k_zero_keeps_everything(backend, dtype):
    dev = ready(backend, dtype)
    s = make_scores("randn", (7, 13), dtype, device=dev)
    value, cut = kernel_ops(backend).threshold(s, 0)
    assert value.item() == 0.0 and cut.item() == 0
    assert bool(ms.keep_mask_torch(s, value, cut).all())


def test_triton_threshold_all_zero_and_single(tk):
    dev = DEVICES["triton"]
    check_threshold(tk.threshold, torch.zeros(5, 3, device=dev), 7)
    check_threshold(tk.threshold, torch.full((1, 1), -0.0, device=dev), 0)
    check_threshold(tk.threshold, torch.tensor([[-2.5]], device=dev), 1)  # k == numel is allowed too


def test_triton_threshold_tiny_blocks(tk, monkeypatch):
    # small blocks: many tiles per persistent program, ties spread over many blocks, ragged tails
    monkeypatch.setattr(tk, "_HIST_BLOCK", 64)
    monkeypatch.setattr(tk, "_TIE_BLOCK", 32)
    for kind in ("quantised", "all_equal", "signed_zeros"):
        scores = make_scores(kind, (20, 33), seed=3, device=DEVICES["triton"])
        n = scores.numel()
        for k in (1, 31, 32, 33, n // 2, n - 1):
            check_threshold(tk.threshold, scores, k)


def test_triton_threshold_extreme_magnitudes(tk):
    vals = torch.tensor([float("inf"), -float("inf"), 3.4e38, -1e-45, 1e-45, 1.2e-38, -0.0, 0.0, 1.0, -1.0])
    scores = vals.repeat(5)[torch.randperm(50, generator=torch.Generator().manual_seed(0))]
    scores = scores.to(DEVICES["triton"])
    for k in range(0, 50, 7):
        check_threshold(tk.threshold, scores, k)
    check_threshold(tk.threshold, scores, 49)


def test_triton_threshold_rejects_bad_k(tk):
    dev = DEVICES["triton"]
    s = torch.randn(4, 4, device=dev)
    for k in (-1, 17):
        with pytest.raises(ValueError):
            tk.threshold(s, k)
    with pytest.raises(ValueError):
        tk.threshold(torch.empty(0, device=dev), 0)


@pytest.mark.cuda
@needs_cuda_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
def test_cuda_threshold_misaligned(dtype):
    s = misaligned(make_scores("quantised", (128, 96), dtype, seed=3, device="cuda"))
    for k in ks(s.numel()):
        value, cut = kernel_ops("cuda").threshold(s, k)
        want_v, want_c = ms.threshold_torch(s, k)
        assert (value.item(), cut.item()) == (want_v.item(), want_c.item()), k


@pytest.mark.cuda
@needs_cuda_backend
def test_cuda_threshold_chunk_boundaries():
    # ties spread over many 8192-entry chunks; the need-th tie lands in various chunks
    n = 8192 * 37 + 5
    s = make_scores("quantised", (n,), seed=7, device="cuda")
    for k in (1, 8191, 8192, 8193, n // 2, n // 2 + 1, n - 2, n - 1):
        value, cut = kernel_ops("cuda").threshold(s, k)
        want_v, want_c = ms.threshold_torch(s, k)
        assert (value.item(), cut.item()) == (want_v.item(), want_c.item()), k


@pytest.mark.slow
@pytest.mark.cuda
@needs_cuda_backend
@pytest.mark.parametrize("dtype,kind", [(torch.float32, "randn"), (torch.bfloat16, "quantised")])
def test_cuda_threshold_170m(dtype, kind):
    s = make_scores(kind, (170_000_000,), dtype, seed=11, device="cuda")
    for k in (1, s.numel() // 2, s.numel() - 1):
        value, cut = kernel_ops("cuda").threshold(s, k)
        want_v, want_c = ms.threshold_torch(s, k)
        assert (value.item(), cut.item()) == (want_v.item(), want_c.item()), k


# --- masked weight ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend,shape,wdtype,sdtype",
                         cases(PUBLIC, SHAPES, DTYPES, [torch.float32, torch.float16]))
def test_masked_weight_matches_reference(backend, shape, wdtype, sdtype):
    dev = ready(backend, wdtype, sdtype)
    w = randn(shape, wdtype, seed=3, device=dev)
    for kind, ratio in (("quantised", 0.3), ("randn", 0.5)):
        s = make_scores(kind, shape, sdtype, seed=4, device=dev)
        thr = ms.subnet_threshold(s, ratio, backend=backend)
        ref_thr = ms.subnet_threshold(s, ratio, backend="torch")
        assert (thr.value.item(), thr.cut.item()) == (ref_thr.value.item(), ref_thr.cut.item())
        ref = ms.masked_weight(w, s, ref_thr, backend="torch")
        got = ms.masked_weight(w, s, thr, backend=backend)
        assert got.dtype == wdtype
        assert torch.equal(got, ref)
        assert_bitwise_equal(got, ref, kind)
        assert int((got == 0).sum()) >= thr.k


@pytest.mark.parametrize("backend,shape,wdtype,sdtype,kind",
                         kernel_cases(GPU_SHAPES[:2], DTYPES, DTYPES, ["randn", "quantised"],
                                      interpreted=INTERPRETED_SMALL))
def test_masked_weight_kernel_matches_reference(backend, shape, wdtype, sdtype, kind):
    dev = ready(backend, wdtype, sdtype)
    masked_weight = kernel_ops(backend).masked_weight
    weight = randn(shape, wdtype, seed=1, device=dev)
    scores = make_scores(kind, shape, sdtype, seed=2, device=dev)
    for k in ks(scores.numel()):
        value, cut = ms.threshold_torch(scores, k)
        out = masked_weight(weight, scores, value, cut)
        ref = ms.masked_weight_torch(weight, scores, value, cut)
        assert out.dtype == wdtype and out.shape == weight.shape
        assert torch.equal(out, ref), k
        assert_bitwise_equal(out, ref, f"k={k}")
        # the mask implied by the output, checked on weights that are never zero
        ones = torch.ones_like(weight)
        assert torch.equal(masked_weight(ones, scores, value, cut) != 0,
                           ms.keep_mask_torch(scores, value, cut))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 in numpy
def test_triton_masked_weight_nonfinite_weights(tk):
    dev = DEVICES["triton"]
    scores = make_scores("quantised", (7, 13), seed=5, device=dev)
    weight = randn((7, 13), torch.float32, seed=6, device=dev)
    weight.view(-1)[::5] = float("inf")
    weight.view(-1)[1::7] = float("nan")
    value, cut = ms.threshold_torch(scores, 40)
    torch.testing.assert_close(tk.masked_weight(weight, scores, value, cut),
                               ms.masked_weight_torch(weight, scores, value, cut), rtol=0, atol=0,
                               equal_nan=True)


@pytest.mark.cuda
@needs_cuda_backend
@pytest.mark.parametrize("wdtype", DTYPES, ids=case_id)
def test_cuda_masked_weight_misaligned(wdtype):
    s = make_scores("quantised", (7, 13), seed=4, device="cuda")
    w = randn((7, 13), wdtype, seed=6, device="cuda")
    value, cut = ms.threshold_torch(s, 40)
    want = ms.masked_weight_torch(w, s, value, cut)
    masked_weight = kernel_ops("cuda").masked_weight
    for ww, ss in ((misaligned(w), s), (w, misaligned(s)), (misaligned(w), misaligned(s))):
        assert_bitwise_equal(masked_weight(ww, ss, value, cut), want, "misaligned")


# --- straight-through gradient ----------------------------------------------------------------


@pytest.mark.parametrize("backend,shape,gdtype,sdtype",
                         cases(PUBLIC, SHAPES, DTYPES, [torch.float32, torch.float16]))
def test_ste_grad_matches_reference(backend, shape, gdtype, sdtype):
    dev = ready(backend, gdtype, sdtype)
    g = randn(shape, gdtype, seed=4, device=dev)
    w = randn(shape, gdtype, seed=5, device=dev)
    s = make_scores("signed_zeros", shape, sdtype, seed=6, device=dev)
    ref = ms.ste_score_grad(g, w, s, backend="torch")
    got = ms.ste_score_grad(g, w, s, backend=backend)
    assert got.dtype == sdtype
    assert torch.equal(got, ref)


@pytest.mark.parametrize("backend,shape,gdtype,wdtype,sdtype",
                         kernel_cases(GPU_SHAPES[:1], DTYPES, DTYPES, DTYPES))
def test_ste_grad_kernel_matches_reference(backend, shape, gdtype, wdtype, sdtype):
    dev = ready(backend, gdtype, wdtype, sdtype)
    ste_grad = kernel_ops(backend).ste_grad
    grad = randn(shape, gdtype, seed=10, device=dev)
    weight = randn(shape, wdtype, seed=11, device=dev)
    for kind in ("signed_zeros", "quantised"):  # sign(+-0) = 0 must hold
        scores = make_scores(kind, shape, sdtype, seed=12, device=dev)
        out = ste_grad(grad, weight, scores)
        ref = ms.ste_grad_torch(grad, weight, scores)
        assert out.dtype == sdtype and out.shape == scores.shape
        assert torch.equal(out, ref), kind
        assert_bitwise_equal(out, ref, kind)


@pytest.mark.cuda
@needs_cuda_backend
@pytest.mark.parametrize("sdtype", DTYPES, ids=case_id)
def test_cuda_ste_grad_large_and_misaligned(sdtype):
    shape = (2560, 10240)
    g = randn(shape, torch.float32, seed=13, device="cuda")
    w = randn(shape, torch.float16, seed=14, device="cuda")
    s = randn(shape, sdtype, seed=15, device="cuda")
    ste_grad = kernel_ops("cuda").ste_grad
    assert_bitwise_equal(ste_grad(g, w, s), ms.ste_grad_torch(g, w, s), "large")
    small = (slice(0, 7), slice(0, 13))
    gs, ws, ss = (t[small].contiguous() for t in (g, w, s))
    assert_bitwise_equal(ste_grad(misaligned(gs), ws, misaligned(ss)), ms.ste_grad_torch(gs, ws, ss),
                         "misaligned")


@pytest.mark.cuda
@needs_cuda_backend
def test_cuda_ste_grad_tiny_products():
    # float32 denormal products must not be flushed to zero (the extension is built with fast math)
    g = torch.full((64,), 1e-20, device="cuda")
    w = torch.linspace(-1e-19, 1e-19, 64, device="cuda")
    s = torch.randn(64, device="cuda")
    assert_bitwise_equal(kernel_ops("cuda").ste_grad(g, w, s), ms.ste_grad_torch(g, w, s), "denormals")


# --- SGD step ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,shape,maximize", cases(PUBLIC, [(7, 13), (128, 512)], [False, True]))
def test_sgd_step_matches_torch_optim(backend, shape, maximize):
    dev = ready(backend)
    # a long run with every hyper-parameter given, and a short one on SubnetSGD's defaults
    for lr, steps, hp, tol in ((0.1, 10, dict(momentum=0.9, weight_decay=5e-4), dict(rtol=1e-6, atol=1e-6)),
                               (0.05, 3, {}, dict(rtol=1e-6, atol=1e-7))):
        s0 = randn(shape, torch.float32, seed=5, device=dev)
        grads = [randn(shape, torch.float32, seed=50 + i, device=dev) for i in range(steps)]
        p = torch.nn.Parameter(s0.clone())
        ref_opt = torch.optim.SGD([p], lr=lr, momentum=0.9, weight_decay=5e-4, maximize=maximize)
        mine = torch.nn.Parameter(s0.clone())
        opt = ms.SubnetSGD([mine], lr=lr, maximize=maximize, backend=backend, **hp)
        for g in grads:
            p.grad, mine.grad = g.clone(), g.clone()
            ref_opt.step()
            opt.step()
        torch.testing.assert_close(mine.detach(), p.detach(), **tol)


@pytest.mark.parametrize("backend", cases(PUBLIC))
def test_sgd_step_half_scores(backend):
    dev = ready(backend, torch.float16)
    s_ref = randn((64, 33), torch.float16, seed=6, device=dev)
    s_got = s_ref.clone()
    b_ref, b_got = torch.zeros(64, 33, device=dev), torch.zeros(64, 33, device=dev)
    for step in range(3):
        g = randn((64, 33), torch.float16, seed=60 + step, device=dev)
        ms.subnet_sgd_step_(s_ref, g, b_ref, lr=0.1, backend="torch")
        ms.subnet_sgd_step_(s_got, g, b_got, lr=0.1, backend=backend)
    torch.testing.assert_close(b_got, b_ref, rtol=1e-6, atol=1e-6)
    # one fp16 rounding of the same fp32 value: at most one ulp apart
    torch.testing.assert_close(s_got.float(), s_ref.float(), rtol=1e-3, atol=1e-3)


def _run_sgd_kernel(backend, shape, sdtype, gdtype, maximize, steps=3, align=lambda t: t):
    dev = ready(backend, sdtype, gdtype)
    sgd_step = kernel_ops(backend).sgd_step
    scores = align(randn(shape, sdtype, seed=20, device=dev))
    buf = align(torch.zeros(shape, dtype=torch.float32, device=dev))
    ref_scores, ref_buf = scores.clone(), buf.clone()
    for step in range(steps):
        grad = align(randn(shape, gdtype, seed=30 + step, device=dev))
        sgd_step(scores, grad, buf, 0.1, 0.9, 5e-4, maximize)
        ms.sgd_step_torch(ref_scores, grad, ref_buf, 0.1, 0.9, 5e-4, maximize)
    assert scores.dtype == sdtype
    assert_sgd_close(scores, ref_scores, buf, ref_buf)


@pytest.mark.parametrize("backend,shape,sdtype,gdtype,maximize",
                         kernel_cases(GPU_SHAPES[:1], DTYPES, DTYPES, [False, True],
                                      interpreted=INTERPRETED_SMALL))
def test_sgd_step_kernel_matches_reference(backend, shape, sdtype, gdtype, maximize):
    _run_sgd_kernel(backend, shape, sdtype, gdtype, maximize)


@pytest.mark.parametrize("backend", cases(FAST))
def test_sgd_step_kernel_without_momentum_or_decay(backend):
    dev = ready(backend)
    scores = randn((33, 65), torch.float32, seed=8, device=dev)
    grad = randn((33, 65), torch.float32, seed=9, device=dev)
    buf = torch.full((33, 65), 3.0, device=dev)
    ref_scores, ref_buf = scores.clone(), buf.clone()
    kernel_ops(backend).sgd_step(scores, grad, buf, 1.0, 0.0, 0.0, False)
    ms.sgd_step_torch(ref_scores, grad, ref_buf, 1.0, 0.0, 0.0, False)
    torch.testing.assert_close(buf, grad, rtol=0, atol=0)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=0)


@pytest.mark.cuda
@needs_cuda_backend
@pytest.mark.parametrize("sdtype", DTYPES, ids=case_id)
def test_cuda_sgd_step_large(sdtype):
    _run_sgd_kernel("cuda", (2560, 10240), sdtype, torch.float32, False, steps=2)


@pytest.mark.cuda
@needs_cuda_backend
@pytest.mark.parametrize("sdtype", DTYPES, ids=case_id)
def test_cuda_sgd_step_misaligned(sdtype):
    _run_sgd_kernel("cuda", (7, 13), sdtype, torch.bfloat16, True, align=misaligned)


def test_triton_float64_inputs(tk):
    # float64 is accepted by the dispatcher; the reference, like the kernels, works in float32
    dev = DEVICES["triton"]
    scores = (make_scores("quantised", (33, 65), torch.float64, seed=11, device=dev)
              + randn((33, 65), torch.float64, seed=12, device=dev))
    weight = randn((33, 65), torch.float64, seed=13, device=dev)
    grad = randn((33, 65), torch.float64, seed=14, device=dev)
    for k in (1, 700, 2144):
        check_threshold(tk.threshold, scores, k)
    value, cut = ms.threshold_torch(scores, 700)
    assert torch.equal(tk.masked_weight(weight, scores, value, cut),
                       ms.masked_weight_torch(weight, scores, value, cut))
    assert torch.equal(tk.ste_grad(grad, weight, scores), ms.ste_grad_torch(grad, weight, scores))
    buf = torch.zeros_like(scores, dtype=torch.float32)
    ref_scores, ref_buf = scores.clone(), buf.clone()
    tk.sgd_step(scores, grad, buf, 0.1, 0.9, 5e-4, False)
    ms.sgd_step_torch(ref_scores, grad, ref_buf, 0.1, 0.9, 5e-4, False)
    torch.testing.assert_close(scores, ref_scores, rtol=4 * _EPS32, atol=4 * _EPS32)


# --- autograd ---------------------------------------------------------------------------------


def dense_reference(x, w, s, thr, b, layout):
    """Autograd through an explicit mask; the score gradient follows the STE formula."""
    keep = ms.subnet_keep_mask(s, thr).to(w.dtype)
    w_eff = (w * keep).detach().requires_grad_(True)
    y = x @ (w_eff.t() if layout == "linear" else w_eff)
    if b is not None:
        y = y + b
    return y, w_eff


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 96)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_masked_linear_forward_backward(backend, layout, shape, with_bias):
    backend_or_skip(backend)
    gen = torch.Generator().manual_seed(7)
    out_f, in_f = shape
    wshape = (out_f, in_f) if layout == "linear" else (in_f, out_f)
    w = torch.randn(wshape, generator=gen)
    s = torch.randn(wshape, generator=gen, requires_grad=True)
    b = torch.randn(out_f, generator=gen, requires_grad=True) if with_bias else None
    x = torch.randn(3, 5, in_f, generator=gen, requires_grad=True)
    thr = ms.subnet_threshold(s, 0.3, backend=backend)
    y = ms.masked_linear(x, w, s, thr, b, layout=layout, backend=backend)
    dy = torch.randn(y.shape, generator=gen)
    (y * dy).sum().backward()

    x2 = x.detach().clone().requires_grad_(True)
    b2 = b.detach().clone().requires_grad_(True) if with_bias else None
    y2, w_eff = dense_reference(x2, w, s.detach(), thr, b2, layout)
    (y2 * dy).sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.grad, w_eff.grad * w * torch.sign(s.detach()), rtol=1e-5, atol=1e-5)
    if with_bias:
        torch.testing.assert_close(b.grad, b2.grad, rtol=1e-5, atol=1e-5)


def test_masked_linear_gradcheck_input_and_bias():
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(6, 5, dtype=torch.float64, generator=gen)
    s = torch.randn(6, 5, dtype=torch.float64, generator=gen)
    thr = ms.subnet_threshold(s, 0.4, backend="torch")
    x = torch.randn(4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    f = lambda x, b: ms.masked_linear(x, w, s, thr, b, backend="torch")
    assert torch.autograd.gradcheck(f, (x, b))


@pytest.mark.parametrize("backend", ["cpp"])
def test_masked_linear_half_error_within_twice_torch(backend):
    """flash-attention's rule: low-precision error at most ~2x that of torch in the same precision."""
    backend_or_skip(backend)
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(96, 80, generator=gen)
    s = torch.randn(96, 80, generator=gen)
    x = torch.randn(16, 80, generator=gen)
    thr = ms.subnet_threshold(s, 0.2, backend="torch")
    exact = ms.masked_linear(x.double(), w.double(), s, thr, backend="torch")
    ref16 = ms.masked_linear(x.half(), w.half(), s, thr, backend="torch").double()
    got16 = ms.masked_linear(x.half(), w.half(), s, thr, backend=backend).double()
    assert (got16 - exact).abs().max() <= 2 * (ref16 - exact).abs().max() + 1e-3


# --- module -----------------------------------------------------------------------------------


def test_module_wraps_linear_and_conv1d_and_folds():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(10)
    lin, conv = torch.nn.Linear(12, 20), Conv1D(20, 12)  # Conv1D(nf=out, nx=in): weight [12, 20]
    conv.weight.data = lin.weight.data.t().contiguous()
    conv.bias.data = lin.bias.data.clone()
    gen = torch.Generator().manual_seed(0)
    m_lin = ms.MaskedSubnet(lin, 0.25, generator=gen)
    m_conv = ms.MaskedSubnet(conv, 0.25, score_init="magnitude")
    assert m_lin.layout == "linear" and m_conv.layout == "conv1d"
    assert not lin.weight.requires_grad and m_lin.scores.requires_grad
    # kaiming-uniform(a=sqrt 5) bound over the true fan-in (12 for both layouts)
    assert m_lin.scores.abs().max() <= 1 / math.sqrt(12)
    x = torch.randn(2, 3, 12)
    # transposed scores give the same mask (continuous scores have no ties, so flat order is moot)
    m_conv.scores.data = m_lin.scores.data.t().contiguous()
    torch.testing.assert_close(m_conv(x), m_lin(x), rtol=1e-6, atol=1e-6)
    keep = ms.subnet_keep_mask(m_lin.scores, m_lin.threshold())
    assert torch.allclose(m_lin(x), x @ (lin.weight * keep).t() + lin.bias, atol=1e-6)
    thr = m_lin.threshold()
    assert int((~ms.subnet_keep_mask(m_lin.scores, thr)).sum()) == ms.num_dropped(240, 0.25)
    expected = lin.weight.detach() * ms.subnet_keep_mask(m_lin.scores, thr)
    folded = m_lin.fold()
    assert folded is lin and torch.equal(lin.weight.detach(), expected)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_threshold_cache_follows_optimizer_steps(backend):
    backend_or_skip(backend)
    torch.manual_seed(11)
    m = ms.MaskedSubnet(torch.nn.Linear(16, 8), 0.5, backend=backend)
    opt = ms.SubnetSGD(m.parameters(), lr=10.0, backend=backend)
    t0 = m.threshold()
    assert m.threshold() is t0  # unchanged scores: reused
    m(torch.randn(4, 16)).square().sum().backward()
    opt.step()
    t1 = m.threshold()
    assert t1 is not t0
    fresh = ms.subnet_threshold(m.scores, 0.5, backend="torch")
    assert t1.value.item() == fresh.value.item() and t1.cut.item() == fresh.cut.item()


@pytest.mark.parametrize("backend,dtype",
                         cases(FAST, [torch.float32, gpu_only(torch.bfloat16)]))
def test_training_steps_match_torch_backend(backend, dtype):
    """MaskedSubnet + SubnetSGD autograd over several steps (the mask moving as the scores do) equals the
    torch backend on the same device: the whole Subnet/BalancedSubnet inner loop on each backend."""
    dev = ready(backend, dtype)

    def run(b):
        torch.manual_seed(12)
        lin = torch.nn.Linear(48, 40).to(dev, dtype)
        m = ms.MaskedSubnet(lin, 0.3, generator=torch.Generator().manual_seed(0), backend=b)
        opt = ms.SubnetSGD([m.scores], lr=0.1, backend=b)
        gen = torch.Generator().manual_seed(1)
        for _ in range(10):
            x = torch.randn(6, 48, generator=gen).to(dev, dtype)
            opt.zero_grad()
            (-m(x).float().square().mean()).backward()
            opt.step()
        return m.scores.detach().cpu()

    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(run(backend), run("torch"), **tol)


# --- errors, host synchronisation and backend selection -----------------------------------------


@pytest.mark.parametrize("ratio,match", [(0.0, "open interval"), (1.0, "open interval"),
                                         (5, "percentage"), (-0.1, "open interval"),
                                         (float("nan"), "open interval")])
def test_bad_ratio(ratio, match):
    with pytest.raises(ValueError, match=match):
        ms.subnet_threshold(torch.randn(4, 4), ratio)


def test_bad_inputs():
    with pytest.raises(TypeError, match="floating-point"):
        ms.subnet_threshold(torch.arange(12).view(3, 4), 0.5)
    with pytest.raises(ValueError, match="shape"):
        ms.masked_weight(torch.randn(3, 4), torch.randn(4, 3), ms.subnet_threshold(torch.randn(4, 3), 0.5))
    with pytest.raises(ValueError, match="NaN"):
        ms.subnet_threshold(torch.tensor([1.0, float("nan"), 2.0]), 0.5, backend="torch")
    with pytest.raises(ValueError, match="features"):
        w = torch.randn(4, 3)
        ms.masked_linear(torch.randn(2, 4), w, w, ms.subnet_threshold(w, 0.5))
    with pytest.raises(TypeError, match="Linear or transformers Conv1D"):
        ms.MaskedSubnet(torch.nn.Conv2d(1, 1, 1), 0.5)
    with pytest.raises(ValueError, match="unknown backend"):
        ms.subnet_threshold(torch.randn(4), 0.5, backend="fortran")
    with pytest.raises(registry.BackendUnavailable, match="cuda"):
        ms.subnet_threshold(torch.randn(4), 0.5, backend="cuda")


@pytest.mark.parametrize("backend", ["cpp"])
@pytest.mark.parametrize("n", [1000, 300_000])  # small-matrix path and radix path
def test_nan_scores_rejected_by_fast_backend(backend, n):
    backend_or_skip(backend)
    s = torch.randn(n)
    s[777] = float("nan")
    with pytest.raises(Exception, match="NaN"):
        ms.subnet_threshold(s, 0.5, backend=backend)


@pytest.mark.cuda
@needs_cuda_backend
def test_cuda_ops_do_not_synchronise():
    ops = kernel_ops("cuda")
    s = randn((128, 512), torch.bfloat16, seed=60, device="cuda")
    w = randn((128, 512), torch.float32, seed=61, device="cuda")
    b = torch.zeros((128, 512), device="cuda")
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        value, cut = ops.threshold(s, 1000)
        mw = ops.masked_weight(w, s, value, cut)
        gs = ops.ste_grad(w, w, s)
        ops.sgd_step(s, gs, b, 0.1, 0.9, 5e-4, False)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    assert mw.shape == w.shape


@pytest.mark.cuda
@needs_cuda_backend
def test_cuda_validation_errors():
    ops = kernel_ops("cuda")
    s = randn((7, 13), torch.float32, seed=0, device="cuda")
    w = randn((7, 13), torch.float32, seed=1, device="cuda")
    b = torch.zeros((7, 13), device="cuda")
    value, cut = ops.threshold(s, 10)
    with pytest.raises(RuntimeError, match="0 <= k < numel"):
        ops.threshold(s, s.numel())
    with pytest.raises(RuntimeError, match="0 <= k < numel"):
        ops.threshold(s, -1)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.threshold(s.t(), 1)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.threshold(s.double(), 1)
    with pytest.raises(RuntimeError, match="shape"):
        ops.masked_weight(w, s[:, :12], value, cut)
    with pytest.raises(RuntimeError, match="value"):
        ops.masked_weight(w, s, value.double(), cut)
    with pytest.raises(RuntimeError, match="device"):
        ops.masked_weight(w, s, value.cpu(), cut)
    with pytest.raises(RuntimeError, match="shape"):
        ops.ste_grad(w, w.t().contiguous(), s)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.ste_grad(w, w, s.t().contiguous().t())
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.ste_grad(w.double(), w, s)
    with pytest.raises(RuntimeError, match="momentum_buffer must be float32"):
        ops.sgd_step(s, w, b.half(), 0.1, 0.9, 0.0, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        sq = randn((13, 13), torch.float32, seed=0, device="cuda")
        ops.sgd_step(sq.t(), sq, torch.zeros((13, 13), device="cuda"), 0.1, 0.9, 0.0, False)


def test_env_backend_and_fallback_warning():
    """Without the extension the automatic choice falls back to torch and warns exactly once."""
    code = (
        "import warnings, torch\n"
        "from tinymem_fast.ops import masked_subnet as ms\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3): ms.subnet_threshold(torch.randn(10, 10), 0.5)\n"
        "msgs = [str(x.message) for x in w if 'falling back' in str(x.message)]\n"
        "print(len(msgs))\n"
    )
    env = dict(os.environ, TINYMEM_DISABLE_EXT="1")
    env.pop("TINYMEM_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    env["TINYMEM_BACKEND"] = "cpp"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "BackendUnavailable" in bad.stderr


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("backend", cases(["torch", "cpp"]))
def test_masked_linear_under_bf16_autocast(backend, layout):
    """Under CPU bf16 autocast a MaskedSubnet computes what a stock layer holding W*M computes there: the
    same bf16 GEMM forward, the same input gradient, and the score gradient is that layer's (float32)
    weight gradient times W * sign(S)."""
    from transformers.pytorch_utils import Conv1D

    backend_or_skip(backend)
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40) if layout == "linear" else Conv1D(40, 24)
    masked = ms.MaskedSubnet(base, 0.3, backend=backend)
    w_eff = ms.masked_weight(base.weight, masked.scores, masked.threshold(), backend="torch")
    ref = torch.nn.Linear(24, 40) if layout == "linear" else Conv1D(40, 24)
    with torch.no_grad():
        ref.weight.copy_(w_eff)
        ref.bias.copy_(base.bias)
    x = torch.randn(3, 7, 24)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = masked(xa), ref(xb)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, atol=0, rtol=0)
    assert masked.scores.grad.dtype == torch.float32
    want = ref.weight.grad * base.weight * torch.sign(masked.scores)
    torch.testing.assert_close(masked.scores.grad, want, atol=1e-6, rtol=1e-5)
