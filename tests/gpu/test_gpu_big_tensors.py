"""Tensors past 2^31 elements on a CUDA GPU, on the cuda and triton backends: the masked-subnet ops with a
score tensor of 2,151,842,587 entries, and memscore / lm_head_argmax with M x d = 2,151,677,952 hidden
values (M = 2^20 + 1027 rows of d = 2048, so the last 1027 rows start past element 2^31).

A 32-bit index anywhere (a flat offset, a row times d, a rank, a cut) would read or write the wrong
element there. The torch references are computed chunk by chunk (2^26 entries at a time), so no test
holds more than about 19 GB: the threshold from per-chunk key counts and tie scans, the elementwise ops
from the same inputs regenerated or sliced per chunk, memscore from logits built 2^16 rows at a time.
Every index is compared, and a difference is reported by its flat index and its side of 2^31.

These tests take several GB each: they carry the ``big`` marker and run one at a time (a file lock, and
the ``big`` xdist group that bench/gpu_check.sh schedules with ``--dist loadgroup``); each gives its
memory back to the device when it ends.
"""

import gc
import os
import tempfile
import time

import pytest
import torch
from conftest import backend_or_skip
from memscore_checks import naive_logits, nll_tol, tie_tol

from tinymem_fast.ops import masked_subnet as ms
from tinymem_fast.ops.memscore import lm_head_argmax, memscore

pytestmark = [pytest.mark.cuda, pytest.mark.big, pytest.mark.xdist_group("big")]

DEVICE = "cuda"
BOUNDARY = 1 << 31             # the first flat index a signed 32-bit offset cannot hold
CHUNK = 1 << 26                # entries per chunk of the references (BOUNDARY is a multiple)
SHAPE = (32833, 65539)         # 2,151,842,587 scores: 4,358,939 past 2^31; odd sizes, ragged tails
BACKENDS = ["cuda", "triton"]
# memscore: M x D crosses 2^31 at row BOUNDARY // D = 2^20
M, D, VOCAB = (1 << 20) + 1027, 2048, 300
HEAD_ROWS = 1 << 16            # rows per chunk of the memscore reference


