"""score_exact: one teacher-forced pass gives the exact-match bits and first mismatches greedy decoding
(Hugging Face generate) gives, on GPT-2, GPTNeoX and Llama, independent of batch size and padding."""

import pytest
import torch
from scoring_models import ARCHS, K, P, V, generate, planted, probe_rows, tiny

from tinymem_fast.eval import scoring
from tinymem_fast.eval.scoring import ScoringInputError, score_exact
from tinymem_fast.ops import greedy as greedy_mod


def truth(model, ids, p=P, k=K):
    """Exact bit and first mismatch by decoding with generate."""
    gen = generate(model, ids[:, :p], k)
    miss = gen != ids[:, p: p + k]
    first = torch.where(miss.any(1), miss.float().argmax(1).long(), torch.full((ids.shape[0],), k))
    return ~miss.any(1), first


@pytest.mark.parametrize("arch", ARCHS)
def test_equals_generate_any_batch_size(arch):
    model, secret, _ = planted(arch)
    ids = probe_rows(arch)
    exact, first = truth(model, ids)
    assert int(exact.sum()) == 8 and not bool(exact[8:16].any())  # the planted rows, and only them
    ref = None
    for bs in (1, 5, 64):
        s = score_exact(model, ids, P, K, batch_size=bs, need_nll=True)
        assert torch.equal(s.exact, exact) and torch.equal(s.first_mismatch, first)
        if ref is None:
            ref = s
        else:  # batch composition changes no bit; the NLL only in float rounding (kernels may split the
            # vocabulary differently for few rows, which reorders the logsumexp)
            assert torch.equal(s.matched, ref.matched)
            torch.testing.assert_close(s.mean_nll, ref.mean_nll, rtol=1e-5, atol=1e-6)
    # teacher-forced matched count and NLL against the model's own logits
    with torch.no_grad():
        logits = model(ids[:, : P + K]).logits[:, P - 1: P + K - 1]
    tgt = ids[:, P: P + K]
    assert torch.equal(ref.matched, (logits.argmax(-1) == tgt).sum(1))
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1), reduction="none")
    torch.testing.assert_close(ref.mean_nll, nll.view(-1, K).mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.fractional, ref.matched.float() / K)
    assert ref.verified is None and ref.disagree.numel() == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_and_trailing_tokens_change_nothing(arch):
    model, _, _ = planted(arch)
    ids = probe_rows(arch)
    base = score_exact(model, ids[:, : P + K], P, K, batch_size=6, need_nll=True)
    gen = torch.Generator().manual_seed(5)
    longer = torch.cat([ids[:, : P + K], torch.randint(0, V, (ids.shape[0], 9), generator=gen)], 1)
    other = score_exact(model, longer, P, K, batch_size=4, need_nll=True)
    for f in ("exact", "first_mismatch", "matched"):
        assert torch.equal(getattr(base, f), getattr(other, f)), f
    torch.testing.assert_close(base.mean_nll, other.mean_nll, rtol=1e-5, atol=1e-6)


