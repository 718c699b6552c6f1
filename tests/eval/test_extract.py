"""extract / ops.greedy: batched greedy decoding with a preallocated KV cache equals Hugging Face
generate token for token (fp32, GPT-2 / GPTNeoX / Llama, trained and random weights, any batch size);
early stop; the Pythia-style fractional score."""

import pytest
import torch
from scoring_models import ARCHS, K, P, V, generate, planted, probe_rows, tiny

from tinymem_fast.eval.scoring import ScoringInputError, extract, score_exact
from tinymem_fast.ops import greedy as greedy_mod
from tinymem_fast.ops.greedy import greedy_decode, make_kv_cache, split_causal_lm


@pytest.mark.parametrize("arch", ARCHS)
def test_tokens_equal_generate_trained(arch):
    model, _, _ = planted(arch)
    ids = probe_rows(arch)
    gen = generate(model, ids[:, :P], K)
    ref = ids[:, P: P + K]
    for bs in (3, 64):
        e = extract(model, ids, P, K, batch_size=bs)
        assert torch.equal(e.tokens, gen), bs
        assert torch.equal(e.matched, (gen == ref).sum(1))
        assert torch.equal(e.exact, (gen == ref).all(1))
        torch.testing.assert_close(e.fractional, (gen == ref).float().mean(1))
    assert bool(e.exact[:8].all())
    # one changed token: the memorized continuation goes on, so all but that position still match
    assert e.matched[8:16].tolist() == [K - 1] * 8 and float(e.fractional[8]) == (K - 1) / K


@pytest.mark.parametrize("arch", ARCHS)
def test_tokens_equal_generate_random_weights(arch):
    model = tiny(arch, seed=7)
    ids = torch.randint(0, V, (9, 26), generator=torch.Generator().manual_seed(1))
    e = extract(model, ids, 6, 20, batch_size=5)
    assert torch.equal(e.tokens, generate(model, ids[:, :6], 20))
    assert len(set(e.tokens.reshape(-1).tolist())) > 5  # a non-degenerate continuation


@pytest.mark.parametrize("arch", ARCHS)
def test_stop_on_mismatch(arch):
    model, _, _ = planted(arch)
    ids = probe_rows(arch)
    full = extract(model, ids, P, K, batch_size=6)
    stop = extract(model, ids, P, K, batch_size=6, stop_on_mismatch=True)
    assert torch.equal(stop.exact, full.exact) and torch.equal(stop.first_mismatch, full.first_mismatch)
    assert torch.equal(stop.matched, stop.first_mismatch) and stop.stopped
    for r in range(ids.shape[0]):
        f = int(full.first_mismatch[r])
        upto = min(K, f + 1)  # the wrong token itself is kept
        assert torch.equal(stop.tokens[r, :upto], full.tokens[r, :upto])
        assert bool((stop.tokens[r, upto:] == -1).all())
    # and the exact bits are those of the one-pass scorer
    assert torch.equal(score_exact(model, ids, P, K).exact, stop.exact)


def test_greedy_op_without_reference_and_row_dropping():
    model, _, _ = planted("llama")
    ids = probe_rows("llama")
    out = greedy_decode(model, ids[:, :P], K)
    assert out.matched is None and out.steps == K and torch.equal(out.tokens, generate(model, ids[:, :P], K))
    # all rows wrong at the first token: decoding stops after one step
    wrong = (generate(model, ids[:, :P], 1) + 1) % V
    ref = torch.cat([wrong, ids[:, P + 1: P + K]], 1)
    out = greedy_decode(model, ids[:, :P], K, reference=ref, stop_on_mismatch=True)
    assert out.steps == 1 and out.matched.tolist() == [0] * ids.shape[0]
    assert bool((out.tokens[:, 1:] == -1).all())


def test_cache_is_preallocated_and_shrinks():
    model, _, _ = planted("gpt2")
    cache = make_kv_cache(model, 20)
    layer = cache.layers[0]
    assert type(layer).__name__ == "_PreallocatedLayer"
    parts = split_causal_lm(model)
    body, kw = parts.body, parts.cache_kw  # "cache" on transformers 5, "past_key_values" before
    with torch.no_grad():
        body(input_ids=torch.zeros(4, 5, dtype=torch.long), use_cache=True, **{kw: cache})
    buf = layer.kbuf
    assert buf.shape[:3] == (4, 2, 20) and cache.get_seq_length() == 5
    with torch.no_grad():
        body(input_ids=torch.zeros(4, 1, dtype=torch.long), use_cache=True, **{kw: cache})
    assert layer.kbuf.data_ptr() == buf.data_ptr() and layer.keys.shape[2] == 6  # written in place
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert layer.keys.shape[:3] == (2, 2, 6) and layer.kbuf.shape[2] == 20


def test_sliding_window_model_uses_the_dynamic_cache():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1,
                                             intermediate_size=64, max_position_embeddings=40,
                                             sliding_window=6, bos_token_id=None, eos_token_id=None)).eval()
    cache = make_kv_cache(model, 30)
    assert type(cache).__name__ == "DynamicCache"
    ids = torch.randint(0, V, (5, 30), generator=torch.Generator().manual_seed(2))
    e = extract(model, ids, 8, 20, batch_size=3)
    assert torch.equal(e.tokens, generate(model, ids[:, :8], 20))


