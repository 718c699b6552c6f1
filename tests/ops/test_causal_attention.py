"""The fused causal attention kernel (csrc/cpu/causal_attention.cpp, tinymem_fast/ops/attention.py).

Ground truth is F.scaled_dot_product_attention in float64 on the same (already rounded) inputs. The
kernel passes when its error is at most twice PyTorch's own SDPA error in the same input precision, plus
a tiny absolute epsilon (flash-attention's rule) -- for the output and for dq, dk, dv, over odd shapes,
Hugging Face's transposed views, float32 and bfloat16 inputs and every ISA this CPU runs."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_or_skip, isa_or_skip

from tinymem_fast.ops import registry
from tinymem_fast.ops.attention import MAX_HEAD_DIM, causal_attention, causal_attention_available

SEQ_LENS = (1, 2, 17, 71, 130)
HEAD_DIMS = (8, 32, 64, 80)
DTYPES = (torch.float32, torch.bfloat16)


@pytest.fixture(autouse=True)
def _kernel(monkeypatch):
    backend_or_skip("cpp")
    if not causal_attention_available():
        pytest.skip("the compiled extension has no causal attention ops (stale build)")
    monkeypatch.delenv("TINYMEM_BACKEND", raising=False)


def _inputs(b, h, s, d, dtype, layout, seed):
    """q, k, v, dout of shape [b, h, s, d] in `dtype`; layout "hf" slices one fused [b, s, 3*h*d]
    projection and transposes the heads out (GPT-2's c_attn), "strided" has a non-unit last stride."""
    g = torch.Generator().manual_seed(seed)
    if layout == "hf":
        qkv = torch.randn(b, s, 3 * h * d, generator=g).to(dtype)
        q, k, v = (t.view(b, s, h, d).transpose(1, 2) for t in qkv.split(h * d, dim=2))
    elif layout == "strided":
        q, k, v = (torch.randn(b, h, s, 2 * d, generator=g).to(dtype)[..., ::2] for _ in range(3))
    else:
        q, k, v = (torch.randn(b, h, s, d, generator=g).to(dtype) for _ in range(3))
    dout = torch.randn(b, h, s, d, generator=g).to(dtype)
    return q, k, v, dout


def _sdpa(q, k, v, dout, dtype, scale=None):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    out.backward(dout.to(dtype))
    return out.detach(), q.grad, k.grad, v.grad


def _kernel_run(q, k, v, dout, scale):
    out, lse = torch.ops.tinymem.causal_attention_fwd(q, k, v, scale)
    dq, dk, dv = torch.ops.tinymem.causal_attention_bwd(dout, q, k, v, out, lse, scale)
    return out, lse, dq, dk, dv


def _err(x, ref):
    return (x.double() - ref).abs().max().item()


def _assert_within_sdpa_error(ours, theirs, ref, names):
    """err(ours) <= 2 err(PyTorch) + eps. eps is tiny for float32; for bfloat16 results it also allows one
    rounding of the largest value: PyTorch's CPU attention accumulates in float32 too, so both errors are
    mostly that final rounding, and which of them happens to land its worst case on the largest values
    is luck."""
    for name, o, t, r in zip(names, ours, theirs, ref, strict=True):
        assert o.shape == r.shape, (name, o.shape)
        top = r.abs().max().item()
        eps = 2e-6 * max(1.0, top) + 0.5 * torch.finfo(o.dtype).eps * top
        e_ours, e_pt = _err(o, r), _err(t, r)
        assert e_ours <= 2 * e_pt + eps, f"{name}: error {e_ours:.3g} vs PyTorch's {e_pt:.3g} (eps {eps:.1g})"


def _check_against_reference(b, h, s, d, dtype, layout, seed=0):
    q, k, v, dout = _inputs(b, h, s, d, dtype, layout, seed)
    scale = 1.0 / math.sqrt(d)
    out, lse, dq, dk, dv = _kernel_run(q, k, v, dout, scale)
    for t in (out, dq, dk, dv):
        assert t.dtype == dtype and t.shape == (b, h, s, d)
    ref = _sdpa(q, k, v, dout, torch.float64)
    theirs = _sdpa(q, k, v, dout, dtype)
    _assert_within_sdpa_error((out, dq, dk, dv), theirs, ref, ("out", "dq", "dk", "dv"))
    # lse: natural-log logsumexp of each causal row of the scaled float64 scores
    q64, k64 = q.double(), k.double()
    scores = (q64 @ k64.transpose(-1, -2)) * scale
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    lse_ref = scores.masked_fill(~mask, -math.inf).logsumexp(-1)
    assert lse.dtype == torch.float32 and lse.shape == (b, h, s)
    assert _err(lse, lse_ref) <= 1e-5 * max(1.0, lse_ref.abs().max().item())


# --- accuracy -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=("fp32", "bf16"))
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("s", SEQ_LENS)
def test_matches_reference_hf_layout(s, d, dtype):
    _check_against_reference(2, 2, s, d, dtype, "hf", seed=100 * s + d)


@pytest.mark.parametrize("dtype", DTYPES, ids=("fp32", "bf16"))
@pytest.mark.parametrize("layout", ("bhsd", "strided"))
@pytest.mark.parametrize("s,d", [(1, 8), (17, 80), (71, 32), (130, 64)])
def test_matches_reference_other_layouts(s, d, layout, dtype):
    _check_against_reference(1, 3, s, d, dtype, layout, seed=7 * s + d)


@pytest.mark.parametrize("s,d", [(300, 16), (260, 24), (5, 128), (9, 7), (3, MAX_HEAD_DIM)])
def test_long_sequences_and_unusual_head_dims(s, d):
    """S > 256 takes query blocks of 128 rows (dK/dV accumulate across blocks); D not a multiple of 8."""
    for dtype in DTYPES:
        _check_against_reference(1, 1, s, d, dtype, "bhsd", seed=s + d)


@pytest.mark.parametrize("isa", ("avx512", "avx2", "generic"))
def test_every_isa_matches_reference(isa, monkeypatch):
    isa_or_skip(isa, monkeypatch)
    for s, d in [(1, 8), (17, 80), (71, 32), (130, 64), (9, 7)]:
        for dtype in DTYPES:
            _check_against_reference(2, 2, s, d, dtype, "hf", seed=s * d)


def test_custom_scale_and_large_scores():
    """A large scale makes the softmax nearly one-hot: exercises the max subtraction."""
    q, k, v, dout = _inputs(2, 2, 33, 32, torch.float32, "hf", 3)
    for scale in (0.01, 1.0, 3.0):
        out, _, dq, dk, dv = _kernel_run(q, k, v, dout, scale)
        ref = _sdpa(q, k, v, dout, torch.float64, scale)
        theirs = _sdpa(q, k, v, dout, torch.float32, scale)
        _assert_within_sdpa_error((out, dq, dk, dv), theirs, ref, ("out", "dq", "dk", "dv"))


def test_results_do_not_depend_on_thread_count():
    q, k, v, dout = _inputs(4, 3, 45, 32, torch.float32, "hf", 5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _kernel_run(q, k, v, dout, 0.2)
        torch.set_num_threads(max(2, before))
        many = _kernel_run(q, k, v, dout, 0.2)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a, b)


# --- layout -------------------------------------------------------------------------------------


def test_output_layout_follows_the_input():
    q, k, v, dout = _inputs(2, 4, 9, 16, torch.float32, "hf", 0)
    out, lse, dq, dk, dv = _kernel_run(q, k, v, dout, 0.25)
    # sequence-major inputs (HF views) -> [B, S, H, D] memory: transposing back is free
    for t in (out, dq, dk, dv):
        assert t.transpose(1, 2).is_contiguous()
    assert lse.is_contiguous()
    q, k, v, dout = _inputs(2, 4, 9, 16, torch.float32, "bhsd", 0)
    for t in _kernel_run(q, k, v, dout, 0.25):
        assert t.is_contiguous()


# --- autograd wrapper ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=("fp32", "bf16"))
def test_autograd_function_matches_sdpa(dtype):
    q, k, v, dout = _inputs(2, 4, 23, 32, dtype, "hf", 11)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = causal_attention(*leaves)
    assert out.dtype == dtype and out.requires_grad
    out.backward(dout)
    ref = _sdpa(q, k, v, dout, torch.float64)
    theirs = _sdpa(q, k, v, dout, dtype)
    ours = (out.detach(), *(t.grad for t in leaves))
    _assert_within_sdpa_error(ours, theirs, ref, ("out", "dq", "dk", "dv"))


def test_autograd_through_hf_views_and_partial_grads():
    b, s, h, d = 2, 19, 2, 16
    x = torch.randn(b, s, 3 * h * d, requires_grad=True)
    q, k, v = (t.view(b, s, h, d).transpose(1, 2) for t in x.split(h * d, dim=2))
    out = causal_attention(q, k.detach(), v)  # k gets no gradient
    out.transpose(1, 2).reshape(b, s, h * d).square().sum().backward()
    x64 = x.detach().double().requires_grad_()
    q64, k64, v64 = (t.view(b, s, h, d).transpose(1, 2) for t in x64.split(h * d, dim=2))
    ref = F.scaled_dot_product_attention(q64, k64.detach(), v64, is_causal=True)
    ref.transpose(1, 2).reshape(b, s, h * d).square().sum().backward()
    assert x.grad[..., h * d:2 * h * d].abs().max() == 0
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)


