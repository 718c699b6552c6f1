"""The ops on a non-default CUDA stream give what they give on the default stream: their kernels launch on
the current stream (the compiled ops take it from c10, Triton from torch).

Each op runs inside ``with torch.cuda.stream(side)`` on inputs made on that stream behind a spin kernel of
about 20 ms: a kernel launched on any other stream would run at once and read the inputs before they
are written (zeros, or whatever the allocation held), so its result would differ. The data checks that
synchronise with the host are switched off (``validate=False``): a host sync would wait for the spin and
hide a wrong stream.
"""

import pytest
import torch
from conftest import backend_or_skip
from memscore_checks import random_problem

from tinymem_fast.ops import masked_subnet as ms
from tinymem_fast.ops.attention import causal_attention
from tinymem_fast.ops.linear_cross_entropy import fused_linear_cross_entropy
from tinymem_fast.ops.memscore import lm_head_argmax, memscore, memscore_examples

pytestmark = pytest.mark.cuda

BACKENDS = ["cuda", "triton"]
SPIN_CYCLES = 40_000_000  # torch.cuda._sleep: about 20-30 ms at GPU clock rates


def on_side_stream(fn, *inputs):
    """``fn(*copies)`` on a fresh stream, the copies of ``inputs`` allocated and written on that stream
    after the spin; -> (fn's result, the copies, as fn left them)."""
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        copies = [torch.zeros_like(x) for x in inputs]
        torch.cuda._sleep(SPIN_CYCLES)
        for c, x in zip(copies, inputs, strict=True):
            c.copy_(x)
        out = fn(*copies)
    torch.cuda.synchronize()
    return out, copies


def assert_same(got, want, what):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.device == b.device and a.dtype == b.dtype, (what, i)
        assert torch.equal(a, b), f"{what}: output {i} differs from the default stream's"


@pytest.mark.parametrize("backend", BACKENDS)
def test_memscore_ops_on_a_side_stream(backend):
    backend_or_skip(backend, "cuda")
    h, w, b, y = random_problem(256, 128, 2000, torch.bfloat16, bias=True, seed=1, hit_frac=0.6,
                                device="cuda")
    h, y = h.view(4, 64, 128), y.view(4, 64)

    def ops(h, w, b, y):
        s = memscore(h, w, y, bias=b, backend=backend, validate=False)
        ex = memscore_examples(h, w, y, bias=b, need_nll=False, early_exit=True, backend=backend,
                               validate=False)
        arg = lm_head_argmax(h[:, -1], w, bias=b, backend=backend, validate=False)
        return s.match, s.nll, ex.exact, ex.first_mismatch, ex.matched, arg

    want = ops(h, w, b, y)
    got, _ = on_side_stream(ops, h, w, b, y)
    assert_same(got, want, "memscore ops")
    # the check can fail: the ops on the zeros a wrong-stream kernel would read give other ids
    assert not torch.equal(ops(torch.zeros_like(h), w, b, y)[-1], want[-1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_subnet_ops_on_a_side_stream(backend):
    backend_or_skip(backend, "cuda")
    g = torch.Generator(device="cuda").manual_seed(2)
    scores = torch.randn(512, 1031, generator=g, device="cuda")
    weight = torch.randn(512, 1031, generator=g, device="cuda").to(torch.bfloat16)
    grad = torch.randn(512, 1031, generator=g, device="cuda")
    buf = torch.randn(512, 1031, generator=g, device="cuda")

    def ops(scores, weight, grad, buf):
        thr = ms.subnet_threshold(scores, 0.3, backend=backend)
        mw = ms.masked_weight(weight, scores, thr, backend=backend)
        sg = ms.ste_score_grad(grad, weight, scores, backend=backend)
        ms.subnet_sgd_step_(scores, sg, buf, lr=0.1, backend=backend)
        return thr.value, thr.cut, mw, sg

    mine = [t.clone() for t in (scores, weight, grad, buf)]
    want = ops(*mine)
    got, copies = on_side_stream(ops, scores, weight, grad, buf)
    assert_same(got, want, "masked-subnet ops")
    assert_same((copies[0], copies[3]), (mine[0], mine[3]), "SGD step (scores, momentum buffer)")


def test_causal_attention_on_a_side_stream():
    """On CUDA tensors causal_attention is PyTorch's SDPA (the compiled kernel is CPU-only)."""
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(2, 4, 128, 64, generator=g, device="cuda").to(torch.bfloat16) for _ in range(3))
    want = causal_attention(q, k, v)
    got, _ = on_side_stream(causal_attention, q, k, v)
    torch.testing.assert_close(got, want)


def test_linear_cross_entropy_on_a_side_stream():
    """The Triton row kernel of the fused cross-entropy, forward and backward."""
    backend_or_skip("triton", "cuda")
    h, w, _, y = random_problem(300, 64, 1000, torch.bfloat16, bias=False, seed=4, device="cuda")

    def loss_and_grads(h, w, y):
        h, w = h.requires_grad_(), w.requires_grad_()
        loss = fused_linear_cross_entropy(h, w, y, validate=False, backend="triton")
        loss.backward()
        return loss.detach(), h.grad, w.grad

    want = loss_and_grads(h.clone(), w.clone(), y)
    got, _ = on_side_stream(loss_and_grads, h, w, y)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