def test_per_row_windows_equal_uniform_runs():
    model, _, _ = planted("gpt2")
    ids = probe_rows("gpt2")
    n = ids.shape[0]
    p = torch.tensor([P, P + 2, P - 3] * (n // 3))
    k = torch.tensor([K, K - 4, 5] * (n // 3))
    mixed = score_exact(model, ids, p, k, batch_size=7, need_nll=True)
    for pp, kk in ((P, K), (P + 2, K - 4), (P - 3, 5)):
        rows = ((p == pp) & (k == kk)).nonzero().reshape(-1)
        one = score_exact(model, ids[rows], pp, kk, batch_size=64, need_nll=True)
        e, f = truth(model, ids[rows], pp, kk)
        assert torch.equal(one.exact, e) and torch.equal(one.first_mismatch, f)
        assert torch.equal(mixed.exact[rows], one.exact)
        assert torch.equal(mixed.first_mismatch[rows], one.first_mismatch)
        assert torch.equal(mixed.matched[rows], one.matched)
        torch.testing.assert_close(mixed.mean_nll[rows], one.mean_nll, rtol=1e-6, atol=1e-6)
    assert torch.equal(mixed.suffix_len, k)


def test_random_weights_first_token_fails():
    # a model that memorized nothing: every row misses, mostly at its first token, exactly as generate
    model = tiny("gpt_neox", seed=4)
    ids = torch.randint(0, V, (12, P + K), generator=torch.Generator().manual_seed(0))
    s = score_exact(model, ids, P, K, batch_size=5)
    e, f = truth(model, ids)
    assert torch.equal(s.exact, e) and torch.equal(s.first_mismatch, f) and not bool(e.any())


@pytest.mark.parametrize("arch", ARCHS)
def test_verify_full_and_margin(arch):
    model, _, _ = planted(arch)
    ids = probe_rows(arch)
    full = score_exact(model, ids, P, K, batch_size=8, verify="full")
    assert bool(full.verified.all()) and full.disagree.numel() == 0
    assert torch.equal(full.exact, truth(model, ids)[0])
    none = score_exact(model, ids, P, K, batch_size=8, verify="margin", tie_margin=0.0)
    assert not bool(none.verified.any())
    some = score_exact(model, ids, P, K, batch_size=8, verify=True, tie_margin=1.0)
    assert torch.equal(some.exact, full.exact) and some.disagree.numel() == 0


def test_exact_ties_are_verified_and_break_to_the_lowest_id():
    model = tiny("llama")
    model.load_state_dict(planted("llama")[0].state_dict())
    ids = probe_rows("llama")
    w = model.get_output_embeddings().weight
    with torch.no_grad():  # token 39 gets the head row of the first suffix token of row 0: an exact tie
        a = int(ids[0, P])
        w[V - 1] = w[a]
    assert a < V - 1
    s = score_exact(model, ids, P, K, batch_size=8, verify="margin")
    assert bool(s.verified[0]) and s.disagree.numel() == 0
    e, f = truth(model, ids)
    assert bool(s.exact[0]) and torch.equal(s.exact, e) and torch.equal(s.first_mismatch, f)


def test_disagreement_is_reported_and_decoded_result_wins(monkeypatch):
    model, _, _ = planted("gpt2")
    ids = probe_rows("gpt2")[:6]
    real = scoring.extract

    def flipped(*a, **kw):  # a decoder that disagrees on the second row it is given
        r = real(*a, **kw)
        r.exact[1] = ~r.exact[1]
        r.first_mismatch[1] = 3
        return r

    monkeypatch.setattr(scoring, "extract", flipped)
    s = score_exact(model, ids, P, K, verify="full")
    assert s.disagree.tolist() == [1] and not bool(s.exact[1]) and int(s.first_mismatch[1]) == 3


def test_suppressed_eos_like_the_reference():
    # the reference's min_length suppresses EOS; suppress_ids reproduces that in the teacher-forced pass
    model, secret, _ = planted("gpt_neox")
    ids = probe_rows("gpt_neox")
    eos = int(ids[0, P + 2])  # a token the first planted row needs
    j = int((ids[0, P: P + K] == eos).nonzero()[0])
    out = model.generate(ids[:, :P], attention_mask=torch.ones_like(ids[:, :P]), do_sample=False,
                         max_new_tokens=K, min_new_tokens=K, eos_token_id=eos, pad_token_id=0)[:, P:]
    miss = out != ids[:, P: P + K]
    s = score_exact(model, ids, P, K, suppress_ids=[eos])
    assert torch.equal(s.exact, ~miss.any(1)) and not bool(s.exact[0])
    assert int(s.first_mismatch[0]) == j


def test_unfused_head_path_gives_the_same_scores():
    # models that transform their logits after the head are scored from the model's own logits
    model, _, _ = planted("gpt2")
    ids = probe_rows("gpt2")
    fused = score_exact(model, ids, P, K, batch_size=8, need_nll=True)
    head = model.get_output_embeddings()
    greedy_mod._FUSED_OK[model] = (id(head), False)
    try:
        plain = score_exact(model, ids, P, K, batch_size=8, need_nll=True, verify="full")
    finally:
        del greedy_mod._FUSED_OK[model]
    assert torch.equal(plain.exact, fused.exact) and torch.equal(plain.first_mismatch, fused.first_mismatch)
    assert torch.equal(plain.matched, fused.matched) and plain.disagree.numel() == 0
    torch.testing.assert_close(plain.mean_nll, fused.mean_nll, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu(dtype):
    model = tiny("gpt2")
    model.load_state_dict(planted("gpt2")[0].state_dict())
    model = model.to(dtype)
    ids = probe_rows("gpt2")
    s = score_exact(model, ids, P, K, batch_size=8, verify="full")
    assert s.disagree.numel() == 0 and bool(s.exact[:8].all()) and not bool(s.exact[8:16].any())


def test_model_mode_is_restored():
    model, _, _ = planted("gpt2")
    model.train()
    try:
        score_exact(model, probe_rows("gpt2")[:2], P, K)
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()


@pytest.mark.parametrize("kwargs,msg", [
    (dict(prefix_len=P, suffix_len=30), "longer than sequence"),
    (dict(prefix_len=0, suffix_len=K), "prefix_len must be >= 1"),
    (dict(prefix_len=P, suffix_len=0), "suffix_len must be >= 1"),
    (dict(prefix_len=P, suffix_len=K, batch_size=0), "batch_size"),
    (dict(prefix_len=P, suffix_len=K, verify="sometimes"), "verify must be"),
])
def test_bad_arguments(kwargs, msg):
    model, _, _ = planted("gpt2")
    with pytest.raises(ScoringInputError, match=msg):
        score_exact(model, probe_rows("gpt2"), **kwargs)


def test_bad_ids():
    model, _, _ = planted("gpt2")
    ids = probe_rows("gpt2").clone()
    ids[3, P + 1] = V
    with pytest.raises(ScoringInputError, match=r"token id 40 in sequence 3 .*vocabulary \[0, 40\)"):
        score_exact(model, ids, P, K)
    ids[3, P + 1] = 0
    ids[3, P + K + 1] = V + 5  # beyond the window: never looked at
    score_exact(model, ids, P, K)
    with pytest.raises(ScoringInputError, match="empty input"):
        score_exact(model, torch.zeros(0, P + K, dtype=torch.long), P, K)
    with pytest.raises(ScoringInputError, match="integers"):
        score_exact(model, torch.zeros(2, P + K), P, K)
    long_model = tiny("gpt2", ctx=20)
    with pytest.raises(ScoringInputError, match="context of 20"):
        score_exact(long_model, ids, P, K)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_every_backend_gives_the_generate_bits(backend):
    from conftest import backend_or_skip

    backend_or_skip(backend)
    model, _, _ = planted("llama")
    ids = probe_rows("llama")
    exact, first = truth(model, ids)
    s = score_exact(model, ids, P, K, batch_size=24, backend=backend)
    assert torch.equal(s.exact, exact) and torch.equal(s.first_mismatch, first)
    ref = score_exact(model, ids, P, K, batch_size=24, backend="torch", need_nll=True)
    assert torch.equal(s.matched, ref.matched)
    nll = score_exact(model, ids, P, K, batch_size=24, backend=backend, need_nll=True)
    torch.testing.assert_close(nll.mean_nll, ref.mean_nll, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_body_hidden_states_give_the_models_logits(arch):
    from tinymem_fast.ops.greedy import final_hidden, split_causal_lm

    model, _, _ = planted(arch)
    parts = split_causal_lm(model)
    assert parts.fused
    ids = probe_rows(arch)[:5]
    with torch.no_grad():
        h = final_hidden(parts, ids)
        mine = torch.nn.functional.linear(h, parts.head_weight, parts.head_bias)
        assert torch.equal(mine, model(ids).logits)


def test_scaled_logits_model_takes_the_model_logits_path():
    from transformers import CohereConfig, CohereForCausalLM

    from tinymem_fast.ops.greedy import split_causal_lm

    torch.manual_seed(0)
    model = CohereForCausalLM(CohereConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                           max_position_embeddings=40, logit_scale=0.5, bos_token_id=None,
                                           eos_token_id=None, pad_token_id=None)).eval()
    assert not split_causal_lm(model).fused
    ids = torch.randint(0, V, (6, P + K), generator=torch.Generator().manual_seed(0))
    ids[:3, P:] = generate(model, ids[:3, :P], K)  # three rows it reproduces
    s = score_exact(model, ids, P, K, batch_size=4, need_nll=True, verify="full")
    e, f = truth(model, ids)
    assert torch.equal(s.exact, e) and torch.equal(s.first_mismatch, f) and s.exact[:3].all()
    with torch.no_grad():
        logits = model(ids[:, : P + K]).logits[:, P - 1: P + K - 1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, V), ids[:, P:].reshape(-1), reduction="none")
    torch.testing.assert_close(s.mean_nll, nll.view(-1, K).mean(1), rtol=1e-5, atol=1e-5)


def test_device_map_model(tmp_path):
    pytest.importorskip("accelerate")
    from tinymem_fast.integrations.loading import load_causal_lm

    model, _, _ = planted("gpt_neox")
    model.save_pretrained(tmp_path / "m")
    dm = load_causal_lm(str(tmp_path / "m"), "float32", device_map="auto")
    ids = probe_rows("gpt_neox")
    assert torch.equal(score_exact(dm, ids, P, K).exact, truth(model, ids)[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_only_staged_scoring_gives_the_same_bits(arch):
    """count_matched=False scores suffix positions in stages and stops at each row's first miss: the exact
    bits and first mismatches are those of generate, and matched counts the tokens before the miss."""
    model, _, _ = planted(arch)
    ids = probe_rows(arch).clone()
    ids[:3, P + K - 1] = (ids[:3, P + K - 1] + 1) % V  # planted rows that miss only at the last token
    ids[3:5, P + 5] = (ids[3:5, P + 5] + 1) % V       # ... at a position inside the second stage
    exact, first = truth(model, ids)
    for bs in (1, 7, 64):
        s = score_exact(model, ids, P, K, batch_size=bs, count_matched=False)
        assert torch.equal(s.exact, exact) and torch.equal(s.first_mismatch, first)
        assert torch.equal(s.matched, first)
    assert first[:5].tolist() == [K - 1] * 3 + [5] * 2 and int(exact.sum()) == 3
