"""memscore / lm_head_argmax edge cases at GPU sizes, through the public API on the cuda and triton backends.

tests/ops/test_memscore.py already runs its suppressed-ids and non-finite-input tests on both GPU backends
(their ``cases`` include cuda and triton), in float32, with a 49-id vocabulary and chunk_size=16. That
chunk size is a hint the cuda kernel ignores (its tiles are 64 ids wide), so there no cuda tile and no
vocabulary slice was ever entirely suppressed. Here the vocabulary spans many tiles of both kernels (64
and 128 ids) with the kernels' own tiling, whole tiles and whole vocabulary slices (one row: one slice per
tile; 4099 rows: a few wide slices) are suppressed with a -inf bias, in float32, float16 and bfloat16;
and NaN / inf inputs raise in half precision too, while a float16 tensor whose sum merely overflows does
not.
"""

import pytest
import torch
from backend_cases import case_id
from conftest import backend_or_skip
from memscore_checks import assert_nll_close, naive_logits, naive_scores, tie_tol

from tinymem_fast.ops.memscore import lm_head_argmax, memscore, memscore_examples

pytestmark = pytest.mark.cuda

BACKENDS = ["cuda", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
VOCAB, D = 3 * 1024 + 1, 64   # 49 cuda tiles, 25 Triton tiles, the last one a single id
PATTERNS = ["last_id", "first_1024", "one_tile_left", "every_other_128"]


def allowed_ids(pattern: str) -> torch.Tensor:
    allowed = torch.ones(VOCAB, dtype=torch.bool)
    if pattern == "last_id":  # the last tile holds one id, and it is suppressed
        allowed[-1] = False
    elif pattern == "first_1024":  # 16 cuda tiles, 8 Triton tiles, the first slices entirely
        allowed[:1024] = False
    elif pattern == "one_tile_left":  # only ids 1280..1407 (a tile of both kernels) can win
        allowed[:] = False
        allowed[1280:1408] = True
    else:
        for v0 in range(128, VOCAB, 256):
            allowed[v0: v0 + 128] = False
    return allowed


def _assert_near_ties_only(arg, ref_arg, match, ref_match, logits, y, dtype, what):
    """memscore_checks' near-tie rules, kept on the device: ids may differ only where their logits are
    within rounding of each other, match bits only where the target's logit is within rounding of the top."""
    diff = (arg != ref_arg).nonzero().squeeze(1)
    if diff.numel():
        got = logits[diff].gather(1, arg[diff, None]).squeeze(1)
        want = logits[diff].gather(1, ref_arg[diff, None]).squeeze(1)
        assert ((got - want).abs() <= tie_tol(want, dtype)).all(), f"{what}: argmax differs beyond a near-tie"
    diff_m = (match != ref_match).nonzero().squeeze(1)
    if diff_m.numel():
        top = logits[diff_m].max(-1).values
        tgt = logits[diff_m].gather(1, y[diff_m, None]).squeeze(1)
        assert ((top - tgt).abs() <= tie_tol(top, dtype)).all(), f"{what}: match differs beyond a near-tie"
    most = max(1, 0.02 * arg.numel())
    assert diff.numel() <= most and diff_m.numel() <= most, (what, diff.numel(), diff_m.numel())


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_suppressed_vocabulary_tiles(backend, dtype, pattern):
    backend_or_skip(backend, "cuda")
    allowed = allowed_ids(pattern).cuda()
    ids = allowed.nonzero().squeeze(1)
    for rows in (1, 5, 4099):
        g = torch.Generator(device="cuda").manual_seed(rows)
        h = torch.randn(rows, D, generator=g, device="cuda").to(dtype)
        w = (torch.randn(VOCAB, D, generator=g, device="cuda") * (3.0 / D ** 0.5)).to(dtype)
        b = torch.randn(VOCAB, generator=g, device="cuda").to(dtype).masked_fill(~allowed, float("-inf"))
        logits = naive_logits(h, w, b)
        hit = torch.rand(rows, generator=g, device="cuda") < 0.5
        other = ids[torch.randint(0, ids.numel(), (rows,), generator=g, device="cuda")]
        y = torch.where(hit, logits.argmax(-1), other)  # never a suppressed id
        ref_arg, ref_match, ref_nll = naive_scores(h, w, b, y)
        what = f"{rows} rows"

        s = memscore(h[None], w, y[None], bias=b, backend=backend)
        match, nll = s.match[0], s.nll[0]
        assert torch.isfinite(nll).all(), (what, nll[~torch.isfinite(nll)])
        assert_nll_close(nll, ref_nll, dtype)
        arg = lm_head_argmax(h, w, bias=b, backend=backend)
        assert bool(allowed[arg].all()), f"{what}: a suppressed id won"
        _assert_near_ties_only(arg, ref_arg, match, ref_match, logits, y, dtype, what)
        assert torch.equal(match, arg == y)
        pruned = memscore_examples(h[None], w, y[None], bias=b, need_nll=False, early_exit=True,
                                   backend=backend)
        assert int(pruned.matched[0]) == int(match.sum()), what


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=case_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_half_inputs_raise(backend, dtype):
    backend_or_skip(backend, "cuda")
    g = torch.Generator(device="cuda").manual_seed(5)
    h = torch.randn(2, 3, D, generator=g, device="cuda").to(dtype)
    w = (torch.randn(300, D, generator=g, device="cuda") / 8).to(dtype)
    y = torch.randint(0, 300, (2, 3), generator=g, device="cuda")
    for bad, name, pos in ((float("nan"), "hidden", (1, 2, 5)), (float("inf"), "hidden", (0, 0, 0)),
                           (float("-inf"), "weight", (299, 63)), (float("nan"), "weight", (0, 1))):
        hh, ww = h.clone(), w.clone()
        (hh if name == "hidden" else ww)[pos] = bad
        where = ", ".join(map(str, pos))
        with pytest.raises(ValueError, match=rf"{name} contains NaN or inf .* at position \[{where}\]"):
            memscore(hh, ww, y, backend=backend)
        with pytest.raises(ValueError, match=f"{name} contains NaN or inf"):
            memscore_examples(hh, ww, y, need_nll=False, early_exit=True, backend=backend)
        with pytest.raises(ValueError, match=f"{name} contains NaN or inf"):
            lm_head_argmax(hh.view(-1, D), ww, backend=backend)
    # a -inf bias suppresses ids: accepted in half precision too
    bias = torch.zeros(300, dtype=dtype, device="cuda")
    bias[3] = float("-inf")
    s = memscore(h, w, torch.full_like(y, 3), bias=bias, backend=backend)
    assert not bool(s.match.any()) and bool(torch.isinf(s.nll).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_sum_overflow_is_not_a_non_finite_input(backend):
    """The finiteness check tests a sum (one sync); a float16 sum can overflow on finite entries, and the
    exact re-check on that path must then let the call through."""
    backend_or_skip(backend, "cuda")
    g = torch.Generator(device="cuda").manual_seed(6)
    h = torch.full((4, 8, D), 1024.0, dtype=torch.float16, device="cuda")  # sums to 2^21 > 65504
    w = (torch.randn(300, D, generator=g, device="cuda") * 1e-3).half()  # logits of a few units
    y = torch.randint(0, 300, (4, 8), generator=g, device="cuda")
    assert not bool(torch.isfinite(h.sum())) and bool(torch.isfinite(h).all())
    s = memscore(h, w, y, backend=backend)
    assert torch.isfinite(s.nll).all()
    assert_nll_close(s.nll, memscore(h, w, y, backend="torch").nll, torch.float16)
    # the same for the weight: every row 1000 except id 7's, 1100, so id 7 wins (by a tenth of the logit)
    # where the row's sum is positive and id 0 (the lowest of the equal others) where it is negative
    h2 = (torch.randn(40, D, generator=g, device="cuda") * 0.05).half()
    w2 = torch.full((300, D), 1000.0, dtype=torch.float16, device="cuda")
    w2[7] = 1100.0
    assert not bool(torch.isfinite(w2.sum()))
    arg = lm_head_argmax(h2, w2, backend=backend)
    row_sum = h2.float().sum(-1)
    decided = row_sum.abs() > 1e-3  # the sign of the sum does not hang on accumulation order
    assert bool(decided.any())
    assert torch.equal(arg[decided], torch.where(row_sum > 0, 7, 0)[decided])