def test_autocast_bf16_gives_bf16_output_and_float32_gradients():
    q, k, v, dout = _inputs(2, 2, 31, 32, torch.float32, "hf", 13)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = causal_attention(*leaves)
    assert out.dtype == torch.bfloat16
    out.backward(dout.bfloat16())
    for t in leaves:
        assert t.grad is not None and t.grad.dtype == torch.float32
    # what autocast does to SDPA: bf16 inputs, bf16 output, gradients cast back to float32
    ref_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out = F.scaled_dot_product_attention(*ref_leaves, is_causal=True)
    ref_out.backward(dout.bfloat16())
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    ref = _sdpa(qb, kb, vb, dout.bfloat16(), torch.float64)
    ours = (out.detach(), *(t.grad for t in leaves))
    theirs = (ref_out.detach(), *(t.grad for t in ref_leaves))
    _assert_within_sdpa_error(ours, theirs, ref, ("out", "dq", "dk", "dv"))


def test_fallbacks_use_sdpa_itself(monkeypatch):
    q, k, v, _ = _inputs(1, 2, 12, 8, torch.float64, "bhsd", 2)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(causal_attention(q, k, v), want)  # float64: not a kernel dtype
    q, k, v, _ = _inputs(1, 2, 12, 8, torch.float32, "bhsd", 2)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(causal_attention(q, k, v, backend="torch"), want)
    monkeypatch.setenv("TINYMEM_BACKEND", "torch")
    assert torch.equal(causal_attention(q, k, v), want)
    monkeypatch.setenv("TINYMEM_BACKEND", "triton")  # a process-wide GPU choice: the kernel still runs
    torch.testing.assert_close(causal_attention(q, k, v), want)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, _ = _inputs(1, 2, 12, 20, torch.float32, "hf", 4)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(causal_attention(q, k, v), want)
    torch.testing.assert_close(causal_attention(q, k, v, 0.5),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5))


