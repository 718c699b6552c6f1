"""score_exact, extract and greedy_decode on a CUDA GPU against Hugging Face ``generate(do_sample=False)``
with its KV cache, on the same device, for tiny random-weight GPT-2, GPTNeoX and Llama models, on the cuda
and triton backends.

The fast paths run the Hugging Face body with our preallocated KV cache (a subclass of transformers'
``DynamicLayer``) and our fused head; the GPU image may have another transformers version than the CPU
tests saw, so this is checked where it runs. In float32 the tokens, exact bits and first mismatches must
be identical. In bfloat16 two correct paths may order two logits differently where they are within
rounding, so there the stock path's own logits decide what is compared: at a step where its top two
logits are within ``bf16_band`` ours may take any of the near-tied ids, and once the two decodings part
there, the rest of that row is not compared (the contexts differ). Before a row's first such step
everything must agree.

The models are random (seed 7) with the final norm's weight scaled by SHARPEN, so the logits spread over
several units and near-ties are the exception, as in a trained model. The probe rows: a third whose suffix
is the model's own greedy continuation (exact matches), a third with one suffix token changed at varied
offsets (first mismatch there), a third random.
"""

import functools

import pytest
import torch
from conftest import backend_or_skip
from memscore_checks import EPS, tie_tol
from scoring_models import K, P, V, tiny

from tinymem_fast.eval.scoring import extract, score_exact
from tinymem_fast.ops import greedy as greedy_mod
from tinymem_fast.ops.greedy import greedy_decode, make_kv_cache

pytestmark = pytest.mark.cuda

DEVICE = "cuda"
ARCHS = ["gpt2", "gpt_neox", "llama"]
DTYPES = [torch.float32, torch.bfloat16]
BACKENDS = ["cuda", "triton"]
N = 24                          # probe rows
SHARPEN = 40.0                  # logit spread of about 4.5 (random init: about 0.11)
FINAL_NORM = {"gpt2": "ln_f", "gpt_neox": "final_layer_norm", "llama": "norm"}


def dtype_id(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def random_model(arch: str, dtype):
    model = tiny(arch, seed=7)
    with torch.no_grad():
        getattr(model.base_model, FINAL_NORM[arch]).weight.mul_(SHARPEN)
        if arch == "gpt2":
            # an untied head: with the input embeddings as its head, a random GPT-2 repeats its last token
            model.config.tie_word_embeddings = False
            head = torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(8)) * 0.02
            model.lm_head.weight = torch.nn.Parameter(head)
    return model.to(device=DEVICE, dtype=dtype).eval()


