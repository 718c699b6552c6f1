"""The bf16-screened greedy head (pack_head + lm_head_argmax(pack=...), csrc/cpu/head_screen.cpp): its ids
must equal the float32 cpp kernel's bit for bit -- random shapes, bias with suppressed ids, exact ties,
one-ulp near-ties, huge and denormal-range values, non-finite rows -- plus stale-pack detection, fallbacks
and the number of logits it recomputes exactly."""

import pytest
import torch
from conftest import backend_or_skip

from tinymem_fast.ops.memscore import HeadPack, head_screen_available, lm_head_argmax, pack_head

MS = (1, 3, 7, 64, 130)
DS = (1, 17, 64, 128, 511, 512)
VS = (1, 5, 16, 17, 1000)


@pytest.fixture(autouse=True)
def _screened_head(monkeypatch):
    backend_or_skip("cpp")
    if not head_screen_available():
        pytest.skip("no bf16-screened head here (an extension without it, or a CPU without AVX512-BF16)")
    for var in ("TINYMEM_HEAD_SCREEN", "TINYMEM_BACKEND"):
        monkeypatch.delenv(var, raising=False)


def _fp32(h, w, b=None):
    return torch.ops.tinymem.lm_head_argmax(h.contiguous(), w.contiguous(), b, 0)


def _screened(h, w, b=None, pack=None):
    pack = pack or pack_head(w)
    assert pack is not None
    return torch.ops.tinymem.lm_head_argmax_screened(h, w, pack.packed, pack.wnorm, b)


def _assert_same(h, w, b=None, pack=None, validate=True):
    want = _fp32(h, w, b)
    got = lm_head_argmax(h, w, bias=b, pack=pack or pack_head(w), backend="cpp", validate=validate)
    assert torch.equal(got, want), (got, want)
    return got


def _stats(reset=False):
    calls, rows, cands, fallback = torch.ops.tinymem.head_screen_stats(reset)
    return {"calls": calls, "rows": rows, "cands": cands, "fallback": fallback}


# --- random problems ----------------------------------------------------------------------------


@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("vocab", VS)
def test_random_shapes_equal_fp32_kernel(d, vocab):
    g = torch.Generator().manual_seed(1000 * d + vocab)
    w = torch.randn(vocab, d, generator=g) / d ** 0.5
    pack = pack_head(w)
    for m in MS:
        h = torch.randn(m, d, generator=g)
        biases = [None, torch.randn(vocab, generator=g) * 0.5]
        sup = torch.randn(vocab, generator=g)
        sup[torch.rand(vocab, generator=g) < 0.3] = float("-inf")  # suppressed ids
        biases.append(sup)
        for b in biases:
            _assert_same(h, w, b, pack)


@pytest.mark.parametrize("d,vocab", [(1, 5), (17, 1000), (64, 17), (128, 1000)])
def test_small_integer_data_many_exact_ties(d, vocab):
    """Integer-valued h and W: bf16 and float32 are both exact, so many logits tie exactly; every tied id
    is a candidate and the lowest one must win."""
    g = torch.Generator().manual_seed(d + vocab)
    w = torch.randint(-2, 3, (vocab, d), generator=g).float()
    h = torch.randint(-2, 3, (64, d), generator=g).float()
    b = torch.randint(-1, 2, (vocab,), generator=g).float()
    for bias in (None, b):
        _assert_same(h, w, bias)


def test_full_pythia_head():
    g = torch.Generator().manual_seed(7)
    vocab, d = 50304, 512
    w = torch.randn(vocab, d, generator=g) * 0.02
    b = torch.randn(vocab, generator=g) * 0.01
    b[50277:] = float("-inf")  # padding ids of the embedding matrix, never generated
    pack = pack_head(w)
    for m in (1, 64):
        h = torch.randn(m, d, generator=g)
        _assert_same(h, w, None, pack)
        got = _assert_same(h, w, b, pack)
        assert int(got.max()) < 50277


# --- ties, near-ties, bias ------------------------------------------------------------------------


def test_duplicated_rows_lowest_index_wins():
    g = torch.Generator().manual_seed(3)
    vocab, d = 1000, 64
    w = torch.randn(vocab, d, generator=g) / 8
    for dup in (7, 500, 999):
        w[dup] = w[3]
    h = torch.stack([w[3] * 40, w[3] * 40 + 0.01 * torch.randn(d, generator=g), torch.randn(d, generator=g)])
    got = _assert_same(h, w)
    assert got[0] == 3 and got[1] == 3
    b = torch.zeros(vocab)
    b[3] = -1.0  # now the duplicate at 7 is the best
    assert _assert_same(h, w, b)[0] == 7


