"""The Pythia protocol (SPEC 4.4, 6.2) end to end on a tiny GPTNeoX that has learnt one rule, "the next
token is this one + 1 (mod V)", with the paper's defaults (prefix 32, window 40, rows of 80, EOS id 0 as
Pythia's). Every sequence that follows the rule is memorized; one that jumps inside the window shows the
decoded fractional score apart from the teacher-forced one; one that passes through EOS in its window is
memorized only when EOS may be emitted. Checked: both perplexities against an independent computation
(and exactly V for a model with uniform logits), the decoded fractional score (extract's), EOS suppression
(equal to `generate(min_length=...)`, the paper's decoding), the retain split of SPEC 6.2, the batch size
32 and the 80-token rows the methods receive, result rows, low precision and one-line errors."""

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_runs import cli
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from tinymem_fast.eval.scoring import extract, score_exact
from tinymem_fast.experiments.pythia import (
    PythiaConfig,
    _method_configs,
    perplexities,
    protocol_stats,
    run_protocol,
    split_clean,
)

V, L, EOS = 96, 88, 0   # rows of 88 tokens: the protocol cuts them to its 80
P, K = 32, 40           # window [32, 72)


def rule(starts, length=L):
    return (torch.as_tensor(starts)[:, None] + torch.arange(length)) % V


def candidates():
    """4 rule rows whose window avoids EOS (memorized), 2 whose window holds it (memorized only when EOS
    may be emitted), 1 that jumps at position 50 (decoded 18/40, teacher-forced 39/40), 3 random rows."""
    plain, eos = rule([1, 5, 10, 20]), rule([30, 50])  # 30 + 66 = 96: EOS at position 66 of the window
    jump = rule([3])
    jump[0, 50:] = (10 + torch.arange(50, L)) % V       # tokens 60.. where the rule says 53..
    rnd = torch.randint(0, V, (3, L), generator=torch.Generator().manual_seed(5))
    return torch.cat([plain, eos, jump, rnd])