# --- bad inputs ---------------------------------------------------------------------------------


def test_ops_reject_bad_inputs():
    fwd, bwd = torch.ops.tinymem.causal_attention_fwd, torch.ops.tinymem.causal_attention_bwd
    q = torch.randn(1, 2, 5, 8)
    cases = [
        ("same shape", lambda: fwd(q, q[:, :, :4], q, 1.0)),
        ("same shape", lambda: fwd(q, q, q[:, :1], 1.0)),
        ("must be \\[B, H, S, D\\]", lambda: fwd(q[0], q[0], q[0], 1.0)),
        ("float32 or bfloat16, got Half", lambda: fwd(q.half(), q.half(), q.half(), 1.0)),
        ("float32 or bfloat16, got Double", lambda: fwd(q.double(), q.double(), q.double(), 1.0)),
        ("same dtype", lambda: fwd(q, q.bfloat16(), q, 1.0)),
        ("head dim D=300 is larger than the supported maximum 256",
         lambda: fwd(*(torch.randn(1, 1, 2, 300),) * 3, 1.0)),
        ("scale must be finite", lambda: fwd(q, q, q, math.inf)),
    ]
    out, lse = fwd(q, q, q, 0.5)
    cases += [
        ("lse must be", lambda: bwd(q, q, q, q, out, lse[:, :1], 0.5)),
        ("lse must be", lambda: bwd(q, q, q, q, out, lse.double(), 0.5)),
        ("dout must have q's shape", lambda: bwd(q[:, :1], q, q, q, out, lse, 0.5)),
        ("out must be float32 or bfloat16", lambda: bwd(q, q, q, q, out.half(), lse, 0.5)),
    ]
    for msg, fn in cases:
        with pytest.raises(RuntimeError, match=msg):
            fn()


def test_wrapper_errors():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match="got Half"):
        causal_attention(q.half(), q.half(), q.half(), backend="cpp")  # explicit: no silent fallback
    with pytest.raises(registry.BackendUnavailable, match="CPU-only"):
        causal_attention(*(torch.empty(1, 2, 5, 8, device="meta"),) * 3, backend="cpp")
    with pytest.raises(registry.BackendUnavailable, match="no triton backend"):
        causal_attention(q, q, q, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        causal_attention(q, q, q, backend="fast")


def test_ops_have_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = torch.randn(1, 2, 5, 8)
    causal_attention(q, q, q)  # registers the fakes
    with FakeTensorMode():
        x = torch.empty(2, 7, 3 * 4 * 16)
        fq, fk, fv = (t.view(2, 7, 4, 16).transpose(1, 2) for t in x.split(64, dim=2))
        out, lse = torch.ops.tinymem.causal_attention_fwd(fq, fk, fv, 0.25)
        dq, dk, dv = torch.ops.tinymem.causal_attention_bwd(out, fq, fk, fv, out, lse, 0.25)
    assert out.shape == (2, 4, 7, 16) and out.transpose(1, 2).is_contiguous()
    assert lse.shape == (2, 4, 7) and lse.dtype == torch.float32
    assert dq.shape == dk.shape == dv.shape == (2, 4, 7, 16)