def test_one_ulp_near_ties():
    g = torch.Generator().manual_seed(4)
    vocab, d = 300, 128
    for trial in range(40):
        w = torch.randn(vocab, d, generator=g) / d ** 0.5
        i, j = torch.randperm(vocab, generator=g)[:2].tolist()
        k = int(torch.randint(0, d, (1,), generator=g))
        w[j] = w[i]
        direction = float("inf") if trial % 2 else float("-inf")
        w[j, k] = torch.nextafter(w[i, k], torch.tensor(direction))
        h = (w[i] * 30).repeat(5, 1)
        h[1:] += 1e-3 * torch.randn(4, d, generator=g)
        h[4, k] = -h[4, k]
        got = _assert_same(h, w)
        assert set(got[:1].tolist()) <= {i, j}


def test_all_ids_suppressed_and_bias_fallbacks():
    g = torch.Generator().manual_seed(5)
    vocab, d = 100, 32
    w = torch.randn(vocab, d, generator=g)
    h = torch.randn(6, d, generator=g)
    pack = pack_head(w)
    every = torch.full((vocab,), float("-inf"))  # every logit -inf: the float32 kernel decides
    _assert_same(h, w, every, pack)
    one = every.clone()
    one[42] = 0.0
    assert (_assert_same(h, w, one, pack) == 42).all()
    for special in (float("nan"), float("inf"), 3e38):
        b = torch.randn(vocab, generator=g)
        b[17] = special
        _assert_same(h, w, b, pack)


# --- magnitudes and non-finite values -------------------------------------------------------------


@pytest.mark.parametrize("h_scale,w_scale", [(1e15, 1e15), (1e19, 1.0), (1.0, 1e20), (1e-20, 1e-20),
                                             (1.0, 1e-39), (1e-39, 1.0), (1e-30, 1e-10)])
def test_large_and_tiny_magnitudes(h_scale, w_scale):
    g = torch.Generator().manual_seed(6)
    vocab, d = 1000, 64
    w = torch.randn(vocab, d, generator=g) * w_scale
    h = torch.randn(7, d, generator=g) * h_scale
    _assert_same(h, w)
    _assert_same(h, w, torch.randn(vocab, generator=g) * h_scale * w_scale)


def test_non_finite_hidden_rows_match_fp32_kernel():
    g = torch.Generator().manual_seed(8)
    vocab, d = 1000, 64
    w = torch.randn(vocab, d, generator=g)
    h = torch.randn(6, d, generator=g)
    h[1, 5] = float("nan")
    h[2, 0] = float("inf")
    h[3] = float("-inf")
    h[4, 63] = 3e38  # finite, but its norm is beyond what the screen handles
    with pytest.raises(ValueError, match="hidden contains NaN or inf"):  # the API's check, by default
        lm_head_argmax(h, w, pack=pack_head(w))
    # with the check skipped, the kernels still agree on every row (the screen falls back on these)
    _stats(reset=True)
    _assert_same(h, w, validate=False)
    st = _stats()
    assert st["fallback"] == 4 and st["rows"] == 2


def test_non_finite_weight_falls_back():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(50, 16, generator=g)
    w[10, 3] = float("nan")
    w[20, 0] = float("inf")
    h = torch.randn(3, 16, generator=g)
    with pytest.raises(ValueError, match="weight contains NaN or inf"):
        lm_head_argmax(h, w, pack=pack_head(w))
    _assert_same(h, w, validate=False)


# --- API: packs, fallbacks, errors -----------------------------------------------------------------


