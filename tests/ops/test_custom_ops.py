"""The compiled ops as PyTorch custom ops: ``torch.library.opcheck`` (schema, fake implementation, autograd
registration, AOT dispatch) for every op of the extension and every Triton op, and ``torch.compile(
fullgraph=True)`` -- no graph break -- of the public entry points other codebases put in their models: a
MaskedSubnet layer forward + backward, memscore, lm_head_argmax, and a block using the fused attention.

Triton ops run in the interpreter on CPU tensors without a GPU (tests/conftest.py sets TRITON_INTERPRET=1).
"""

import pytest
import torch
from backend_cases import needs_cuda_backend, triton_kernels
from conftest import backend_or_skip

from tinymem_fast.ops import registry
from tinymem_fast.ops.attention import causal_attention
from tinymem_fast.ops.masked_subnet import MaskedSubnet
from tinymem_fast.ops.memscore import head_screen_available, lm_head_argmax, memscore, reduce_scores

OPS = torch.ops.tinymem


def _opcheck(op, args, kwargs=None):
    # test_aot_dispatch_dynamic traces the op with symbolic shapes through AOTAutograd: the check that
    # torch.compile will take it
    torch.library.opcheck(op, args, kwargs)


def _cpp():
    backend_or_skip("cpp")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- the compiled extension ---------------------------------------------------------------------


def test_opcheck_subnet_ops():
    _cpp()
    g = _gen()
    s, w, grad = (torch.randn(7, 13, generator=g) for _ in range(3))
    value, cut = OPS.subnet_threshold(s, 30)
    _opcheck(OPS.subnet_threshold, (s, 30))
    _opcheck(OPS.subnet_masked_weight, (w, s, value, cut))
    _opcheck(OPS.subnet_ste_grad, (grad, w, s))
    buf = torch.zeros(7, 13)
    _opcheck(OPS.subnet_sgd_step_, (s.clone(), grad, buf, 0.1, 0.9, 5e-4, False))


