"""`tinymem score` / `tinymem extract`: input formats, outputs, summary, and one-line errors (exit 2)."""

import json

import numpy as np
import pytest
import torch
from scoring_models import K, P, V, planted, probe_rows

from tinymem_fast.cli import main


def _tokenizer(n_words: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n_words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model, _, _ = planted("gpt2")
    mdir = root / "model"
    model.save_pretrained(mdir)
    _tokenizer(V).save_pretrained(mdir)
    big = root / "big_tok"
    _tokenizer(V + 10).save_pretrained(big)
    ids = probe_rows("gpt2")
    return root, mdir, ids, model


def _run(args, capsys):
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _read(out_dir, name):
    rows = [json.loads(x) for x in (out_dir / f"{name}.jsonl").read_text().splitlines()]
    return rows, json.loads((out_dir / "summary.json").read_text())


def test_score_npy_both_modes(setup, tmp_path, capsys):
    root, mdir, ids, model = setup
    np.save(tmp_path / "ids.npy", ids.numpy().astype(np.int32))
    out = tmp_path / "out"
    rc, stdout, err = _run(["score", str(mdir), "--input", str(tmp_path / "ids.npy"), "--prefix-len", str(P),
                            "--suffix-len", str(K), "--batch-size", "5", "--mode", "both", "--nll",
                            "--verify", "--out", str(out), "--quiet"], capsys)
    assert rc == 0, err
    rows, summary = _read(out, "score")
    assert len(rows) == ids.shape[0] and [r["index"] for r in rows] == list(range(ids.shape[0]))
    assert [r["exact"] for r in rows] == [True] * 8 + [False] * 16
    assert [r["first_mismatch"] for r in rows[8:16]] == [(3 * r) % K for r in range(8)]
    assert [r["matched"] for r in rows[8:16]] == [K - 1] * 8  # decoded fractional score
    assert all(r["fractional"] == r["matched"] / K for r in rows)
    assert all("nll" in r and "fractional_tf" in r and r["verified"] in (True, False) for r in rows)
    assert summary["n"] == 24 and summary["n_exact"] == 8 and summary["mode"] == "both"
    assert abs(summary["pct_exact"] - 100 * 8 / 24) < 1e-9 and summary["sequences_per_s"] > 0
    assert summary["device"].startswith("cpu") and summary["n_disagree"] == 0
    assert "8/24 exact" in stdout


def test_score_jsonl_ids_and_text_agree(setup, tmp_path, capsys):
    root, mdir, ids, _ = setup
    with open(tmp_path / "ids.jsonl", "w") as f:
        for r in ids.tolist():
            f.write(json.dumps({"ids": r}) + "\n")
        f.write("\n")  # blank lines are skipped
    with open(tmp_path / "text.jsonl", "w") as f:
        for r in ids.tolist():
            f.write(json.dumps({"text": " ".join(f"w{t}" for t in r)}) + "\n")
    res = []
    for name in ("ids", "text"):
        out = tmp_path / f"out_{name}"
        rc, _, err = _run(["score", str(mdir), "--input", str(tmp_path / f"{name}.jsonl"), "--prefix-len",
                           str(P), "--suffix-len", str(K), "--out", str(out), "--quiet"], capsys)
        assert rc == 0, err
        res.append(_read(out, "score")[0])
    assert res[0] == res[1] and sum(r["exact"] for r in res[0]) == 8


def test_score_pt_fractional_and_extract(setup, tmp_path, capsys):
    root, mdir, ids, model = setup
    torch.save(ids.int(), tmp_path / "ids.pt")
    out = tmp_path / "frac"
    rc, _, err = _run(["score", str(mdir), "--input", str(tmp_path / "ids.pt"), "--prefix-len", str(P),
                       "--suffix-len", str(K), "--mode", "fractional", "--out", str(out), "--quiet"], capsys)
    assert rc == 0, err
    frac, s = _read(out, "score")
    assert s["mean_fractional"] == pytest.approx(np.mean([r["fractional"] for r in frac]))
    out = tmp_path / "ext"
    rc, _, err = _run(["extract", str(mdir), "--input", str(tmp_path / "ids.pt"), "--prefix-len", str(P),
                       "--suffix-len", str(K), "--batch-size", "3", "--out", str(out), "--quiet"], capsys)
    assert rc == 0, err
    ext, s = _read(out, "extract")
    gen = model.generate(ids[:, :P], attention_mask=torch.ones_like(ids[:, :P]), do_sample=False,
                         max_new_tokens=K, min_new_tokens=K, eos_token_id=None, pad_token_id=0)[:, P:]
    assert [r["tokens"] for r in ext] == gen.tolist()
    assert [r["matched"] for r in ext] == [r["matched"] for r in frac]
    out = tmp_path / "stop"
    rc, _, err = _run(["extract", str(mdir), "--input", str(tmp_path / "ids.pt"), "--prefix-len", str(P),
                       "--suffix-len", str(K), "--stop-on-mismatch", "--out", str(out), "--quiet"], capsys)
    stop, _ = _read(out, "extract")
    assert rc == 0 and [r["exact"] for r in stop] == [r["exact"] for r in ext]
    assert stop[9]["tokens"][4:] == [-1] * (K - 4)  # row 9 misses at offset 3


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case,msg", [
    ("malformed", ".jsonl:2: malformed JSON"),
    ("wrong_key", ".jsonl:1: expected an object"),
    ("empty", "empty input"),
    ("too_short", "sequence 1 has 10 tokens, fewer than prefix_len + suffix_len = 24"),
    ("vocab", "token id 40 in sequence 0"),
    ("context", "exceeds the model's context of 40"),
    ("not_lm", "encoder (bidirectional attention"),
    ("no_config", "no config.json"),
    ("tok_mismatch", "has 50 tokens but the model's vocabulary has 40"),
    ("missing", "does not exist"),
    ("bad_ext", "unknown input format"),
])
def test_bad_input_one_line_exit_2(setup, tmp_path, capsys, case, msg):
    root, mdir, ids, _ = setup
    good = [json.dumps({"ids": list(range(30))})]
    model, extra, p, k = str(mdir), [], P, K
    if case == "malformed":
        inp = _write(tmp_path / "x.jsonl", good[0] + "\n{\"ids\": [1, 2,\n")
    elif case == "wrong_key":
        inp = _write(tmp_path / "x.jsonl", json.dumps({"tokens": [1]}) + "\n")
    elif case == "empty":
        inp = _write(tmp_path / "x.jsonl", "\n")
    elif case == "too_short":
        inp = _write(tmp_path / "x.jsonl", good[0] + "\n" + json.dumps({"ids": list(range(10))}) + "\n")
    elif case == "vocab":
        inp = _write(tmp_path / "x.jsonl", json.dumps({"ids": [V] * 30}) + "\n")
    elif case == "context":
        inp = _write(tmp_path / "x.jsonl", json.dumps({"ids": [1] * 50}) + "\n")
        p, k = 20, 25
    elif case == "not_lm":
        from transformers import BertConfig

        BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=32).save_pretrained(tmp_path / "bert")
        model = str(tmp_path / "bert")
        inp = _write(tmp_path / "x.jsonl", good[0] + "\n")
    elif case == "no_config":
        (tmp_path / "empty_model").mkdir()
        model = str(tmp_path / "empty_model")
        inp = _write(tmp_path / "x.jsonl", good[0] + "\n")
    elif case == "tok_mismatch":
        inp = _write(tmp_path / "x.jsonl", good[0] + "\n")
        extra = ["--tokenizer", str(root / "big_tok")]
    elif case == "missing":
        inp = str(tmp_path / "nope.jsonl")
    else:
        inp = _write(tmp_path / "x.csv", "1,2,3\n")
    rc, _, err = _run(["score", model, "--input", inp, "--prefix-len", str(p), "--suffix-len", str(k),
                       "--out", str(tmp_path / "out"), "--quiet", *extra], capsys)
    assert rc == 2, err
    assert msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()  # nothing started