def test_stale_pack_raises():
    g = torch.Generator().manual_seed(10)
    w = torch.randn(40, 16, generator=g)
    h = torch.randn(2, 16, generator=g)
    pack = pack_head(w)
    assert isinstance(pack, HeadPack)
    lm_head_argmax(h, w, pack=pack)
    with pytest.raises(ValueError, match="another weight"):
        lm_head_argmax(h, w.clone(), pack=pack)
    with pytest.raises(ValueError, match="another weight"):
        lm_head_argmax(h, w[:30], pack=pack)
    w.mul_(2.0)
    with pytest.raises(ValueError, match="modified in place"):
        lm_head_argmax(h, w, pack=pack)
    with pytest.raises(ValueError, match="modified in place"):  # checked whatever the backend
        lm_head_argmax(h, w, pack=pack, backend="torch")
    with pytest.raises(TypeError, match="HeadPack"):
        lm_head_argmax(h, w, pack=(pack.packed, pack.wnorm))
    _assert_same(h, w, pack=pack_head(w))


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(11)
    wt = torch.randn(24, 300, generator=g)
    w = wt.t()  # [300, 24], not contiguous
    h = torch.randn(10, 48, generator=g)[:, ::2]
    pack = pack_head(w)
    assert pack is not None
    assert torch.equal(lm_head_argmax(h, w, pack=pack), _fp32(h, w))
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.tinymem.lm_head_argmax_screened(h, w.contiguous(), pack.packed, pack.wnorm, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.tinymem.lm_head_argmax_screened(h.contiguous(), w, pack.packed, pack.wnorm, None)


def test_op_rejects_mismatched_inputs():
    g = torch.Generator().manual_seed(12)
    w = torch.randn(40, 16, generator=g)
    h = torch.randn(3, 16, generator=g)
    pack = pack_head(w)
    other = pack_head(torch.randn(60, 16, generator=g))
    op = torch.ops.tinymem.lm_head_argmax_screened
    with pytest.raises(RuntimeError, match="packed must be"):
        op(h, w, other.packed, pack.wnorm, None)
    with pytest.raises(RuntimeError, match="wnorm must be"):
        op(h, w, pack.packed, other.wnorm, None)
    with pytest.raises(RuntimeError, match="float32"):
        op(h.bfloat16(), w, pack.packed, pack.wnorm, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        op(h, w, pack.packed, pack.wnorm, torch.zeros(39))
    assert op(h[:0], w, pack.packed, pack.wnorm, None).shape == (0,)


def test_pack_head_returns_none_where_it_cannot_help(monkeypatch):
    w = torch.randn(40, 16)
    assert pack_head(w.half()) is None
    assert pack_head(w.double()) is None
    with torch.inference_mode():
        assert pack_head(torch.randn(40, 16)) is None
    monkeypatch.setenv("TINYMEM_HEAD_SCREEN", "0")
    assert pack_head(w) is None
    assert lm_head_argmax(torch.randn(2, 16), w, pack=None).shape == (2,)


def test_pack_layout_and_norms():
    g = torch.Generator().manual_seed(13)
    w = torch.randn(21, 5, generator=g)
    pack = pack_head(w)
    assert pack.packed.dtype == torch.bfloat16 and tuple(pack.packed.shape) == (2, 3, 32)
    # panel p, k-pair q, lane l holds (W[16p + l, 2q], W[16p + l, 2q + 1]); padding is zero
    panels = pack.packed.view(2, 3, 16, 2).permute(0, 2, 1, 3).reshape(32, 6)
    want = torch.zeros(32, 6, dtype=torch.bfloat16)
    want[:21, :5] = w.bfloat16()
    assert torch.equal(panels, want)
    exact = w.double().norm(dim=1)
    assert (pack.wnorm.double() >= exact).all()
    assert (pack.wnorm.double() <= exact * (1 + 1e-6)).all()


def test_other_cpu_isa_settings_match(monkeypatch):
    """TINYMEM_CPU_ISA=generic makes the float32 kernel multiply and add separately; the exact stage
    follows it."""
    g = torch.Generator().manual_seed(14)
    w = torch.randn(2000, 96, generator=g) / 10
    h = torch.randn(20, 96, generator=g)
    pack = pack_head(w)
    for isa in ("generic", "avx2", "avx512"):
        monkeypatch.setenv("TINYMEM_CPU_ISA", isa)
        _assert_same(h, w, None, pack)
        _assert_same(h, w, torch.randn(2000, generator=g), pack)


@pytest.mark.parametrize("m", [100, 600])
def test_thread_count_does_not_change_results(m):
    """One thread, or more than the cores; 600 rows are several token blocks (and no vocab split on one
    thread), 100 rows one block whose vocabulary is split between threads."""
    g = torch.Generator().manual_seed(15)
    w = torch.randn(5000, 64, generator=g) / 8
    h = torch.randn(m, 64, generator=g)
    b = torch.randn(5000, generator=g)
    pack = pack_head(w)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append(_screened(h, w, b, pack))
    finally:
        torch.set_num_threads(before)
    want = _fp32(h, w, b)
    for got in results:
        assert torch.equal(got, want)


def test_screened_op_has_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    pack_head(torch.randn(10, 8))  # loads the extension and registers the fakes
    with FakeTensorMode():
        fw = torch.empty(40, 7)
        packed, wnorm = torch.ops.tinymem.pack_head_bf16(fw)
        arg = torch.ops.tinymem.lm_head_argmax_screened(torch.empty(5, 7), fw, packed, wnorm, None)
    assert tuple(packed.shape) == (3, 4, 32) and packed.dtype == torch.bfloat16 and wnorm.shape == (40,)
    assert arg.shape == (5,) and arg.dtype == torch.int64


def test_few_candidates_on_random_data():
    """The screen is worth it only if few logits need the exact float32 recomputation."""
    g = torch.Generator().manual_seed(16)
    vocab, d = 50304, 512
    w = torch.randn(vocab, d, generator=g) * 0.02
    h = torch.randn(64, d, generator=g)
    pack = pack_head(w)
    _stats(reset=True)
    _screened(h, w, None, pack)
    st = _stats(reset=True)
    assert st["calls"] == 1 and st["rows"] == 64 and st["fallback"] == 0
    mean = st["cands"] / st["rows"]
    print(f"mean exact candidates per row: {mean:.2f}")
    assert 1.0 <= mean < 8.0