def clean_rows(n, seed=7):
    """Rule rows with a share of random tokens that grows with the row index (uneven batches)."""
    g = torch.Generator().manual_seed(seed)
    x = rule(torch.randint(0, V, (n,), generator=g), 80)
    noisy = torch.rand(n, 80, generator=g) < torch.linspace(0, 0.5, n)[:, None]
    return torch.where(noisy, torch.randint(0, V, (n, 80), generator=g), x)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=64,
                                         max_position_embeddings=L, hidden_dropout=0, attention_dropout=0,
                                         eos_token_id=EOS, bos_token_id=EOS))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        x = rule(torch.randint(0, V, (16,), generator=g), 80)
        loss = m(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def folder(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("neox")
    model.save_pretrained(d / "model", safe_serialization=True)
    np.save(d / "memorized.npy", candidates().numpy())
    with open(d / "clean.jsonl", "w") as f:
        for row in clean_rows(100):
            f.write(json.dumps({"ids": row.tolist()}) + "\n")
    return d


def test_model_follows_the_rule(model):
    x = rule(torch.arange(V), 80)
    with torch.no_grad():
        assert bool((model(x).logits[:, :-1].argmax(-1) == x[:, 1:]).all())


def test_perplexities_named_and_hand_checked(model):
    clean = clean_rows(70)   # batches of 32, 32 and 6 rows
    got = perplexities(model, clean, 32)
    with torch.no_grad():
        logits = model(clean).logits[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, V), clean[:, 1:].reshape(-1), reduction="none").view(70, 79)
    per_batch = [math.exp(float(ce[i: i + 32].mean())) for i in (0, 32, 64)]
    assert got["ppl_batchmean"] == pytest.approx(sum(per_batch) / 3, rel=1e-5)
    assert got["ppl_token"] == pytest.approx(math.exp(float(ce.mean())), rel=1e-5)
    assert got["ppl_batchmean"] > 1.5 * got["ppl_token"]    # not one figure under two names
    st = protocol_stats(model, candidates(), clean, PythiaConfig())
    assert st["test/ppl_batchmean"] == pytest.approx(got["ppl_batchmean"], rel=1e-6)
    assert st["test/ppl_token"] == pytest.approx(got["ppl_token"], rel=1e-6)
    assert st["ppl_batch_size"] == 32 and st["n_ppl"] == 70
    # uniform logits: every token costs log V, so both perplexities are V
    flat = copy.deepcopy(model)
    with torch.no_grad():
        flat.get_output_embeddings().weight.zero_()
    both = perplexities(flat, clean, 32)
    assert both["ppl_batchmean"] == pytest.approx(V, rel=1e-5)
    assert both["ppl_token"] == pytest.approx(V, rel=1e-5)


def test_fractional_is_decoded_and_eos_suppressed(model):
    cand, clean = candidates(), clean_rows(40)
    st = protocol_stats(model, cand, clean, PythiaConfig())
    assert st["suppressed_eos"] == [EOS]
    assert st["n_memorized"] == 4 and st["mem"] == pytest.approx(40.0)     # the EOS rows are not
    ex = extract(model, cand[:, :P + K], P, K, suppress_ids=[EOS])
    tf = score_exact(model, cand, P, K, suppress_ids=[EOS])
    assert st["fractional"] == pytest.approx(float(ex.fractional.double().mean()), abs=1e-7)
    assert st["fractional_tf"] == pytest.approx(float(tf.fractional.double().mean()), abs=1e-7)
    jump = protocol_stats(model, cand[6:7], clean, PythiaConfig())
    assert jump["fractional"] == pytest.approx(18 / 40) and jump["fractional_tf"] == pytest.approx(39 / 40)
    # EOS: the model would emit it inside the window; suppressed (the default), it never does
    eos_rows = cand[4:6]
    free = protocol_stats(model, eos_rows, clean, PythiaConfig(suppress_eos=False))
    assert free["n_memorized"] == 2 and free["suppressed_eos"] == []
    held = protocol_stats(model, eos_rows, clean, PythiaConfig())
    assert held["n_memorized"] == 0 and held["fractional"] < 1
    ours = extract(model, eos_rows[:, :P + K], P, K, suppress_ids=[EOS]).tokens
    assert not bool((ours == EOS).any())
    # the paper's decoding: generate with min_length = max_length, which bans EOS before the end
    with torch.no_grad():
        paper = model.generate(eos_rows[:, :P], max_length=P + K, min_length=P + K, do_sample=False,
                               pad_token_id=EOS)
    assert torch.equal(paper[:, P:], ours)


def test_retain_split_follows_spec():
    clean = torch.arange(3300)[:, None].expand(3300, 2)
    ppl, retain, note = split_clean(clean)   # the paper's 3,264 rows: first and last 1,632
    assert torch.equal(ppl[:, 0], torch.arange(1632)) and torch.equal(retain[:, 0], torch.arange(1632, 3264))
    assert note is None
    ppl, retain, note = split_clean(clean[:100], 40, 40)
    assert torch.equal(ppl[:, 0], torch.arange(40)) and torch.equal(retain[:, 0], torch.arange(40, 80))
    assert "cut to 40" in note and "1632" in note
    ppl, retain, note = split_clean(clean[:100], 1632, 60)
    assert ppl.shape[0] == 40 and torch.equal(retain[:, 0], torch.arange(40, 100))
    ppl, retain, note = split_clean(clean[:50], 1632, 60)
    assert ppl is retain and "also the perplexity rows" in note


def test_method_batch_size():
    cfg = PythiaConfig()
    got = _method_configs(["greedy", "activations", "integrated_gradients", "subnet"], {"subnet": {
        "batch_size": 8}}, cfg)
    assert got["greedy"][1].batch_size == 32 and got["activations"][1].batch_size == 32
    assert got["subnet"][1].batch_size == 8                          # --hp wins
    from tinymem_fast.methods.neuron.integrated_gradients import IntegratedGradientsConfig

    # replicas, not rows: IG keeps its own default
    assert got["integrated_gradients"][1].batch_size == IntegratedGradientsConfig().batch_size != 32
    kept = _method_configs(["greedy"], {}, PythiaConfig(method_batch_size=None))
    assert kept["greedy"][1].batch_size == 64


def test_methods_get_paper_batch_and_rows(folder, monkeypatch):
    """The methods see batch_size 32, forget rows of 80 tokens and the last 1,632 of 3,264 clean rows."""
    from tinymem_fast.methods import registry

    seen = {}
    for name in ("durable", "balanced_subnet", "greedy"):
        m = registry.get_method(name)

        def spy(model, inputs, cfg, _run=m.run, _name=name):
            seen[_name] = (cfg.batch_size, tuple(inputs.forget_ids.shape), inputs.retain_ids.cpu().clone())
            return _run(model, inputs, cfg)

        monkeypatch.setitem(registry.METHODS, name, dataclasses.replace(m, run=spy))
    clean = clean_rows(3264)
    hps = {"durable": {"ratio": 0.01}, "balanced_subnet": {"ratio": 0.01, "epochs": 1},
           "greedy": {"ratio": 1e-4}}
    base, rows = run_protocol(str(folder / "model"), candidates(), clean, list(hps), hps, PythiaConfig(),
                              progress=False)
    assert base["n_memorized"] == 4 and base["settings"]["n_ppl"] == 1632
    assert base["settings"]["forget_row_len"] == 80 and base["settings"]["retain_note"] is None
    for name in hps:
        bs, fshape, retain = seen[name]
        assert bs == 32 and fshape == (4, 80)
        assert torch.equal(retain, clean[1632:])
    for row in rows:
        assert row["hparams"]["batch_size"] == 32 and row["n_retain"] == 1632 and row["retain_note"] is None
        assert row["suppress_eos"] and row["suppressed_eos"] == [EOS]
        assert set(row["utility_after"]) == {"ppl_token", "ppl_batchmean"}
        assert row["after"]["fractional"] <= 1 and "fractional_tf" in row["after"]
        # selected on the paper's batch-mean perplexity
        bm0, bm1 = row["base"]["test/ppl_batchmean"], row["after"]["test/ppl_batchmean"]
        assert row["selection"]["utility_metric"] == "ppl_batchmean"
        assert row["d_util"] == pytest.approx((bm1 - bm0) / bm0)


def test_protocol_command(folder, tmp_path):
    out = tmp_path / "out"
    r = cli("pythia", str(folder / "model"), "--memorized", str(folder / "memorized.npy"),
            "--clean", str(folder / "clean.jsonl"), "--ppl-size", "40", "--retain-size", "40",
            "--methods", "durable,activations", "--hp", "ratio=0.05", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "EOS [0] suppressed" in r.stdout and "cut to 40" in r.stdout
    base = json.loads((out / "base.json").read_text())
    assert base["n_sequences"] == 10 and base["n_memorized"] == 4
    assert base["fractional"] < base["fractional_tf"]
    s = base["settings"]
    assert (s["prefix_len"], s["suffix_len"], s["seq_len"], s["forget_row_len"]) == (32, 40, 80, 80)
    assert s["suppressed_eos"] == [EOS] and s["ppl_batch_size"] == 32 and s["n_ppl"] == 40
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [x["method"] for x in rows] == ["durable", "activations"]
    for x in rows:
        assert x["protocol"] == "pythia" and x["n_forget"] == 4 and x["n_retain"] == 40
        assert "cut to 40" in x["retain_note"] and x["hparams"]["batch_size"] == 32
        assert x["mem_before"] == base["mem"] and 0 <= x["mem_after"] <= 100
        assert x["utility_after"]["ppl_batchmean"] > 0 and x["hparams"]["ratio"] == 0.05
    r = cli("pythia", str(folder / "model"), "--memorized", str(folder / "memorized.npy"),
            "--clean", str(folder / "clean.jsonl"), "--no-suppress-eos", "--out", str(tmp_path / "free"))
    assert r.returncode == 0, r.stderr[-2000:]
    free = json.loads((tmp_path / "free" / "base.json").read_text())
    assert free["n_memorized"] == 6 and free["settings"]["suppressed_eos"] == []


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_protocol_low_precision(folder, tmp_path, dtype):
    r = cli("pythia", str(folder / "model"), "--memorized", str(folder / "memorized.npy"),
            "--clean", str(folder / "clean.jsonl"), "--retain-size", "60", "--methods", "durable",
            "--dtype", dtype, "--out", str(tmp_path), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])
    assert row["dtype"] == dtype and row["mem_before"] == pytest.approx(40.0)


def test_protocol_bad_input(folder, tmp_path):
    args = ("--clean", str(folder / "clean.jsonl"))
    big = tmp_path / "big.npy"
    np.save(big, np.full((3, 80), 10_000))
    r = cli("pythia", str(folder / "model"), "--memorized", str(big), *args)
    assert r.returncode == 2 and "outside [0," in r.stderr
    short = tmp_path / "short.npy"
    np.save(short, candidates()[:, :60].numpy())      # 32 + 40 > 60 tokens
    r = cli("pythia", str(folder / "model"), "--memorized", str(short), *args)
    assert r.returncode == 2 and "longer than the sequences" in r.stderr
    r = cli("pythia", str(folder / "model"), "--memorized", str(folder / "memorized.npy"), *args,
            "--seq-len", "64")
    assert r.returncode == 2 and "shorter than prefix_len + suffix_len" in r.stderr
    r = cli("pythia", str(tmp_path), "--memorized", str(folder / "memorized.npy"), *args)
    assert r.returncode == 2 and "config.json" in r.stderr
    r = cli("pythia", str(folder / "model"), "--memorized", str(folder / "memorized.npy"), *args,
            "--methods", "forgetful")
    assert r.returncode == 2 and "unknown method" in r.stderr