@torch.no_grad()
def stock_decode(model, prefix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face greedy decoding of exactly ``k`` tokens (EOS stopping off) with its default KV cache:
    (tokens [B, k], the logits each step chose from [B, k, V] float32)."""
    out = model.generate(prefix, attention_mask=torch.ones_like(prefix), do_sample=False, max_new_tokens=k,
                         min_new_tokens=k, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
                         output_logits=True)
    return out.sequences[:, prefix.shape[1]:], torch.stack(out.logits, 1).float()


def bf16_band(top: torch.Tensor) -> torch.Tensor:
    """How close two bfloat16 logits may be and still be ordered differently by two correct paths: the
    scorer's own bfloat16 tie margin (a full-sequence pass against a KV-cache pass) plus two ulps."""
    return 0.25 + 2 * EPS[torch.bfloat16] * top.abs()


@functools.cache
def problem(arch: str, dtype):
    """(model, ids [N, P + K] on the CPU, stock tokens [N, K], stock logits [N, K, V], near-ties [N, K])
    -- near-ties: steps where the stock path's top two logits are within ``bf16_band`` (none in
    float32, where everything must be identical)."""
    model = random_model(arch, dtype)
    g = torch.Generator().manual_seed(11)
    prefix = torch.randint(0, V, (N, P), generator=g)
    tokens, logits = stock_decode(model, prefix.to(DEVICE), K)
    tokens, logits = tokens.cpu(), logits.cpu()
    assert sum(len(set(row)) for row in tokens.tolist()) >= 4 * N  # continuations, not one repeated id
    suffix = tokens.clone()
    third = N // 3
    for r in range(third, 2 * third):  # one token changed: the first mismatch is there
        j = (3 * r) % K
        suffix[r, j] = (suffix[r, j] + 1) % V
    suffix[2 * third:] = torch.randint(0, V, (N - 2 * third, K), generator=g)
    top2 = logits.topk(2, dim=-1).values
    if dtype == torch.float32:
        near = torch.zeros(N, K, dtype=torch.bool)
    else:
        near = (top2[..., 0] - top2[..., 1]) < bf16_band(top2[..., 0])
    return model, torch.cat([prefix, suffix], 1), tokens, logits, near


def stock_first_mismatch(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    miss = tokens != ids[:, P: P + K]
    return torch.where(miss.any(1), miss.float().argmax(1).long(), torch.full((ids.shape[0],), K))


def assert_bits_agree(exact, first, stock_first, near, what) -> int:
    """exact / first_mismatch [N] against the stock decoding's. A row must agree exactly unless the stock
    path has a near-tie at a step up to its first mismatch; then ours must not miss before that step.
    -> the number of steps compared (the non-vacuity measure)."""
    exact, first = exact.cpu(), first.cpu()
    assert torch.equal(exact, first == K), what
    compared = 0
    for r in range(exact.shape[0]):
        f = int(stock_first[r])
        ties = near[r, : min(f, K - 1) + 1].nonzero()
        if ties.numel() == 0:
            assert int(first[r]) == f, f"{what}: row {r} first mismatch {int(first[r])}, generate {f}"
            compared += min(f, K - 1) + 1
        else:
            t0 = int(ties[0])
            assert int(first[r]) >= t0, (f"{what}: row {r} misses at {int(first[r])}, before the stock "
                                         f"path's first near-tie at {t0}")
            compared += t0
    return compared


def assert_tokens_agree(tokens, stock, logits, near, what) -> int:
    """Token for token equal to the stock decoding, but at a stock near-tie ours may take any near-tied
    id, after which the row is not compared. -> the number of tokens compared."""
    tokens = tokens.cpu()
    assert tokens.shape == stock.shape, what
    compared = 0
    for r in range(tokens.shape[0]):
        for t in range(K):
            compared += 1
            a, s = int(tokens[r, t]), int(stock[r, t])
            if a == s:
                continue
            lg = logits[r, t]
            assert bool(near[r, t]) and float(lg[s] - lg[a]) < float(bf16_band(lg[s])), (
                f"{what}: row {r} step {t}: id {a} (logit {float(lg[a]):.4f}), generate took {s} "
                f"(logit {float(lg[s]):.4f})")
            break
    return compared


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("arch", ARCHS)
def test_score_exact_equals_generate(arch, dtype, backend):
    backend_or_skip(backend, DEVICE)
    model, ids, stock, _, near = problem(arch, dtype)
    truth = stock_first_mismatch(stock, ids)
    assert int((truth == K).sum()) >= N // 3  # the rows made of the model's own continuation
    steps = 0
    runs = {}
    for name, kwargs in (("default", dict(batch_size=10)), ("nll", dict(batch_size=N, need_nll=True)),
                         ("staged", dict(batch_size=7, count_matched=False)),
                         ("margin", dict(batch_size=10, verify="margin"))):
        runs[name] = s = score_exact(model, ids, P, K, backend=backend, **kwargs)
        steps += assert_bits_agree(s.exact, s.first_mismatch, truth, near, f"score_exact {kwargs}")
    assert steps >= N * 4  # most steps were compared, not excused as near-ties

    # teacher-forced matched counts and NLL against the model's own logits over the same tokens (the same
    # batch and length as the scorer's pass, so the same hidden states): the counts may differ only at
    # positions whose top two logits tie within rounding
    with torch.no_grad():
        logits = model(ids[:, : P + K - 1].to(DEVICE)).logits[:, P - 1:].float().cpu()
    tgt = ids[:, P: P + K]
    hf_matched = (logits.argmax(-1) == tgt).sum(1)
    top2 = logits.topk(2, dim=-1).values
    slack = ((top2[..., 0] - top2[..., 1]) <= tie_tol(top2[..., 0], dtype)).sum(1)
    nll_run = runs["nll"]
    assert ((nll_run.matched - hf_matched).abs() <= slack).all(), (nll_run.matched, hf_matched, slack)
    if dtype == torch.float32:
        assert torch.equal(nll_run.matched, hf_matched)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1), reduction="none")
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=4 * EPS[dtype], atol=0.05)
    torch.testing.assert_close(nll_run.mean_nll, nll.view(-1, K).mean(1), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("arch", ARCHS)
def test_extract_and_greedy_decode_equal_generate(arch, dtype, backend):
    backend_or_skip(backend, DEVICE)
    model, ids, stock, logits, near = problem(arch, dtype)
    if greedy_mod._DynamicLayer is not None:  # transformers >= 4.54: our preallocated cache is what runs
        cache = make_kv_cache(model, P + K)
        assert all(type(layer) is greedy_mod._PreallocatedLayer for layer in cache.layers)
    truth = stock_first_mismatch(stock, ids)
    ref = ids[:, P: P + K]
    compared = 0

    # the whole batch at once, step by step: the same shapes as generate's
    plain = extract(model, ids, P, K, batch_size=N, prescreen=False, backend=backend)
    compared += assert_tokens_agree(plain.tokens, stock, logits, near, "extract(prescreen=False)")
    assert torch.equal(plain.matched, (plain.tokens == ref).sum(1))
    torch.testing.assert_close(plain.fractional, (plain.tokens == ref).float().mean(1))
    # batches of 10, memorized rows accepted as drafts, the others pooled
    fast = extract(model, ids, P, K, batch_size=10, backend=backend)
    compared += assert_tokens_agree(fast.tokens, stock, logits, near, "extract")
    assert_bits_agree(fast.exact, fast.first_mismatch, truth, near, "extract")
    # rows leave the batch at their first miss
    stop = extract(model, ids, P, K, batch_size=7, stop_on_mismatch=True, backend=backend)
    assert_bits_agree(stop.exact, stop.first_mismatch, truth, near, "extract(stop_on_mismatch=True)")
    assert torch.equal(stop.matched, stop.first_mismatch)
    # the op itself, on device tensors
    prefix = ids[:, :P].to(DEVICE)
    out = greedy_decode(model, prefix, K, backend=backend)
    assert out.tokens.device.type == DEVICE and out.steps == K and out.matched is None
    compared += assert_tokens_agree(out.tokens, stock, logits, near, "greedy_decode")
    drafted = greedy_decode(model, prefix, K, reference=ref.to(DEVICE), draft=True, backend=backend)
    compared += assert_tokens_agree(drafted.tokens, stock, logits, near, "greedy_decode(draft=True)")
    assert compared >= 4 * N * K // 2  # most tokens compared, not excused as near-ties
    if dtype == torch.float32:
        assert torch.equal(fast.exact, truth == K) and torch.equal(fast.first_mismatch, truth)
        assert bool(fast.exact[: N // 3].all())
        assert not bool(fast.decoded[: N // 3].all())  # some memorized rows took the draft path
        assert bool(drafted.accepted[: N // 3].any())
