"""The hand-written CUDA kernels of the masked-subnet ops (csrc/cuda/masked_subnet*) against the torch
reference functions of tinymem_fast.ops.masked_subnet, on CUDA tensors.

Skipped unless a CUDA device is present and the compiled extension was built with CUDA.
"""

from __future__ import annotations

import pytest
import torch

from tinymem_fast.ops import masked_subnet as ms
from tinymem_fast.ops import registry


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

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = ((1, 1), (7, 13), (128, 512), (2560, 10240))
KINDS = ("randn", "quantised", "all_equal", "zeros", "tiny")
DEV = "cuda"


def _ops():
    registry.ext()  # importing tinymem_fast._C registers the ops
    return torch.ops.tinymem


def _scores(shape, dtype, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(seed)
    if kind == "randn":
        s = torch.randn(shape, device=DEV, generator=g)
    elif kind == "quantised":  # 9 levels: heavy ties, +-0 and both signs of every magnitude
        s = torch.randint(-4, 5, shape, device=DEV, generator=g).float() / 8
    elif kind == "all_equal":
        s = torch.full(shape, -0.3, device=DEV)
    elif kind == "zeros":  # +0 and -0 mixed: all ties
        s = torch.zeros(shape, device=DEV)
        s.view(-1)[::3] = -0.0
    elif kind == "tiny":  # float32 denormals (zeros in float16, denormals in bfloat16)
        s = torch.randn(shape, device=DEV, generator=g) * 1e-39
    else:
        raise ValueError(kind)
    return s.to(dtype)


def _ks(n: int) -> list[int]:
    return sorted({k for k in (0, 1, n // 3, n // 2, n - 1) if 0 <= k < n})


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.element_size() == 4 else t.view(torch.int16)


def _assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Same bits (so the same rounding), except that +0 and -0 count as equal."""
    assert got.dtype == want.dtype and got.shape == want.shape and got.device == want.device, what
    diff = (_bits(got) != _bits(want)) & ~((got == 0) & (want == 0))
    if diff.any():
        i = int(diff.reshape(-1).nonzero()[0])
        raise AssertionError(f"{what}: {int(diff.sum())} entries differ, first at flat index {i}: "
                             f"got {got.reshape(-1)[i].item()!r}, want {want.reshape(-1)[i].item()!r}")


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """Same values, contiguous, but starting one element past a 16-byte boundary (scalar kernel path)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


# --- subnet_threshold -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_threshold_matches_reference(shape, dtype, kind):
    s = _scores(shape, dtype, kind)
    n = s.numel()
    for k in _ks(n):
        value, cut = _ops().subnet_threshold(s, k)
        assert value.dtype == torch.float32 and value.shape == () and value.device == s.device
        assert cut.dtype == torch.int64 and cut.shape == () and cut.device == s.device
        want_v, want_c = ms.threshold_torch(s, k)
        assert value.item() == want_v.item(), (k, value.item(), want_v.item())
        assert torch.equal(value.view(torch.int32), want_v.view(torch.int32)), k  # same bits (+0, not -0)
        assert cut.item() == want_c.item(), (k, cut.item(), want_c.item())
        dropped = n - int(ms.keep_mask_torch(s, value, cut).sum())
        assert dropped == k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_threshold_k_zero_keeps_everything(dtype):
    s = _scores((7, 13), dtype, "randn")
    value, cut = _ops().subnet_threshold(s, 0)
    assert value.item() == 0.0 and cut.item() == 0
    assert bool(ms.keep_mask_torch(s, value, cut).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_threshold_misaligned(dtype):
    s = _misaligned(_scores((128, 96), dtype, "quantised", seed=3))
    for k in _ks(s.numel()):
        value, cut = _ops().subnet_threshold(s, k)
        want_v, want_c = ms.threshold_torch(s, k)
        assert (value.item(), cut.item()) == (want_v.item(), want_c.item()), k


def test_threshold_chunk_boundaries():
    # ties spread over many 8192-entry chunks; the need-th tie lands in various chunks
    n = 8192 * 37 + 5
    s = _scores((n,), torch.float32, "quantised", seed=7)
    for k in (1, 8191, 8192, 8193, n // 2, n // 2 + 1, n - 2, n - 1):
        value, cut = _ops().subnet_threshold(s, k)
        want_v, want_c = ms.threshold_torch(s, k)
        assert (value.item(), cut.item()) == (want_v.item(), want_c.item()), k


def test_threshold_public_api_cuda_backend():
    s = _scores((128, 512), torch.float32, "randn", seed=1)
    got = ms.subnet_threshold(s, 0.3, backend="cuda")
    want = ms.subnet_threshold(s, 0.3, backend="torch")
    assert got.k == want.k
    assert (got.value.item(), got.cut.item()) == (want.value.item(), want.cut.item())


@pytest.mark.slow
@pytest.mark.parametrize("dtype,kind", [(torch.float32, "randn"), (torch.bfloat16, "quantised")])
def test_threshold_170m(dtype, kind):
    s = _scores((170_000_000,), dtype, kind, seed=11)
    for k in (1, s.numel() // 2, s.numel() - 1):
        value, cut = _ops().subnet_threshold(s, k)
        want_v, want_c = ms.threshold_torch(s, k)
        assert (value.item(), cut.item()) == (want_v.item(), want_c.item()), k


# --- subnet_masked_weight ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("wdtype", DTYPES, ids=lambda d: f"w_{d}")
@pytest.mark.parametrize("sdtype", DTYPES, ids=lambda d: f"s_{d}")
@pytest.mark.parametrize("kind", ("randn", "quantised"))
def test_masked_weight_matches_reference(shape, wdtype, sdtype, kind):
    s = _scores(shape, sdtype, kind, seed=2)
    w = _scores(shape, wdtype, "randn", seed=5)
    for k in _ks(s.numel()):
        value, cut = _ops().subnet_threshold(s, k)
        got = _ops().subnet_masked_weight(w, s, value, cut)
        _assert_bitwise_equal(got, ms.masked_weight_torch(w, s, value, cut), f"k={k}")


@pytest.mark.parametrize("wdtype", DTYPES, ids=str)
def test_masked_weight_misaligned(wdtype):
    s = _scores((7, 13), torch.float32, "quantised", seed=4)
    w = _scores((7, 13), wdtype, "randn", seed=6)
    value, cut = ms.threshold_torch(s, 40)
    want = ms.masked_weight_torch(w, s, value, cut)
    for ww, ss in ((_misaligned(w), s), (w, _misaligned(s)), (_misaligned(w), _misaligned(s))):
        _assert_bitwise_equal(_ops().subnet_masked_weight(ww, ss, value, cut), want, "misaligned")


def test_masked_weight_public_api_cuda_backend():
    s = _scores((128, 512), torch.float32, "randn", seed=8)
    w = _scores((128, 512), torch.bfloat16, "randn", seed=9)
    thr = ms.subnet_threshold(s, 0.5, backend="cuda")
    got = ms.masked_weight(w, s, thr, backend="cuda")
    _assert_bitwise_equal(got, ms.masked_weight(w, s, thr, backend="torch"), "public api")


# --- subnet_ste_grad --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ((1, 1), (7, 13), (128, 512)), ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("gdtype", DTYPES, ids=lambda d: f"g_{d}")
@pytest.mark.parametrize("wdtype", DTYPES, ids=lambda d: f"w_{d}")
@pytest.mark.parametrize("sdtype", DTYPES, ids=lambda d: f"s_{d}")
def test_ste_grad_matches_reference(shape, gdtype, wdtype, sdtype):
    g = _scores(shape, gdtype, "randn", seed=10)
    w = _scores(shape, wdtype, "randn", seed=11)
    s = _scores(shape, sdtype, "quantised", seed=12)  # includes +-0 scores: sign 0
    got = _ops().subnet_ste_grad(g, w, s)
    _assert_bitwise_equal(got, ms.ste_grad_torch(g, w, s), "ste grad")


@pytest.mark.parametrize("sdtype", DTYPES, ids=str)
def test_ste_grad_large_and_misaligned(sdtype):
    shape = (2560, 10240)
    g = _scores(shape, torch.float32, "randn", seed=13)
    w = _scores(shape, torch.float16, "randn", seed=14)
    s = _scores(shape, sdtype, "randn", seed=15)
    want = ms.ste_grad_torch(g, w, s)
    _assert_bitwise_equal(_ops().subnet_ste_grad(g, w, s), want, "large")
    small = (slice(0, 7), slice(0, 13))
    gs, ws, ss = (t[small].contiguous() for t in (g, w, s))
    _assert_bitwise_equal(_ops().subnet_ste_grad(_misaligned(gs), ws, _misaligned(ss)),
                          ms.ste_grad_torch(gs, ws, ss), "misaligned")


def test_ste_grad_tiny_products():
    # float32 denormal products must not be flushed to zero (the extension is built with fast math)
    g = torch.full((64,), 1e-20, device=DEV)
    w = torch.linspace(-1e-19, 1e-19, 64, device=DEV)
    s = torch.randn(64, device=DEV)
    _assert_bitwise_equal(_ops().subnet_ste_grad(g, w, s), ms.ste_grad_torch(g, w, s), "denormals")


# --- subnet_sgd_step_ -------------------------------------------------------------------------


def _sgd_tol(dtype):
    return {torch.float32: dict(rtol=1e-6, atol=1e-7),
            torch.float16: dict(rtol=2.0 ** -10, atol=1e-6),
            torch.bfloat16: dict(rtol=2.0 ** -7, atol=1e-6)}[dtype]


def _run_sgd(shape, sdtype, gdtype, maximize, misaligned=False, steps=3):
    s0 = _scores(shape, sdtype, "randn", seed=20)
    s_ref, s_cuda = s0.clone(), s0.clone()
    b_ref = torch.zeros(shape, device=DEV)
    b_cuda = torch.zeros(shape, device=DEV)
    if misaligned:
        s_cuda, b_cuda = _misaligned(s_cuda), _misaligned(b_cuda)
    hp = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    for step in range(steps):
        g = _scores(shape, gdtype, "randn", seed=30 + step)
        if misaligned:
            g = _misaligned(g)
        ms.sgd_step_torch(s_ref, g, b_ref, hp["lr"], hp["momentum"], hp["weight_decay"], maximize)
        _ops().subnet_sgd_step_(s_cuda, g, b_cuda, hp["lr"], hp["momentum"], hp["weight_decay"], maximize)
    return s_cuda, s_ref, b_cuda, b_ref


@pytest.mark.parametrize("shape", ((1, 1), (7, 13), (128, 512)), ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("sdtype", DTYPES, ids=lambda d: f"s_{d}")
@pytest.mark.parametrize("gdtype", DTYPES, ids=lambda d: f"g_{d}")
@pytest.mark.parametrize("maximize", (False, True))
def test_sgd_step_matches_reference(shape, sdtype, gdtype, maximize):
    s_cuda, s_ref, b_cuda, b_ref = _run_sgd(shape, sdtype, gdtype, maximize)
    assert s_cuda.dtype == sdtype
    torch.testing.assert_close(b_cuda, b_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s_cuda.float(), s_ref.float(), **_sgd_tol(sdtype))


@pytest.mark.parametrize("sdtype", DTYPES, ids=str)
def test_sgd_step_large(sdtype):
    s_cuda, s_ref, b_cuda, b_ref = _run_sgd((2560, 10240), sdtype, torch.float32, False, steps=2)
    torch.testing.assert_close(b_cuda, b_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s_cuda.float(), s_ref.float(), **_sgd_tol(sdtype))


@pytest.mark.parametrize("sdtype", DTYPES, ids=str)
def test_sgd_step_misaligned(sdtype):
    s_cuda, s_ref, b_cuda, b_ref = _run_sgd((7, 13), sdtype, torch.bfloat16, True, misaligned=True)
    torch.testing.assert_close(b_cuda, b_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s_cuda.float(), s_ref.float(), **_sgd_tol(sdtype))


def test_sgd_optimizer_cuda_backend():
    s = _scores((128, 512), torch.float32, "randn", seed=40)
    p_cuda = torch.nn.Parameter(s.clone())
    p_ref = torch.nn.Parameter(s.clone())
    opt_cuda = ms.SubnetSGD([p_cuda], lr=0.05, backend="cuda")
    opt_ref = torch.optim.SGD([p_ref], lr=0.05, momentum=0.9, weight_decay=5e-4)
    for step in range(3):
        g = _scores((128, 512), torch.float32, "randn", seed=50 + step)
        p_cuda.grad, p_ref.grad = g.clone(), g.clone()
        opt_cuda.step()
        opt_ref.step()
    torch.testing.assert_close(p_cuda.detach(), p_ref.detach(), rtol=1e-6, atol=1e-7)


# --- no host synchronisation, validation ------------------------------------------------------


def test_ops_do_not_synchronise():
    s = _scores((128, 512), torch.bfloat16, "randn", seed=60)
    w = _scores((128, 512), torch.float32, "randn", seed=61)
    b = torch.zeros((128, 512), device=DEV)
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        value, cut = _ops().subnet_threshold(s, 1000)
        mw = _ops().subnet_masked_weight(w, s, value, cut)
        gs = _ops().subnet_ste_grad(w, w, s)
        _ops().subnet_sgd_step_(s, gs, b, 0.1, 0.9, 5e-4, False)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    assert mw.shape == w.shape


def test_validation_errors():
    s = _scores((7, 13), torch.float32, "randn")
    w = _scores((7, 13), torch.float32, "randn", seed=1)
    b = torch.zeros((7, 13), device=DEV)
    value, cut = _ops().subnet_threshold(s, 10)
    with pytest.raises(RuntimeError, match="0 <= k < numel"):
        _ops().subnet_threshold(s, s.numel())
    with pytest.raises(RuntimeError, match="0 <= k < numel"):
        _ops().subnet_threshold(s, -1)
    with pytest.raises(RuntimeError, match="contiguous"):
        _ops().subnet_threshold(s.t(), 1)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        _ops().subnet_threshold(s.double(), 1)
    with pytest.raises(RuntimeError, match="shape"):
        _ops().subnet_masked_weight(w, s[:, :12], value, cut)
    with pytest.raises(RuntimeError, match="value"):
        _ops().subnet_masked_weight(w, s, value.double(), cut)
    with pytest.raises(RuntimeError, match="device"):
        _ops().subnet_masked_weight(w, s, value.cpu(), cut)
    with pytest.raises(RuntimeError, match="shape"):
        _ops().subnet_ste_grad(w, w.t().contiguous(), s)
    with pytest.raises(RuntimeError, match="contiguous"):
        _ops().subnet_ste_grad(w, w, s.t().contiguous().t())
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        _ops().subnet_ste_grad(w.double(), w, s)
    with pytest.raises(RuntimeError, match="momentum_buffer must be float32"):
        _ops().subnet_sgd_step_(s, w, b.half(), 0.1, 0.9, 0.0, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        sq = _scores((13, 13), torch.float32, "randn")
        _ops().subnet_sgd_step_(sq.t(), sq, torch.zeros((13, 13), device=DEV), 0.1, 0.9, 0.0, False)
