"""Fused linear + cross-entropy on every backend it has (torch, cpp): loss and gradients of hidden, weight
and bias against ``F.linear`` + ``F.cross_entropy``, over odd shapes, float32 and bfloat16, with and
without bias, ignored targets, label smoothing and every reduction; ignored-only batches, ``-inf`` logits,
input validation, ``torch.library.opcheck`` of the compiled ops and ``torch.compile(fullgraph=True)``.

Tolerance (flash-attention's rule): against a float64 computation of the same loss, the op's error is at
most twice the error of the plain PyTorch path run in the op's precision, plus a small floor -- no
assertion depends on one CPU's rounding.
"""

import backend_cases
import pytest
import torch
import torch.nn.functional as F
from backend_cases import cases
from conftest import isa_or_skip
from torch._dynamo.testing import CompileCounterWithBackend

from tinymem_fast.ops import linear_cross_entropy as lce
from tinymem_fast.ops.linear_cross_entropy import FusedLinearCrossEntropyLoss, fused_linear_cross_entropy

BACKENDS = ["torch", "cpp", "triton"]
# (N rows, d, V): one row, odd everything, V well past a SIMD vector and not a multiple of any
SHAPES = [(1, 3, 5), (7, 17, 1000), (130, 64, 4099)]
DTYPES = [torch.float32, torch.bfloat16]
REDUCTIONS = ["none", "mean", "sum"]
# the floor, relative to the quantity's largest entry
FLOOR = {torch.float32: 1e-6, torch.float16: 3e-4, torch.bfloat16: 2e-3}


def _problem(n, d, vocab, dtype, bias, seed=0, ignore_every=3, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(vocab, d, generator=g) * (2.0 / d ** 0.5)).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype) if bias else None
    y = torch.randint(0, vocab, (n,), generator=g)
    if n > 1:
        y[::ignore_every] = -100
    return tuple(t.to(device) if t is not None else None for t in (h, w, b, y))


def _loss_and_grads(fn, h, w, b, y, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in (h, w, b) if t is not None]
    hh, ww, *bb = leaves
    loss = fn(hh, ww, y, bb[0] if bb else None)
    grads = torch.autograd.grad(loss, leaves, upstream(loss))
    return [loss.detach()] + [g_.detach() for g_ in grads]


def _plain(reduction, eps, dtype=None):
    def fn(h, w, y, b):
        if dtype is not None:
            h, w, b = h.to(dtype), w.to(dtype), b.to(dtype) if b is not None else None
        logits = F.linear(h, w, b)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        return F.cross_entropy(logits, y, reduction=reduction, label_smoothing=eps)
    return fn