def test_text_without_tokenizer(setup, tmp_path, capsys):
    root, mdir, ids, model = setup
    bare = tmp_path / "bare"
    model.save_pretrained(bare)
    inp = _write(tmp_path / "t.jsonl", json.dumps({"text": "w1 w2"}) + "\n")
    rc, _, err = _run(["score", str(bare), "--input", inp, "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert rc == 2 and "t.jsonl:1: a \"text\" line needs a tokenizer" in err


def test_suppress_eos(setup, tmp_path, capsys):
    root, mdir, ids, model = setup
    eos = int(ids[0, P + 5])
    j = int((ids[0, P: P + K] == eos).nonzero()[0])
    import copy

    m = copy.deepcopy(model)
    m.config.eos_token_id = eos
    m.generation_config.eos_token_id = eos
    m.save_pretrained(tmp_path / "m")
    torch.save(ids[:8], tmp_path / "ids.pt")
    base = ["score", str(tmp_path / "m"), "--input", str(tmp_path / "ids.pt"), "--prefix-len", str(P),
            "--suffix-len", str(K), "--quiet"]
    assert _run([*base, "--out", str(tmp_path / "plain")], capsys)[0] == 0
    assert _run([*base, "--suppress-eos", "--out", str(tmp_path / "sup")], capsys)[0] == 0
    plain, _ = _read(tmp_path / "plain", "score")
    sup, summary = _read(tmp_path / "sup", "score")
    assert plain[0]["exact"] and not sup[0]["exact"] and sup[0]["first_mismatch"] == j
    assert summary["suppressed_eos"] == [eos]


def test_score_exact_only(setup, tmp_path, capsys):
    root, mdir, ids, _ = setup
    np.save(tmp_path / "ids.npy", ids.numpy().astype(np.int32))
    common = ["score", str(mdir), "--input", str(tmp_path / "ids.npy"), "--prefix-len", str(P),
              "--suffix-len", str(K), "--batch-size", "5", "--quiet"]
    rc, _, err = _run([*common, "--exact-only", "--out", str(tmp_path / "fast")], capsys)
    assert rc == 0, err
    fast, summary = _read(tmp_path / "fast", "score")
    rc, _, err = _run([*common, "--out", str(tmp_path / "full")], capsys)
    full, _ = _read(tmp_path / "full", "score")
    def bits(rows):
        return [(r["exact"], r["first_mismatch"]) for r in rows]

    assert bits(fast) == bits(full)
    assert all("fractional_tf" not in r for r in fast) and all("fractional_tf" in r for r in full)
    assert summary["n_exact"] == 8