@pytest.fixture(autouse=True)
def one_big_test_at_a_time(request):
    """Big tests run one at a time on this machine, however the tests are distributed, and give their
    memory back to the device afterwards (a worker's caching allocator would keep it otherwise)."""
    import fcntl

    with open(os.path.join(tempfile.gettempdir(), "tinymem_gpu_big_tests.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            yield
            # into the junit report (bench/gpu_check.sh prints them): what each big test costs
            peak = torch.cuda.max_memory_allocated() / 2**30
            request.node.user_properties += [("peak_gib", round(peak, 2)),
                                             ("seconds", round(time.perf_counter() - start, 2))]
        finally:
            gc.collect()
            torch.cuda.empty_cache()
            fcntl.flock(lock, fcntl.LOCK_UN)


# --- data, made and re-made chunk by chunk ---------------------------------------------------------


def spans(n: int) -> list[tuple[int, int]]:
    return [(a, min(n, a + CHUNK)) for a in range(0, n, CHUNK)]


def _generator(seed: int, i: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed * 1_000_003 + i)


def normal_chunk(seed: int, i: int, length: int, dtype) -> torch.Tensor:
    """Chunk ``i`` of a tensor made by :func:`filled`; the same values every time it is asked for."""
    return torch.randn(length, generator=_generator(seed, i), device=DEVICE).to(dtype)


def quantised_chunk(seed: int, i: int, length: int, dtype) -> torch.Tensor:
    """Nine levels -4/8 .. 4/8: every |s| is a run of hundreds of millions of ties."""
    q = torch.randint(-4, 5, (length,), generator=_generator(seed, i), device=DEVICE, dtype=torch.int8)
    return q.to(dtype) / 8


def filled(shape, dtype, seed: int, make=normal_chunk) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=DEVICE)
    flat = t.view(-1)
    for i, (a, b) in enumerate(spans(flat.numel())):
        flat[a:b] = make(seed, i, b - a, dtype)
    return t


def _where(i: int) -> str:
    return f"flat index {i} ({'past' if i >= BOUNDARY else 'below'} 2^31)"


def assert_chunk_equal(got: torch.Tensor, want: torch.Tensor, start: int, what: str) -> None:
    """Equal values (+0 == -0) in one chunk that starts at flat index ``start``."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if not torch.equal(got, want):
        j = int((got != want).nonzero()[0])
        raise AssertionError(f"{what}: {int((got != want).sum())} entries of the chunk at {start} differ, "
                             f"first at {_where(start + j)}: got {got[j].item()!r}, want {want[j].item()!r}")


# --- the threshold reference: key counts and tie scans ---------------------------------------------


def _keys(x: torch.Tensor) -> torch.Tensor:
    """Bits of |x| as float32: for non-negative floats the int32 order is the float order."""
    return x.float().abs().view(torch.int32)


def key_counts(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every distinct key of ``s`` (ascending, int32) and how many entries have it (int64)."""
    flat = s.view(-1)
    keys, counts = [], []
    for a, b in spans(flat.numel()):
        k, c = torch.unique(_keys(flat[a:b]), return_counts=True)
        keys.append(k)
        counts.append(c)
    uk, inv = torch.unique(torch.cat(keys), return_inverse=True)
    total = torch.zeros(uk.numel(), dtype=torch.int64, device=uk.device).index_add_(0, inv, torch.cat(counts))
    return uk, total


def ties_before(s: torch.Tensor, key: int, end: int) -> int:
    """Entries with ``key`` at flat indices below ``end`` (a multiple of CHUNK)."""
    flat = s.view(-1)
    return sum(int((_keys(flat[a:b]) == key).sum()) for a, b in spans(flat.numel()) if b <= end)


def nth_tie(s: torch.Tensor, key: int, need: int) -> int:
    """Flat index of the ``need``-th (1-based, in index order) entry with ``key``."""
    flat = s.view(-1)
    seen = 0
    for a, b in spans(flat.numel()):
        tie = _keys(flat[a:b]) == key
        c = int(tie.sum())
        if seen + c >= need:
            return a + int(tie.nonzero()[need - seen - 1])
        seen += c
    raise AssertionError(f"only {seen} entries have key {key}, wanted the {need}-th")


def reference_threshold(s, k: int, uk, total) -> tuple[int, int]:
    """(key of the k-th smallest |s|, cut): the module docstring of masked_subnet, from counts."""
    cum = torch.cumsum(total, 0)
    i = int(torch.searchsorted(cum, torch.tensor([k], device=cum.device)))  # first level reaching rank k
    key = int(uk[i])
    need = k - int(cum[i] - total[i])
    return key, nth_tie(s, key, need) + 1


# --- masked-subnet ops -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["randn_bf16", "quantised_fp32"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_and_masked_weight_past_2_31(backend, kind):
    """Threshold at ranks and cuts on both sides of 2^31 (k = n - 1; k whose cut is the first tie past
    2^31; k = n // 2 through the public ratio API), then the masked weight of every entry."""
    backend_or_skip(backend, DEVICE)
    dtype, make = (torch.bfloat16, normal_chunk) if kind == "randn_bf16" else (torch.float32, quantised_chunk)
    s = filled(SHAPE, dtype, seed=1, make=make)
    n = s.numel()
    assert n > BOUNDARY and BOUNDARY % CHUNK == 0
    uk, total = key_counts(s)
    assert int(total.sum()) == n
    cum = torch.cumsum(total, 0)
    mid = int(torch.searchsorted(cum, torch.tensor([n // 2], device=cum.device)))
    mid_key = int(uk[mid])
    before = ties_before(s, mid_key, BOUNDARY)
    assert before < int(total[mid]), "the middle level has no entry past 2^31: pick another seed"
    # the cut lands on the first tie of the middle level at or past 2^31
    k_boundary = int(cum[mid] - total[mid]) + before + 1
    found = {}
    for k in sorted({n // 2, k_boundary, n - 1}):
        want = reference_threshold(s, k, uk, total)
        if k == n // 2:
            thr = ms.subnet_threshold(s, 0.5, backend=backend)
            assert thr.k == k
        else:
            thr = ms._threshold(s, k, backend)
        assert thr.value.dtype == torch.float32 and thr.cut.dtype == torch.int64
        got = (int(thr.value.view(torch.int32)), int(thr.cut))
        assert got == want, f"k={k}: (value bits, cut) = {got}, want {want}"
        found[k] = thr
    assert found[k_boundary].cut.item() > BOUNDARY  # the construction put the cut past 2^31

    thr = found[k_boundary]
    w = filled(SHAPE, torch.bfloat16, seed=2)
    out = ms.masked_weight(w, s, thr, backend=backend)
    assert out.dtype == w.dtype and out.shape == w.shape
    dropped = 0
    for a, b in spans(n):
        keep = ms.keep_mask_torch(s.view(-1)[a:b], thr.value, thr.cut - a)  # the cut in chunk coordinates
        dropped += int((~keep).sum())
        assert_chunk_equal(out.view(-1)[a:b], w.view(-1)[a:b] * keep.to(w.dtype), a, "masked weight")
    assert dropped == k_boundary


@pytest.mark.parametrize("backend", BACKENDS)
def test_ste_grad_past_2_31(backend):
    backend_or_skip(backend, DEVICE)
    grad = filled(SHAPE, torch.float16, seed=3)
    weight = filled(SHAPE, torch.bfloat16, seed=4)
    scores = filled(SHAPE, torch.bfloat16, seed=5)
    out = ms.ste_score_grad(grad, weight, scores, backend=backend)
    assert out.dtype == scores.dtype and out.shape == scores.shape
    for a, b in spans(out.numel()):
        want = ms.ste_grad_torch(grad.view(-1)[a:b], weight.view(-1)[a:b], scores.view(-1)[a:b])
        assert_chunk_equal(out.view(-1)[a:b], want, a, "straight-through grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_step_past_2_31(backend):
    """One fused step in place; the inputs before it are re-made chunk by chunk for the reference."""
    backend_or_skip(backend, DEVICE)
    scores = filled(SHAPE, torch.bfloat16, seed=6)
    grad = filled(SHAPE, torch.bfloat16, seed=7)
    buf = filled(SHAPE, torch.float32, seed=8)  # a nonzero momentum buffer: read, not only written
    hp = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, maximize=True)
    ms.subnet_sgd_step_(scores, grad, buf, backend=backend, **hp)
    for i, (a, b) in enumerate(spans(scores.numel())):
        s0 = normal_chunk(6, i, b - a, torch.bfloat16)
        b0 = normal_chunk(8, i, b - a, torch.float32)
        ms.sgd_step_torch(s0, grad.view(-1)[a:b], b0, hp["lr"], hp["momentum"], hp["weight_decay"],
                          hp["maximize"])

        def where(m, a=a):
            return f"chunk at {a} ({'past' if a >= BOUNDARY else 'below'} 2^31): {m}"

        # the tolerances of tests/ops/test_masked_subnet.py (op-by-op rounding: at most an ulp)
        torch.testing.assert_close(buf.view(-1)[a:b], b0, rtol=4 * torch.finfo(torch.float32).eps, atol=1e-7,
                                   msg=where)
        torch.testing.assert_close(scores.view(-1)[a:b].float(), s0.float(), rtol=2.0 ** -7, atol=1e-6,
                                   msg=where)


# --- memscore and lm_head_argmax ----------------------------------------------------------------------


def _assert_argmax_near(arg, ref_arg, logits, dtype, what, max_frac=0.01):
    """Equal ids except at near-ties of the reference's rounded logits (memscore_checks' rule, kept on the
    device: the logits are [M, V])."""
    diff = (arg != ref_arg).nonzero().squeeze(1)
    if diff.numel():
        rows = logits[diff]
        got = rows.gather(1, arg[diff, None]).squeeze(1)
        want = rows.gather(1, ref_arg[diff, None]).squeeze(1)
        far = (got - want).abs() > tie_tol(want, dtype)
        if bool(far.any()):
            r = int(diff[far.nonzero()[0]])
            raise AssertionError(f"{what}: id {int(arg[r])} instead of {int(ref_arg[r])} at row {r} "
                                 f"({_where(r * D)}), beyond a near-tie")
    assert diff.numel() <= max(1, max_frac * arg.numel()), f"{what}: {diff.numel()} of {arg.numel()} differ"


@pytest.mark.parametrize("backend", BACKENDS)
def test_memscore_and_argmax_past_2_31(backend):
    backend_or_skip(backend, DEVICE)
    dtype = torch.bfloat16
    row_boundary = BOUNDARY // D
    assert M * D > BOUNDARY and BOUNDARY % D == 0 and M > row_boundary + 2
    h = filled((M, D), dtype, seed=9)
    g = torch.Generator(device=DEVICE).manual_seed(10)
    w = (torch.randn(VOCAB, D, generator=g, device=DEVICE) * (3.0 / D ** 0.5)).to(dtype)
    b = torch.randn(VOCAB, generator=g, device=DEVICE).to(dtype)
    # probe rows on both sides of element 2^31: a hidden state along one head row makes that id win by
    # far more than any rounding (its logit about 18, the others about 0 +- 3)
    probes = {0: 7, row_boundary - 1: VOCAB - 1, row_boundary: 150, row_boundary + 1: 1, M - 1: 64}
    for r, j in probes.items():
        h[r] = 2 * w[j]

    logits = torch.empty(M, VOCAB, device=DEVICE)  # the rounded logits the ops define, 2^16 rows at a time
    for r0 in range(0, M, HEAD_ROWS):
        logits[r0: r0 + HEAD_ROWS] = naive_logits(h[r0: r0 + HEAD_ROWS], w, b)
    ref_arg = logits.argmax(-1)
    hit = torch.rand(M, generator=g, device=DEVICE) < 0.5
    y = torch.where(hit, ref_arg, torch.randint(0, VOCAB, (M,), generator=g, device=DEVICE))
    ref_nll = torch.logsumexp(logits, -1) - logits.gather(1, y[:, None]).squeeze(1)
    for r, j in probes.items():
        assert int(ref_arg[r]) == j

    arg = lm_head_argmax(h, w, bias=b, backend=backend)
    assert arg.dtype == torch.int64 and arg.shape == (M,)
    _assert_argmax_near(arg, ref_arg, logits, dtype, "lm_head_argmax")
    s = memscore(h[None], w, y[None], bias=b, backend=backend)
    match, nll = s.match[0], s.nll[0]
    assert torch.equal(match, arg == y)  # one argmax, whichever op asks
    atol, rtol = nll_tol(dtype)
    for lo, hi in ((0, row_boundary), (row_boundary, M)):
        torch.testing.assert_close(nll[lo:hi], ref_nll[lo:hi], atol=atol, rtol=rtol,
                                   msg=lambda m, lo=lo: f"NLL, rows from {lo}: {m}")
    for r, j in probes.items():
        assert int(arg[r]) == j, f"probe row {r} ({_where(r * D)}): id {int(arg[r])}, want {j}"
        assert bool(match[r]) == (int(y[r]) == j), r