def _upstream(reduction, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (lambda loss: torch.randn(loss.shape, generator=g).to(loss.device)) if reduction == "none" else (
        lambda loss: torch.ones((), device=loss.device))


def assert_within_rule(got, ref, truth, dtype, what=""):
    """|got - truth| <= 2 |ref - truth| + floor, elementwise maxima (flash-attention's rule)."""
    got, ref, truth = got.double(), ref.double(), truth.double()
    assert got.shape == truth.shape, (what, got.shape, truth.shape)
    finite = torch.isfinite(truth)
    assert torch.equal(torch.isfinite(got), finite), f"{what}: non-finite entries differ"
    assert torch.equal(got[~finite], truth[~finite]), f"{what}: infinities differ"
    if not finite.any():
        return
    scale = float(truth[finite].abs().max().clamp(min=1e-3))
    err = float((got[finite] - truth[finite]).abs().max())
    ref_err = float((ref[finite] - truth[finite]).abs().max())
    assert err <= 2 * ref_err + FLOOR[dtype] * scale, (
        f"{what}: error {err:.3e} vs the plain path's {ref_err:.3e} (scale {scale:.3e})")


def _compare(backend, h, w, b, y, reduction, eps, **kw):
    dtype = h.dtype
    up = _upstream(reduction, h.shape[0])

    def fused(hh, ww, yy, bb):
        return fused_linear_cross_entropy(hh, ww, yy, bb, reduction=reduction, label_smoothing=eps,
                                          backend=backend, **kw)

    got = _loss_and_grads(fused, h, w, b, y, up)
    ref = _loss_and_grads(_plain(reduction, eps), h, w, b, y, _upstream(reduction, h.shape[0]))
    truth = _loss_and_grads(_plain(reduction, eps, torch.float64), h, w, b, y,
                            _upstream(reduction, h.shape[0]))
    assert got[0].dtype == torch.float32
    for name, g_, r, t, like in zip(("loss", "grad hidden", "grad weight", "grad bias"), got, ref, truth,
                                    (None, h, w, b), strict=False):
        if like is not None:
            assert g_.dtype == like.dtype, name
        assert_within_rule(g_, r, t, dtype, name)
    return got


def _kernels():
    return backend_cases.triton_kernels("linear_cross_entropy", "_ce_rows_kernel")


def _ready(backend, *dtypes) -> str:
    """Skip unless ``backend`` runs here on ``dtypes``; -> the device its tensors go to."""
    return backend_cases.ready(backend, dtypes or (torch.float32,), _kernels)


@pytest.mark.parametrize("backend,shape,dtype,bias,eps,reduction",
                         cases(BACKENDS, SHAPES, DTYPES, [False, True], [0.0, 0.1], REDUCTIONS))
def test_matches_plain_path(backend, shape, dtype, bias, eps, reduction):
    dev = _ready(backend, dtype)
    if backend == "triton" and dev == "cpu" and shape[0] > 64:
        # 2 s a case in the interpreter; rows of several column tiles are covered by test_neg_inf_logits
        pytest.skip("the Triton interpreter takes the small shapes; this one runs on a GPU")
    h, w, b, y = _problem(*shape, dtype, bias, device=dev)
    _compare(backend, h, w, b, y, reduction, eps)


@pytest.mark.parametrize("backend,dtype,reduction", cases(BACKENDS, [*DTYPES, torch.float16], REDUCTIONS))
def test_small_chunks_and_leading_dims(backend, dtype, reduction):
    """[B, T, d] hidden states, rows split into many chunks (the last one short); float16 too."""
    dev = _ready(backend, dtype)
    h, w, b, y = _problem(30, 24, 777, dtype, True, seed=3, device=dev)
    got = _compare(backend, h, w, b, y, reduction, 0.1, chunk_rows=7)
    out = fused_linear_cross_entropy(h.view(5, 6, 24), w, y.view(5, 6), b, reduction=reduction,
                                     backend=backend, label_smoothing=0.1, chunk_rows=7)
    assert out.shape == ((5, 6) if reduction == "none" else ())
    torch.testing.assert_close(out.reshape(got[0].shape), got[0])


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_cpp_every_isa(isa, monkeypatch):
    _ready("cpp")
    isa_or_skip(isa, monkeypatch)
    for dtype in DTYPES:
        h, w, b, y = _problem(19, 33, 1001, dtype, True, seed=4)
        for reduction in ("mean", "none"):
            _compare("cpp", h, w, b, y, reduction, 0.1)


@pytest.mark.parametrize("backend,reduction", cases(BACKENDS, REDUCTIONS))
def test_only_ignored_targets(backend, reduction):
    dev = _ready(backend)
    h, w, b, y = _problem(6, 8, 50, torch.float32, True, device=dev)
    y = torch.full_like(y, -7)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = fused_linear_cross_entropy(hh, ww, y, b, ignore_index=-7, reduction=reduction, backend=backend)
    ref = F.cross_entropy(F.linear(h, w, b), y, ignore_index=-7, reduction=reduction)
    torch.testing.assert_close(out, ref, equal_nan=True)  # mean: NaN, as F.cross_entropy
    out.sum().backward()
    assert not hh.grad.any() and not ww.grad.any()


@pytest.mark.parametrize("backend,dtype,eps", cases(BACKENDS, DTYPES, [0.0, 0.1]))
def test_neg_inf_logits(backend, dtype, eps, monkeypatch):
    """A -inf bias on the last ids (suppressed tokens): with a vocabulary one past a multiple of the
    chunking, the last slice holds -inf logits only. The loss is finite (infinite with label smoothing,
    whose mean over all logits is -inf -- as F.cross_entropy), the gradients finite."""
    dev = _ready(backend, dtype)
    # the half-precision weight pass of torch/triton then runs 64-column vocabulary slices: 4097 = 64 * 64 + 1
    monkeypatch.setattr(lce, "_vocab_slice", lambda n, v: 64)
    h, w, b, y = _problem(9, 16, 4097, dtype, True, seed=5, device=dev)
    b[-70:] = float("-inf")
    y = torch.where(y >= 4097 - 70, y - 100, y)
    for reduction in ("none", "mean"):
        got = _compare(backend, h, w, b, y, reduction, eps)
        assert all(torch.isfinite(g_).all() for g_ in got[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_and_upstream_scale(backend):
    """The module form; a scalar upstream gradient other than 1 scales the forward-made gradients."""
    dev = _ready(backend)
    h, w, b, y = _problem(11, 12, 300, torch.float32, True, seed=6, device=dev)
    mod = FusedLinearCrossEntropyLoss(reduction="sum", label_smoothing=0.05, backend=backend)
    assert "label_smoothing=0.05" in repr(mod)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    (mod(leaves[0], leaves[1], y, leaves[2]) * 0.37).backward()
    ref_leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    (F.cross_entropy(F.linear(*ref_leaves), y, reduction="sum", label_smoothing=0.05) * 0.37).backward()
    for a, r in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_inputs_get_no_gradient(backend):
    dev = _ready(backend, torch.bfloat16)
    h, w, b, y = _problem(5, 8, 40, torch.bfloat16, True, seed=7, device=dev)
    hh = h.clone().requires_grad_()
    fused_linear_cross_entropy(hh, w, y, b, backend=backend).backward()
    ref = h.clone().requires_grad_()
    F.cross_entropy(F.linear(ref, w, b).float(), y).backward()
    assert w.grad is None and hh.grad.dtype == torch.bfloat16
    torch.testing.assert_close(hh.grad, ref.grad, rtol=2e-2, atol=1e-3)
    with torch.no_grad():
        out = fused_linear_cross_entropy(hh, w, y, b, backend=backend)
    assert not out.requires_grad


# --- validation ------------------------------------------------------------------------------------


def _bad(match, *args, **kw):
    h, w, b, y = _problem(4, 8, 20, torch.float32, False)
    kw = {"hidden": h, "weight": w, "targets": y, **kw}
    with pytest.raises((ValueError, TypeError), match=match):
        fused_linear_cross_entropy(**kw)


def test_bad_inputs_raise_one_line_errors():
    h, w, b, y = _problem(4, 8, 20, torch.float32, False)
    _bad("hidden has d=8 features", weight=torch.randn(20, 9))
    _bad("targets must have hidden's leading shape", targets=y[:3])
    _bad("weight is torch.float64", weight=w.double())
    _bad("integer class ids", targets=y.float())
    _bad("bias must be", bias=torch.randn(19))
    _bad("reduction must be", reduction="avg")
    _bad("label_smoothing", label_smoothing=1.5)
    _bad("outside the vocabulary", targets=torch.tensor([0, 1, 20, 2]))
    _bad("outside the vocabulary", targets=torch.tensor([0, 1, -1, 2]))
    h_nan = h.clone()
    h_nan[2, 3] = float("nan")
    _bad("hidden contains NaN or inf", hidden=h_nan)
    w_inf = w.clone()
    w_inf[5, 0] = float("inf")
    _bad("weight contains NaN or inf", weight=w_inf)
    # a finite float16 weight whose sum overflows float16 is still finite
    big = torch.full((20, 8), 1000.0, dtype=torch.float16)
    out = fused_linear_cross_entropy(h.half(), big, y, backend="torch")
    assert out.dtype == torch.float32
    # validate=False skips the data checks: a NaN propagates as in the plain path
    out = fused_linear_cross_entropy(h_nan, w, y, validate=False, backend="torch")
    assert torch.isnan(out)


def test_bad_inputs_to_the_compiled_op():
    _ready("cpp")
    h, w, b, y = _problem(4, 8, 20, torch.float32, False)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.tinymem.linear_ce_fwd(h, w, None, torch.tensor([0, 1, 25, 2]), -100, 0.0, 1, True, True,
                                        False, 0)


# --- custom ops: opcheck and torch.compile ---------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(reduction, dtype):
    _ready("cpp")
    h, w, b, y = _problem(9, 16, 37, dtype, True, seed=8)
    h, w, b = (t.requires_grad_() for t in (h, w, b))
    ops = torch.ops.tinymem
    torch.library.opcheck(ops.linear_ce_fwd, (h, w, b, y, -100, 0.1, reduction, True, True, True, 4))
    torch.library.opcheck(ops.linear_ce_fwd, (h, w, None, y, -100, 0.0, reduction, False, True, False, 0))
    lse = ops.linear_ce_fwd(h, w, b, y, -100, 0.1, reduction, False, False, False, 0)[1].detach()
    grad = torch.randn(9) if reduction == 0 else torch.tensor(0.5)
    torch.library.opcheck(ops.linear_ce_bwd, (grad, h.detach(), w.detach(), b.detach(), y, lse, -100, 0.1,
                                              reduction, True, True, True, 4))


def test_opcheck_triton_ops():
    dev = _ready("triton")
    from tinymem_fast import kernels

    if not kernels.TRITON_OPS:
        pytest.skip(f"torch {torch.__version__} has no torch.library.triton_op")
    g = torch.Generator().manual_seed(12)
    z = torch.randn(5, 70, generator=g).to(dev)
    y = torch.tensor([3, -100, 69, 0, 12], device=dev)
    scale = torch.tensor([0.2, 0.0, 0.2, 0.2, 0.2], device=dev)
    lse, loss = torch.empty(5, device=dev), torch.empty(5, device=dev)
    ops = torch.ops.tinymem_triton
    torch.library.opcheck(ops.linear_ce_rows_fwd, (z.clone(), y, scale, lse, loss, 0.1, 70, -100, True))
    ops.linear_ce_rows_fwd(z.clone(), y, scale, lse, loss, 0.1, 70, -100, False)
    zs = z[:, 10:40].contiguous()
    torch.library.opcheck(ops.linear_ce_rows_grad, (zs, y, scale, lse, 0.1, 70, 10, -100))


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend,reduction", cases(BACKENDS, ["mean", "none"]))
def test_compile_fullgraph(backend, reduction, fresh_dynamo):
    dev = _ready(backend)
    h, w, b, y = _problem(12, 16, 101, torch.float32, True, seed=9, device=dev)
    head = torch.nn.Linear(16, 101, device=dev)
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    loss_fn = FusedLinearCrossEntropyLoss(reduction=reduction, backend=backend)

    def step(x):
        loss = loss_fn(torch.tanh(x), head.weight, y, head.bias)
        return loss.sum()

    counter = CompileCounterWithBackend("aot_eager")
    x = h.clone().requires_grad_()
    out = torch.compile(step, fullgraph=True, backend=counter)(x)
    out.backward()
    assert counter.frame_count == 1
    got = [x.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    head.zero_grad()
    x2 = h.clone().requires_grad_()
    ref = F.cross_entropy(head(torch.tanh(x2)), y, reduction=reduction).sum()
    ref.backward()
    torch.testing.assert_close(out, ref)
    for a, r in zip(got, (x2.grad, head.weight.grad, head.bias.grad), strict=True):
        torch.testing.assert_close(a, r)


# --- token_loss (training and the unlearning methods' losses) takes the fused op on large heads --------


def _tiny_lm(arch: str, vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":  # tied head, dropout on: the fused path must draw the same dropout masks
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                          bos_token_id=None, eos_token_id=None))
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=32,
                                            max_position_embeddings=16))


@pytest.mark.parametrize("arch,precision", [("gpt2", "fp32"), ("gpt_neox", "fp32"), ("gpt2", "bf16")])
def test_token_loss_fused_matches_plain(arch, precision):
    from tinymem_fast.integrations.mixed_precision import autocast
    from tinymem_fast.tinymem import training

    model = _tiny_lm(arch, training.FUSED_CE_MIN_VOCAB + 3)
    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, training.FUSED_CE_MIN_VOCAB, (3, 9), generator=g)
    pad = torch.zeros_like(x, dtype=torch.bool)
    pad[1, 6:] = True
    results = []
    for fused in (None, False):
        model.zero_grad()
        torch.manual_seed(5)
        with autocast(model, precision, "cpu"):
            seq, n = training.token_loss(model, x, pad, False, fused=fused)
        seq.sum().backward()
        results.append((seq.detach(), n, [p.grad.clone() for p in model.parameters()]))
    (seq_f, n_f, grads_f), (seq_p, n_p, grads_p) = results
    assert torch.equal(n_f, n_p)
    tol = {"rtol": 1e-4, "atol": 1e-5} if precision == "fp32" else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(seq_f, seq_p, **tol)
    for a, b in zip(grads_f, grads_p, strict=True):
        scale = float(b.abs().max().clamp(min=1e-6))
        torch.testing.assert_close(a / scale, b / scale, **tol)


