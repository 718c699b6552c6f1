"""Masked-subnet ops: every CPU backend against the plain-PyTorch reference, plus the autograd path,
the module, the optimizer and input validation. (Triton: test_masked_subnet_triton.py; CUDA:
test_masked_subnet_cuda.py.)"""

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import backend_or_skip

from tinymem_fast.ops import masked_subnet as ms
from tinymem_fast.ops import registry

CPU_FAST = ["cpp"]
SHAPES = [(1, 1), (7, 13), (33, 65), (128, 512)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def oracle_dropped(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Independent of the library: a stable full sort of |s| (ties by flat index), first k dropped."""
    key = scores.reshape(-1).float().abs()
    order = torch.sort(key, stable=True).indices
    dropped = torch.zeros_like(key, dtype=torch.bool)
    dropped[order[:k]] = True
    return dropped.view(scores.shape)


def tied_scores(kind: str, shape, gen) -> torch.Tensor:
    if kind == "randn":
        return torch.randn(shape, generator=gen)
    if kind == "quantised":  # few distinct magnitudes, both signs: heavy ties
        return (torch.randint(-3, 4, shape, generator=gen).float() * 0.5)
    if kind == "all_equal":
        return torch.full(shape, -0.25)
    if kind == "signed_zeros":
        s = torch.randn(shape, generator=gen)
        s[..., ::2] = 0.0
        s[..., 1::3] = -0.0
        return s
    raise ValueError(kind)


def ratios_for(n: int):
    # masks 0 entries, exactly 1 entry, a middle value, and the large end
    return sorted({0.5 / n if n > 1 else 1e-9, min(0.999, 1.0 / n + 1e-12), 0.05, 0.3, 0.8})


# --- threshold --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["randn", "quantised", "all_equal", "signed_zeros"])
def test_reference_matches_sort_oracle(shape, kind):
    gen = torch.Generator().manual_seed(1)
    s = tied_scores(kind, shape, gen)
    for r in ratios_for(s.numel()):
        thr = ms.subnet_threshold(s, r, backend="torch")
        dropped = ~ms.subnet_keep_mask(s, thr)
        assert int(dropped.sum()) == thr.k == ms.num_dropped(s.numel(), r)
        assert torch.equal(dropped, oracle_dropped(s, thr.k)), (shape, kind, r)


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("shape", SHAPES + [(2560, 1030)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["randn", "quantised", "all_equal", "signed_zeros"])
def test_threshold_matches_reference(backend, shape, dtype, kind):
    backend_or_skip(backend)
    gen = torch.Generator().manual_seed(2)
    s = tied_scores(kind, shape, gen).to(dtype)
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


# --- elementwise kernels ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("wdtype", DTYPES)
@pytest.mark.parametrize("sdtype", [torch.float32, torch.float16])
def test_masked_weight_matches_reference(backend, shape, wdtype, sdtype):
    backend_or_skip(backend)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(shape, generator=gen).to(wdtype)
    s = tied_scores("quantised", shape, gen).to(sdtype)
    thr = ms.subnet_threshold(s, 0.3, backend="torch")
    ref = ms.masked_weight(w, s, thr, backend="torch")
    got = ms.masked_weight(w, s, thr, backend=backend)
    assert got.dtype == wdtype
    assert torch.equal(got, ref)
    assert int((got == 0).sum()) >= thr.k


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gdtype", DTYPES)
@pytest.mark.parametrize("sdtype", [torch.float32, torch.float16])
def test_ste_grad_matches_reference(backend, shape, gdtype, sdtype):
    backend_or_skip(backend)
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(shape, generator=gen).to(gdtype)
    w = torch.randn(shape, generator=gen).to(gdtype)
    s = tied_scores("signed_zeros", shape, gen).to(sdtype)
    ref = ms.ste_score_grad(g, w, s, backend="torch")
    got = ms.ste_score_grad(g, w, s, backend=backend)
    assert got.dtype == sdtype
    assert torch.equal(got, ref)


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("shape", [(7, 13), (128, 512)])
@pytest.mark.parametrize("maximize", [False, True])
def test_sgd_step_matches_torch_optim(backend, shape, maximize):
    backend_or_skip(backend)
    gen = torch.Generator().manual_seed(5)
    s0 = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(10)]
    p = torch.nn.Parameter(s0.clone())
    ref_opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4, maximize=maximize)
    mine = torch.nn.Parameter(s0.clone())
    opt = ms.SubnetSGD([mine], lr=0.1, momentum=0.9, weight_decay=5e-4, maximize=maximize, backend=backend)
    for g in grads:
        p.grad, mine.grad = g.clone(), g.clone()
        ref_opt.step()
        opt.step()
    torch.testing.assert_close(mine.detach(), p.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_FAST)
def test_sgd_step_half_scores(backend):
    backend_or_skip(backend)
    gen = torch.Generator().manual_seed(6)
    s_ref = torch.randn(64, 33, generator=gen).half()
    s_got = s_ref.clone()
    b_ref, b_got = torch.zeros(64, 33), torch.zeros(64, 33)
    for _ in range(3):
        g = torch.randn(64, 33, generator=gen).half()
        ms.subnet_sgd_step_(s_ref, g, b_ref, lr=0.1, backend="torch")
        ms.subnet_sgd_step_(s_got, g, b_got, lr=0.1, backend=backend)
    torch.testing.assert_close(b_got, b_ref, rtol=1e-6, atol=1e-6)
    # one fp16 rounding of the same fp32 value: at most one ulp apart
    torch.testing.assert_close(s_got.float(), s_ref.float(), rtol=1e-3, atol=1e-3)


# --- autograd ---------------------------------------------------------------------------------


def dense_reference(x, w, s, thr, b, layout):
    """Autograd through an explicit mask; the score gradient follows the STE formula."""
    keep = ms.subnet_keep_mask(s, thr).to(w.dtype)
    w_eff = (w * keep).detach().requires_grad_(True)
    y = x @ (w_eff.t() if layout == "linear" else w_eff)
    if b is not None:
        y = y + b
    return y, w_eff


@pytest.mark.parametrize("backend", ["torch"] + CPU_FAST)
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


@pytest.mark.parametrize("backend", CPU_FAST)
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


@pytest.mark.parametrize("backend", ["torch"] + CPU_FAST)
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


@pytest.mark.parametrize("backend", CPU_FAST)
def test_training_steps_match_torch_backend(backend):
    backend_or_skip(backend)

    def run(b):
        torch.manual_seed(12)
        lin = torch.nn.Linear(48, 40)
        m = ms.MaskedSubnet(lin, 0.3, generator=torch.Generator().manual_seed(0), backend=b)
        opt = ms.SubnetSGD([m.scores], lr=0.1, backend=b)
        gen = torch.Generator().manual_seed(1)
        for _ in range(10):
            x = torch.randn(6, 48, generator=gen)
            opt.zero_grad()
            (-m(x).square().mean()).backward()
            opt.step()
        return m.scores.detach()

    torch.testing.assert_close(run(backend), run("torch"), rtol=1e-5, atol=1e-6)


# --- errors and backend selection -------------------------------------------------------------


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


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("n", [1000, 300_000])  # small-matrix path and radix path
def test_nan_scores_rejected_by_fast_backend(backend, n):
    backend_or_skip(backend)
    s = torch.randn(n)
    s[777] = float("nan")
    with pytest.raises(Exception, match="NaN"):
        ms.subnet_threshold(s, 0.5, backend=backend)


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
