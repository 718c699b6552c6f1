"""The Pythia protocol end to end on a tiny GPTNeoX with planted memorized sequences: base statistics,
result rows for several methods, low-precision loading, and one-line errors on bad input."""

import json

import numpy as np
import pytest
import torch
from tiny_models import P, T
from tiny_runs import cli

from tinymem_fast.eval.scoring import score_exact
from tinymem_fast.experiments.pythia import PythiaConfig, protocol_stats


@pytest.fixture(scope="module")
def neox_folder(planted, tmp_path_factory):
    model, clean, held_out, secret = planted["gpt_neox"]
    d = tmp_path_factory.mktemp("neox")
    model.save_pretrained(d / "model", safe_serialization=True)
    np.save(d / "memorized.npy", torch.cat([secret, held_out[:4]]).numpy())  # 6 planted + 4 not memorized
    with open(d / "clean.jsonl", "w") as f:
        for row in clean[:120]:
            f.write(json.dumps({"ids": row.tolist()}) + "\n")
    return d


def test_stats_match_score_exact(planted):
    model, clean, held_out, secret = planted["gpt_neox"]
    mem = torch.cat([secret, held_out[:4]])
    cfg = PythiaConfig(prefix_len=P, suffix_len=T - P)
    st = protocol_stats(model, mem, clean[:50], cfg)
    want = score_exact(model, mem, P, T - P).exact
    assert st["n_memorized"] == int(want.sum()) >= 3 and st["n_sequences"] == 10
    assert st["mem"] == pytest.approx(100.0 * int(want.sum()) / 10)
    with torch.no_grad():
        logits = model(clean[:50]).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                clean[:50, 1:].reshape(-1))
    assert st["test/ppl_token"] == pytest.approx(float(nll.exp()), rel=1e-5)


def test_protocol_command(neox_folder, tmp_path):
    out = tmp_path / "out"
    r = cli("pythia", str(neox_folder / "model"), "--memorized", str(neox_folder / "memorized.npy"),
            "--clean", str(neox_folder / "clean.jsonl"), "--prefix-len", str(P), "--suffix-len", str(T - P),
            "--retain-size", "60", "--methods", "durable,balanced_subnet,activations", "--hp", "ratio=0.05",
            "--hp", "balanced_subnet:epochs=2", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    base = json.loads((out / "base.json").read_text())
    assert base["n_sequences"] == 10 and base["n_memorized"] >= 3
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [x["method"] for x in rows] == ["durable", "balanced_subnet", "activations"]
    for x in rows:
        assert x["protocol"] == "pythia" and x["n_forget"] == base["n_memorized"] and x["n_retain"] == 60
        assert x["mem_before"] == base["mem"] and 0 <= x["mem_after"] <= 100
        assert x["utility_after"]["ppl_token"] > 0 and x["hparams"]["ratio"] == 0.05


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_protocol_low_precision(neox_folder, tmp_path, dtype):
    r = cli("pythia", str(neox_folder / "model"), "--memorized", str(neox_folder / "memorized.npy"),
            "--clean", str(neox_folder / "clean.jsonl"), "--prefix-len", str(P), "--suffix-len", str(T - P),
            "--retain-size", "60", "--methods", "durable", "--dtype", dtype, "--out", str(tmp_path),
            "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])
    assert row["dtype"] == dtype and row["mem_before"] > 0


def test_protocol_bad_input(neox_folder, tmp_path):
    big = tmp_path / "big.npy"
    np.save(big, np.full((3, T), 10_000))
    r = cli("pythia", str(neox_folder / "model"), "--memorized", str(big), "--clean",
            str(neox_folder / "clean.jsonl"), "--prefix-len", str(P), "--suffix-len", str(T - P))
    assert r.returncode == 2 and "outside [0," in r.stderr
    r = cli("pythia", str(neox_folder / "model"), "--memorized", str(neox_folder / "memorized.npy"),
            "--clean", str(neox_folder / "clean.jsonl"))  # default 32 + 40 > 24 tokens
    assert r.returncode == 2 and "longer than the sequences" in r.stderr
    r = cli("pythia", str(tmp_path), "--memorized", str(neox_folder / "memorized.npy"), "--clean",
            str(neox_folder / "clean.jsonl"), "--prefix-len", str(P), "--suffix-len", str(T - P))
    assert r.returncode == 2 and "config.json" in r.stderr
    r = cli("pythia", str(neox_folder / "model"), "--memorized", str(neox_folder / "memorized.npy"),
            "--clean", str(neox_folder / "clean.jsonl"), "--prefix-len", str(P), "--suffix-len", str(T - P),
            "--methods", "forgetful")
    assert r.returncode == 2 and "unknown method" in r.stderr