@pytest.mark.parametrize("need_nll,early_exit", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck_memscore(need_nll, early_exit, bias):
    _cpp()
    g = _gen(1)
    h, w = torch.randn(9, 16, generator=g), torch.randn(37, 16, generator=g)
    b = torch.randn(37, generator=g) if bias else None
    y = torch.randint(0, 37, (9,), generator=g)
    _opcheck(OPS.memscore, (h, w, b, y, need_nll, early_exit, 0))
    _opcheck(OPS.lm_head_argmax, (h, w, b, 8))


def test_opcheck_screened_head():
    _cpp()
    # the host queries (no tensors) are ops too: schema and dispatch still checked
    _opcheck(OPS.head_screen_available, ())
    _opcheck(OPS.head_screen_stats, (False,))
    if not head_screen_available():
        pytest.skip("the bf16-screened head needs a CPU with AVX512-BF16")
    g = _gen(2)
    h, w = torch.randn(3, 32, generator=g), torch.randn(50, 32, generator=g)
    packed, wnorm = OPS.pack_head_bf16(w)
    _opcheck(OPS.pack_head_bf16, (w,))
    _opcheck(OPS.lm_head_argmax_screened, (h, w, packed, wnorm, None))
    _opcheck(OPS.lm_head_argmax_screened, (h, w, packed, wnorm, torch.randn(50, generator=g)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_causal_attention(dtype):
    _cpp()
    g = _gen(3)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g).to(dtype).requires_grad_() for _ in range(3))
    # with inputs that require grad opcheck also checks the autograd registration
    _opcheck(OPS.causal_attention_fwd, (q, k, v, 0.3))
    with torch.no_grad():
        out, lse = OPS.causal_attention_fwd(q, k, v, 0.3)
    dout = torch.randn(out.shape, generator=g).to(dtype)
    _opcheck(OPS.causal_attention_bwd, (dout, q.detach(), k.detach(), v.detach(), out, lse, 0.3))


def test_attention_autograd_is_the_registered_formula():
    """Gradients through the op itself (no Python autograd.Function around it) equal SDPA's."""
    _cpp()
    g = _gen(4)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g, dtype=torch.float64).float().requires_grad_()
               for _ in range(3))
    OPS.causal_attention_fwd(q, k, v, 0.5)[0].square().sum().backward()
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    sdpa(*ref, is_causal=True, scale=0.5).square().sum().backward()
    for a, b in zip((q, k, v), ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@needs_cuda_backend
def test_opcheck_cuda_ops():
    g = _gen(12)
    s, w, grad = (torch.randn(7, 13, generator=g).cuda() for _ in range(3))
    value, cut = OPS.subnet_threshold(s, 30)
    _opcheck(OPS.subnet_threshold, (s, 30))
    _opcheck(OPS.subnet_masked_weight, (w, s, value, cut))
    _opcheck(OPS.subnet_ste_grad, (grad, w, s))
    _opcheck(OPS.subnet_sgd_step_, (s.clone(), grad, torch.zeros_like(s), 0.1, 0.9, 5e-4, False))
    h, hw = torch.randn(9, 64, generator=g).cuda(), torch.randn(300, 64, generator=g).cuda()
    y = torch.randint(0, 300, (9,), generator=g).cuda()
    for need_nll, early_exit in ((True, False), (False, False), (False, True)):
        _opcheck(OPS.memscore, (h, hw, None, y, need_nll, early_exit, 0))
    _opcheck(OPS.lm_head_argmax, (h, hw, hw[:, 0].contiguous(), 0))


# --- Triton ops ---------------------------------------------------------------------------------


def _triton_op(name):
    if registry.unavailable_reason("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        pytest.skip("triton backend unavailable here")
    triton_kernels("memscore", "_memscore_kernel")
    triton_kernels("masked_subnet", "_masked_weight_kernel")
    from tinymem_fast import kernels

    if not kernels.TRITON_OPS:
        pytest.skip(f"torch {torch.__version__} has no torch.library.triton_op")
    return getattr(torch.ops.tinymem_triton, name)


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def test_opcheck_triton_memscore():
    g = _gen(5)
    h, w = torch.randn(5, 16, generator=g), torch.randn(40, 16, generator=g)
    y = torch.randint(0, 40, (5,), generator=g)
    h, w, y = h.to(_dev()), w.to(_dev()), y.to(_dev())
    _opcheck(_triton_op("memscore"), (h, w, None, y, True, False, 16))
    _opcheck(_triton_op("memscore"), (h, w, w[:, 0].contiguous(), y, False, True, 16))
    _opcheck(_triton_op("lm_head_argmax"), (h, w, None, 16))


def test_opcheck_triton_subnet_ops():
    g = _gen(6)
    s, w, grad = (torch.randn(7, 13, generator=g).to(_dev()) for _ in range(3))
    threshold = _triton_op("subnet_threshold")
    value, cut = threshold(s, 30)
    _opcheck(threshold, (s, 30))
    _opcheck(_triton_op("subnet_masked_weight"), (w, s, value, cut))
    _opcheck(_triton_op("subnet_ste_grad"), (grad, w, s))
    _opcheck(_triton_op("subnet_sgd_step_"), (s.clone(), grad, torch.zeros_like(s), 0.1, 0.9, 5e-4, False))


# --- torch.compile(fullgraph=True) of the public entry points ----------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend,compiler",
                         [("torch", "aot_eager"), ("cpp", "aot_eager"), ("cpp", "inductor")])
def test_compile_masked_subnet_forward_backward(backend, compiler, fresh_dynamo):
    backend_or_skip(backend)
    g = _gen(7)
    base = torch.nn.Linear(12, 9)
    layer = MaskedSubnet(base, 0.4, generator=g, backend=backend)
    eager = MaskedSubnet(torch.nn.Linear(12, 9), 0.4, backend=backend)
    eager.load_state_dict(layer.state_dict())
    x = torch.randn(4, 3, 12, generator=g, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    compiled = torch.compile(layer, fullgraph=True, backend=compiler)
    out = compiled(x)
    out.square().sum().backward()
    ref = eager(x2)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.scores.grad, eager.scores.grad)
    # an optimizer step changes the scores: the compiled layer must see the new mask
    with torch.no_grad():
        layer.scores.mul_(-1).add_(torch.randn(layer.scores.shape, generator=g))
        eager.scores.copy_(layer.scores)
    torch.testing.assert_close(compiled(x), eager(x2))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_compile_memscore(backend, fresh_dynamo):
    backend_or_skip(backend)
    g = _gen(8)
    h, w = torch.randn(2, 5, 16, generator=g), torch.randn(41, 16, generator=g)
    y = torch.randint(0, 41, (2, 5), generator=g)
    mask = torch.rand(2, 5, generator=g) > 0.3
    y_pad = torch.where(mask, y, -100)

    def score(h, w, y, mask):
        s = memscore(h, w, y, mask=mask, backend=backend)
        ex = reduce_scores(s, mask)
        return s.match, s.nll, ex.exact, ex.first_mismatch, lm_head_argmax(h[:, -1], w, backend=backend)

    got = torch.compile(score, fullgraph=True, backend="aot_eager")(h, w, y_pad, mask)
    want = score(h, w, y_pad, mask)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


class _AttentionBlock(torch.nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(causal_attention(q, k, v).transpose(1, 2).reshape(b, s, d))


def test_compile_fused_attention_model(fresh_dynamo):
    _cpp()
    torch.manual_seed(9)
    block = _AttentionBlock()
    x = torch.randn(2, 7, 16, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    ref = block(x2)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)
    for a, p in zip(grads, block.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)


def _tiny_hf(family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(10)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=100)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compile_hf_model_with_tinymem_attention_and_loss(family, fresh_dynamo):
    """A Hugging Face model patched by apply_tinymem (fused attention, fused linear cross-entropy) compiles
    whole: forward without labels, and the fused loss with its backward."""
    _cpp()
    from tinymem_fast.integrations.transformers import apply_tinymem

    model = _tiny_hf(family)
    ids = torch.randint(0, 100, (2, 9), generator=_gen(11))
    ref = model(input_ids=ids, labels=ids, use_cache=False)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    apply_tinymem(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    logits = compiled(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(logits, ref.logits, rtol=1e-4, atol=1e-5)
    out = compiled(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