def test_unfused_head_path():
    model, _, _ = planted("gpt_neox")
    ids = probe_rows("gpt_neox")
    fused = extract(model, ids, P, K, batch_size=8)
    greedy_mod._FUSED_OK[model] = (id(model.get_output_embeddings()), False)
    try:
        plain = extract(model, ids, P, K, batch_size=8, stop_on_mismatch=True)
        plain_full = extract(model, ids, P, K, batch_size=8)
    finally:
        del greedy_mod._FUSED_OK[model]
    assert torch.equal(plain_full.tokens, fused.tokens) and torch.equal(plain.exact, fused.exact)


def test_suppressed_ids_like_min_new_tokens():
    model, _, _ = planted("gpt2")
    ids = probe_rows("gpt2")
    eos = int(ids[1, P + 4])
    j = int((ids[1, P: P + K] == eos).nonzero()[0])  # its first use in the suffix
    ref = model.generate(ids[:, :P], attention_mask=torch.ones_like(ids[:, :P]), do_sample=False,
                         max_new_tokens=K, min_new_tokens=K, eos_token_id=eos, pad_token_id=0)[:, P:]
    e = extract(model, ids, P, K, batch_size=8, suppress_ids=[eos])
    assert torch.equal(e.tokens, ref) and not bool(e.exact[1]) and int(e.first_mismatch[1]) == j


def test_bad_input():
    model, _, _ = planted("gpt2")
    ids = probe_rows("gpt2")
    with pytest.raises(ScoringInputError, match="longer than sequence"):
        extract(model, ids, P, 40)
    with pytest.raises(ScoringInputError, match="must be an int"):
        extract(model, ids, torch.tensor(P), K)
    with pytest.raises(ScoringInputError, match="batch_size"):
        extract(model, ids, P, K, batch_size=-1)
    with pytest.raises(ValueError, match="needs a reference"):
        greedy_decode(model, ids[:, :P], K, stop_on_mismatch=True)
    with pytest.raises(ValueError, match="reference must be"):
        greedy_decode(model, ids[:, :P], K, reference=ids[:, :3])


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_every_backend_decodes_like_generate(backend):
    from conftest import backend_or_skip

    backend_or_skip(backend)
    model, _, _ = planted("gpt2")
    ids = probe_rows("gpt2")[:10]
    e = extract(model, ids, P, K, batch_size=10, backend=backend)
    assert torch.equal(e.tokens, generate(model, ids[:, :P], K))


def test_prescreen_skips_only_confidently_memorized_rows():
    model, _, _ = planted("gpt_neox")
    ids = probe_rows("gpt_neox")
    fast = extract(model, ids, P, K, batch_size=8)
    assert fast.decoded.tolist() == [False] * 8 + [True] * 16  # the planted rows need no decoding
    slow = extract(model, ids, P, K, batch_size=8, prescreen=False)
    assert bool(slow.decoded.all())
    for f in ("tokens", "matched", "first_mismatch", "exact"):
        assert torch.equal(getattr(fast, f), getattr(slow, f)), f
    # a margin no gap reaches: every row is decoded
    assert bool(extract(model, ids[:4], P, K, tie_margin=float("inf")).decoded.all())


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_draft_acceptance_equals_plain_decoding_on_partially_memorized_rows(arch):
    """Rows that follow their reference for a while and then leave it (a planted row with one suffix token
    changed) must not be accepted as drafts, and every row's tokens equal plain step-by-step decoding."""
    model, _, _ = planted(arch)
    ids = probe_rows(arch).clone()
    ids[:4, P + K // 2] = (ids[:4, P + K // 2] + 1) % model.config.vocab_size  # break half-way
    fast = extract(model, ids, P, K, batch_size=5)
    slow = extract(model, ids, P, K, batch_size=5, prescreen=False)
    assert not bool(fast.decoded[4:8].any()) and bool(fast.decoded[:4].all())
    for f in ("tokens", "matched", "first_mismatch", "exact"):
        assert torch.equal(getattr(fast, f), getattr(slow, f)), f
    assert torch.equal(fast.tokens, generate(model, ids[:, :P], K))
    with pytest.raises(ValueError, match="draft needs a reference"):
        greedy_decode(model, ids[:, :P], K, draft=True)


def test_few_leftover_rows_are_pooled_and_decoded_like_the_rest():
    """With a batch mostly accepted as drafts, its few other rows are decoded later with other batches'
    leftovers; every row still gets exactly the tokens of plain decoding, in its own place."""
    model, _, _ = planted("gpt2")
    ids = probe_rows("gpt2")
    order = torch.tensor([0, 1, 2, 3, 4, 8, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17])
    x = ids[order]
    fast = extract(model, x, P, K, batch_size=6)
    slow = extract(model, x, P, K, batch_size=6, prescreen=False)
    for f in ("tokens", "matched", "first_mismatch", "exact"):
        assert torch.equal(getattr(fast, f), getattr(slow, f)), f
    assert fast.decoded.tolist() == [False] * 5 + [True] + [False] * 3 + [True] * 9
    assert torch.equal(fast.tokens, generate(model, x[:, :P], K))