def test_token_loss_keeps_small_heads_and_hooks_on_the_plain_path(monkeypatch):
    from tinymem_fast.tinymem import training

    calls = []
    monkeypatch.setattr(training, "_fused_token_ce", lambda *a: calls.append(a) or 1 / 0)
    x = torch.randint(0, 50, (2, 8))
    pad = torch.zeros_like(x, dtype=torch.bool)
    training.token_loss(_tiny_lm("gpt2", 50), x, pad, False)  # a small head: plain
    big = _tiny_lm("gpt_neox", training.FUSED_CE_MIN_VOCAB)
    handle = big.get_output_embeddings().register_forward_hook(lambda *a: None)
    training.token_loss(big, x, pad, False)  # a hooked head must see its forward: plain
    with pytest.raises(ValueError, match="no plain linear LM head"):
        training.token_loss(big, x, pad, False, fused=True)
    handle.remove()
    assert not calls
    with pytest.raises(ZeroDivisionError):
        training.token_loss(big, x, pad, False)
    assert len(calls) == 1


# --- the Triton kernel compiles for an A100 (sm_80) and an H100 (sm_90) without either ---------------

_COMPILE_SCRIPT = r"""
import inspect
import sys

import triton
from triton.backends.compiler import GPUTarget

from tinymem_fast.kernels import linear_cross_entropy as tk

TARGET = GPUTarget("cuda", int(sys.argv[1]), 32)
kw = "constexprs" if "constexprs" in inspect.signature(triton.compiler.ASTSource).parameters else "constants"
done = 0
for dt in ("fp32", "fp16", "bf16"):
    for forward, grad in ((True, True), (True, False), (False, True)):
        sig = {"z_ptr": f"*{dt}", "y_ptr": "*i64", "scale_ptr": "*fp32", "lse_ptr": "*fp32",
               "loss_ptr": "*fp32", "cols": "i32", "v0": "i32", "vocab": "i32", "ignore_index": "i32",
               "eps": "fp32"}
        const = dict(FORWARD=forward, GRAD=grad, BLOCK=tk._BLOCK)
        sig.update({name: "constexpr" for name in const})
        src = triton.compiler.ASTSource(fn=tk._ce_rows_kernel, signature=sig, **{kw: const})
        kernel = triton.compile(src, target=TARGET, options=dict(num_warps=tk._WARPS))
        assert kernel.asm.get("cubin"), "_ce_rows_kernel: no cubin"
        done += 1
print(f"compiled {done} linear_cross_entropy kernel variants for sm_{sys.argv[1]}")
"""


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernel_compiles(tmp_path, arch):
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # really compile, never reuse a cached cubin
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(arch)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"kernel variants for sm_{arch}" in proc.stdout


@pytest.mark.parametrize("backend,reduction", cases(BACKENDS, ["mean", "none"]))
def test_backward_twice_with_retain_graph(backend, reduction):
    """The forward-made gradients are handed to autograd without a copy; a second backward through the
    same graph recomputes them instead of reusing the (scaled) first ones."""
    dev = _ready(backend)
    h, w, b, y = _problem(7, 8, 30, torch.float32, True, seed=10, device=dev)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    loss = fused_linear_cross_entropy(leaves[0], leaves[1], y, leaves[2], reduction=reduction,
                                      backend=backend).sum()
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in leaves]
    loss.backward()
    for t, g_ in zip(leaves, first, strict=True):
        torch.testing.assert_close(t.grad, 2 * g_)
