"""`torchrun --nproc_per_node 2 -m tinymem_fast score/extract` on CPU (gloo): contiguous shards, results
gathered on rank 0, identical to one process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from scoring_models import K, P, planted, probe_rows

from tinymem_fast.eval.distributed import DistContext, gather_columns, shard_bounds


def test_shard_bounds_cover_everything_once():
    for n in (0, 1, 5, 13, 64):
        for world in (1, 2, 3, 8):
            spans = [shard_bounds(n, r, world) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
            sizes = [hi - lo for lo, hi in spans]
            assert max(sizes) - min(sizes) <= 1


def test_single_process_gather_is_identity():
    cols = {"a": torch.arange(3)}
    assert gather_columns(cols, 3, DistContext()) is cols


def _torchrun(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "GLOO_SOCKET_IFNAME": "lo", "TINYMEM_BACKEND": os.environ.get("TINYMEM_BACKEND", "")}
    if not env["TINYMEM_BACKEND"]:
        del env["TINYMEM_BACKEND"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tinymem_fast", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model, _, _ = planted("gpt_neox")
    model.save_pretrained(root / "model")
    ids = probe_rows("gpt_neox")[:13]  # odd: the shards differ in size
    torch.save(ids, root / "ids.pt")
    return root


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_two_ranks_equal_one_process(inputs, tmp_path):
    from tinymem_fast.cli import main

    common = [str(inputs / "model"), "--input", str(inputs / "ids.pt"), "--prefix-len", str(P),
              "--suffix-len", str(K), "--batch-size", "4", "--device", "cpu", "--quiet"]
    r = _torchrun(["score", *common, "--mode", "both", "--nll", "--out", str(tmp_path / "two")], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert main(["score", *common, "--mode", "both", "--nll", "--out", str(tmp_path / "one")]) == 0
    two, one = _rows(tmp_path / "two" / "score.jsonl"), _rows(tmp_path / "one" / "score.jsonl")
    assert len(one) == 13 and sum(x["exact"] for x in one) == 8
    for a, b in zip(two, one, strict=True):  # every field identical; the NLL up to float rounding
        assert a.pop("nll") == pytest.approx(b.pop("nll"), rel=1e-5, abs=1e-6)
        assert a == b
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s2["world_size"] == 2 and s2["n"] == 13
    assert r.stdout.count("exact (") == 1  # only rank 0 reports


@pytest.mark.slow
def test_two_ranks_extract_and_errors(inputs, tmp_path):
    common = [str(inputs / "model"), "--input", str(inputs / "ids.pt"), "--prefix-len", str(P),
              "--device", "cpu", "--quiet"]
    r = _torchrun(["extract", *common, "--suffix-len", str(K), "--out", str(tmp_path / "e")], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(tmp_path / "e" / "extract.jsonl")
    model, _, _ = planted("gpt_neox")
    ids = probe_rows("gpt_neox")[:13]
    gen = model.generate(ids[:, :P], attention_mask=torch.ones_like(ids[:, :P]), do_sample=False,
                         max_new_tokens=K, min_new_tokens=K, eos_token_id=None, pad_token_id=0)[:, P:]
    assert [x["tokens"] for x in rows] == gen.tolist()
    bad = _torchrun(["score", *common, "--suffix-len", "100", "--out", str(tmp_path / "b")], tmp_path)
    assert bad.returncode != 0 and bad.stderr.count("is longer than the sequences") == 1


def _two_ranks(per_rank_args, tmp_path):
    """Rank 0 and rank 1 started by hand (as torchrun would), each with its own arguments."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, args in enumerate(per_rank_args):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "tinymem_fast", *args], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, err) for p, (_, err) in zip(procs, outs, strict=True)]


def _score_args(inputs, tmp_path, ids_file):
    return ["score", str(inputs / "model"), "--input", str(ids_file), "--prefix-len", str(P), "--suffix-len",
            str(K), "--device", "cpu", "--quiet", "--out", str(tmp_path / "out")]


def test_an_error_on_rank_1_reaches_the_user(inputs, tmp_path):
    """Rank 1 cannot read its input: rank 0 says so, naming the rank, and both exit 2 without scoring."""
    res = _two_ranks([_score_args(inputs, tmp_path, inputs / "ids.pt"),
                      _score_args(inputs, tmp_path, tmp_path / "missing.pt")], tmp_path)
    assert [rc for rc, _ in res] == [2, 2], res
    lines = res[0][1].strip().splitlines()
    assert len(lines) == 1 and "rank 1:" in lines[0] and "missing.pt" in lines[0], res[0][1]
    assert "Traceback" not in res[0][1] + res[1][1]
    assert not (tmp_path / "out" / "score.jsonl").exists()


def test_ranks_with_different_inputs_are_refused(inputs, tmp_path):
    torch.save(torch.load(inputs / "ids.pt", weights_only=True)[:7], tmp_path / "fewer.pt")
    res = _two_ranks([_score_args(inputs, tmp_path, inputs / "ids.pt"),
                      _score_args(inputs, tmp_path, tmp_path / "fewer.pt")], tmp_path)
    assert [rc for rc, _ in res] == [2, 2], res
    assert "the ranks read different inputs (rank 0: 13 rows" in res[0][1] and "rank 1: 7 rows" in res[0][1]
    assert "Traceback" not in res[0][1] + res[1][1]
