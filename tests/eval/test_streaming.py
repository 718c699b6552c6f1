"""`tinymem score` / `extract` streamed over shards: each shard written when done, the merged result equal
to the engine's in-memory one; a run that crashes or is SIGKILLed and then resumed gives byte-identical
output, on one process and on 2 ranks; --resume refuses other settings; hub ids at a revision resolve
from a Hugging Face cache laid out here, offline."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from scoring_models import K, P, planted, probe_rows

from tinymem_fast.cli import main
from tinymem_fast.eval import streaming
from tinymem_fast.eval.scoring import extract, score_exact

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "GLOO_SOCKET_IFNAME": "lo"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    model, _, _ = planted("gpt_neox")
    model.save_pretrained(root / "model")
    ids = probe_rows("gpt_neox")  # 24 rows, 8 of them memorized exactly
    np.save(root / "ids.npy", ids.numpy().astype(np.uint16))
    # enough rows that a subprocess is still scoring when it is killed
    gen = torch.Generator().manual_seed(5)
    big = torch.cat([ids, torch.randint(0, 40, (600, ids.shape[1]), generator=gen)])
    np.save(root / "big.npy", big.numpy().astype(np.int32))
    return root


def _args(inputs, out, *extra, input_name="ids.npy"):
    return [str(inputs / "model"), "--input", str(inputs / input_name), "--prefix-len", str(P),
            "--suffix-len", str(K), "--batch-size", "4", "--device", "cpu", "--quiet", "--out", str(out),
            *extra]


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_shards_merge_to_the_in_memory_result(inputs, tmp_path):
    extra = ["--shard-rows", "5", "--mode", "both", "--nll"]
    assert main(["score", *_args(inputs, tmp_path / "s", *extra)]) == 0
    rows = _rows(tmp_path / "s" / "score.jsonl")
    model, _, _ = planted("gpt_neox")
    ids = probe_rows("gpt_neox")
    ref = score_exact(model, ids, P, K, batch_size=4, need_nll=True)
    ext = extract(model, ids, P, K, batch_size=4)
    assert [r["index"] for r in rows] == list(range(24))
    assert [r["exact"] for r in rows] == ref.exact.tolist() and sum(ref.exact.tolist()) == 8
    assert [r["first_mismatch"] for r in rows] == ref.first_mismatch.tolist()
    assert [r["matched"] for r in rows] == ext.matched.tolist()
    assert [r["nll"] for r in rows] == pytest.approx(ref.mean_nll.tolist(), rel=1e-5, abs=1e-6)
    s = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert s["n"] == 24 and s["n_exact"] == 8 and s["rows_scored_now"] == 24
    assert s["mean_fractional"] == pytest.approx(float(ext.matched.double().mean() / K))
    assert not (tmp_path / "s" / "shards").exists()  # merged, then removed
    memorized = (tmp_path / "s" / "memorized_index.txt").read_text().split()
    assert memorized == [str(i) for i in range(24) if ref.exact[i]]


def test_row_selection_keeps_input_row_numbers(inputs, tmp_path):
    (tmp_path / "idx.txt").write_text("20\n0\n3\n")
    assert main(["extract", *_args(inputs, tmp_path / "e", "--row-index", str(tmp_path / "idx.txt"))]) == 0
    rows = _rows(tmp_path / "e" / "extract.jsonl")
    assert [r["index"] for r in rows] == [20, 0, 3]
    assert main(["score", *_args(inputs, tmp_path / "r", "--rows", "8:16")]) == 0
    assert [r["index"] for r in _rows(tmp_path / "r" / "score.jsonl")] == list(range(8, 16))


def test_crash_then_resume_is_byte_identical(inputs, tmp_path, monkeypatch):
    extra = ["--shard-rows", "5", "--mode", "both"]
    assert main(["score", *_args(inputs, tmp_path / "whole", *extra)]) == 0
    calls = {"n": 0}
    real = streaming.write_shard

    def dies_on_third(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what a Ctrl-C mid-run raises
        return real(*a, **kw)

    monkeypatch.setattr(streaming, "write_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        main(["score", *_args(inputs, tmp_path / "cut", *extra)])
    monkeypatch.setattr(streaming, "write_shard", real)
    assert len(streaming.done_shards(str(tmp_path / "cut"), "score", streaming.ShardPlan(24, 5))) == 2
    assert main(["score", *_args(inputs, tmp_path / "cut", *extra, "--resume")]) == 0
    s = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert s["shards_resumed"] == 2 and s["rows_scored_now"] == 14
    whole = (tmp_path / "whole" / "score.jsonl").read_bytes()
    assert (tmp_path / "cut" / "score.jsonl").read_bytes() == whole
    # a finished run resumes to itself, scoring nothing
    assert main(["score", *_args(inputs, tmp_path / "cut", *extra, "--resume")]) == 0
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["rows_scored_now"] == 14


def test_resume_refuses_other_settings(inputs, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["score", *_args(inputs, out, "--shard-rows", "5")]) == 0
    assert main(["score", *_args(inputs, out, "--shard-rows", "5", "--resume", "--nll")]) == 2
    err = capsys.readouterr().err
    assert "other settings or input" in err and "nll False -> True" in err


def _cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "tinymem_fast", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, **kw)


def test_sigkill_at_random_points_then_resume(inputs, tmp_path):
    extra = ["--shard-rows", "16"]
    whole = tmp_path / "whole"
    assert main(["extract", *_args(inputs, whole, *extra, input_name="big.npy")]) == 0
    out = tmp_path / "killed"
    rng = random.Random(0)
    plan = streaming.ShardPlan(624, 16)
    kills = 0
    for attempt in range(3):
        p = _cli(["extract", *_args(inputs, out, *extra, *(["--resume"] if attempt else []),
                                   input_name="big.npy")])
        # wait until this attempt has added shards, then kill it at a random moment
        before = len(streaming.done_shards(str(out), "extract", plan))
        deadline = time.time() + 120
        while p.poll() is None and time.time() < deadline and \
                len(streaming.done_shards(str(out), "extract", plan)) < before + 1:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.communicate(timeout=60)
    assert kills >= 2, "the run finished before it could be killed: make the input larger"
    p = _cli(["extract", *_args(inputs, out, *extra, "--resume", input_name="big.npy")])
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    assert (out / "extract.jsonl").read_bytes() == (whole / "extract.jsonl").read_bytes()
    assert not list((out).glob("shards/.tmp-*"))


def _torchrun(args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tinymem_fast", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=cwd)


def test_two_ranks_resume_a_single_process_run(inputs, tmp_path, monkeypatch):
    extra = ["--shard-rows", "3", "--mode", "exact", "--nll"]
    assert main(["score", *_args(inputs, tmp_path / "whole", *extra)]) == 0
    real, calls = streaming.write_shard, {"n": 0}

    def dies_on_fourth(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(streaming, "write_shard", dies_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        main(["score", *_args(inputs, tmp_path / "cut", *extra)])
    r = _torchrun(["score", *_args(inputs, tmp_path / "cut", *extra, "--resume")], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["shards_resumed"] == 3 and s["n"] == 24
    got, want = _rows(tmp_path / "cut" / "score.jsonl"), _rows(tmp_path / "whole" / "score.jsonl")
    for a, b in zip(got, want, strict=True):  # every field identical; the NLL up to float rounding
        assert a.pop("nll") == pytest.approx(b.pop("nll"), rel=1e-5, abs=1e-6)
        assert a == b


# --- hub ids and revisions, from a cache laid out here ------------------------------------------------


def _hub_cache(root, model, repo="org/tiny", revisions=("step1000", "step2000"), first_commit=1):
    """The layout huggingface_hub reads offline: refs/<revision> holds a commit hash, snapshots/<hash>
    the files."""
    base = root / "hub" / f"models--{repo.replace('/', '--')}"
    for i, rev in enumerate(revisions):
        commit = f"{i + first_commit:040x}"
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / rev).write_text(commit)
        model.save_pretrained(base / "snapshots" / commit)
    return root / "hub"


def test_hub_id_at_a_revision_from_the_cache(inputs, tmp_path):
    from tinymem_fast.integrations.loading import ModelFolderError, resolve_model

    model, _, _ = planted("gpt_neox")
    cache = _hub_cache(tmp_path, model)
    folder = resolve_model("org/tiny", "step2000", local_files_only=True, cache_dir=str(cache))
    assert folder.endswith(f"snapshots/{2:040x}") and os.path.exists(os.path.join(folder, "config.json"))
    with pytest.raises(ModelFolderError, match="not in the Hugging Face cache"):
        resolve_model("org/tiny", "step3000", local_files_only=True, cache_dir=str(cache))
    with pytest.raises(ModelFolderError, match="--revision applies to hub model ids"):
        resolve_model(str(inputs / "model"), "step1000")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model("./no/such/folder")
    env = {**ENV, "HF_HUB_CACHE": str(cache)}
    args = ["score", "org/tiny", "--revision", "step1000", "--local-files-only", "--input",
            str(inputs / "ids.npy"), "--prefix-len", str(P), "--suffix-len", str(K), "--quiet", "--out",
            str(tmp_path / "o")]
    r = subprocess.run([sys.executable, "-m", "tinymem_fast", *args], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["model"] == "org/tiny" and s["revision"] == "step1000" and s["n_exact"] == 8
    args[3] = "step9"
    r = subprocess.run([sys.executable, "-m", "tinymem_fast", *args], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 2 and "'org/tiny' at revision 'step9' is not a local folder" in r.stderr, r.stderr
    shutil.rmtree(tmp_path / "o")


def test_memorization_over_hub_revisions(inputs, tmp_path):
    from scoring_models import tiny

    from tinymem_fast.cli.score import parse_revisions

    assert parse_revisions("step1000:step3000:1000") == ["step1000", "step2000", "step3000"]
    assert parse_revisions("main, step5,main") == ["main", "step5"]
    model, _, _ = planted("gpt_neox")
    cache = _hub_cache(tmp_path, tiny("gpt_neox"), revisions=("step1000",))  # untrained: memorizes nothing
    _hub_cache(tmp_path, model, revisions=("step2000",), first_commit=7)    # the planted model
    env = {**ENV, "HF_HUB_CACHE": str(cache)}
    out = tmp_path / "over"
    args = ["score", "org/tiny", "--revisions", "step1000:step2000:1000", "--local-files-only", "--input",
            str(inputs / "ids.npy"), "--prefix-len", str(P), "--suffix-len", str(K), "--quiet",
            "--out", str(out)]
    r = subprocess.run([sys.executable, "-m", "tinymem_fast", *args], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = _rows(out / "checkpoints.jsonl")
    assert [(x["step"], x["revision"]) for x in recs] == [(1000, "step1000"), (2000, "step2000")]
    assert recs[1]["n_exact"] == 8 and recs[0]["n_exact"] < 8
    assert (out / "memorization_over_training.png").stat().st_size > 0
    assert len(_rows(out / "step2000" / "score.jsonl")) == 24


def test_auto_batch_halves_on_out_of_memory():
    sizes = []

    def fits_at_most_200(bs):
        sizes.append(bs)
        if bs > 200:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return bs

    auto = streaming.AutoBatch("auto", "cuda:0")
    assert auto.run(fits_at_most_200) == 128 and sizes == [1024, 512, 256, 128]
    assert auto.run(fits_at_most_200) == 128 and sizes[-1] == 128  # the size that fit is kept
    assert streaming.AutoBatch("auto", "cpu").size == 64
    with pytest.raises(torch.cuda.OutOfMemoryError):
        streaming.AutoBatch(512, "cuda:0").run(fits_at_most_200)  # a size the user chose is not changed


def test_eleuther_protocol_sets_the_window(inputs, tmp_path, capsys):
    assert main(["score", *_args(inputs, tmp_path / "e", "--protocol", "eleuther")]) == 2
    assert "prefix_len + suffix_len = 64 is longer than the sequences (28 tokens)" in capsys.readouterr().err


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant at once (torchrun starts its workers in their own process
    group, so killing the agent's group alone would leave them running)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    todo, tree = [pid], []
    while todo:
        q = todo.pop()
        tree.append(q)
        todo += children.get(q, [])
    for q in tree:
        try:
            os.kill(q, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_two_ranks_sigkilled_then_resumed(inputs, tmp_path):
    """The whole torchrun job (agent and both ranks) dies at once, as on a lost node; resuming on 2 ranks
    ends byte-identical to an uninterrupted single-process run."""
    extra = ["--shard-rows", "16"]
    whole, out = tmp_path / "whole", tmp_path / "killed"
    assert main(["extract", *_args(inputs, whole, *extra, input_name="big.npy")]) == 0
    plan = streaming.ShardPlan(624, 16)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "tinymem_fast", "extract", *_args(inputs, out, *extra, input_name="big.npy")]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=tmp_path)
    deadline = time.time() + 180
    while p.poll() is None and time.time() < deadline and \
            len(streaming.done_shards(str(out), "extract", plan)) < 4:
        time.sleep(0.05)
    killed = p.poll() is None
    if killed:
        _kill_tree(p.pid)
    p.wait(timeout=60)
    done = len(streaming.done_shards(str(out), "extract", plan))
    assert killed and 4 <= done < plan.count, (killed, done)
    r = _torchrun(["extract", *_args(inputs, out, *extra, "--resume", input_name="big.npy")], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["shards_resumed"] == done
    assert (out / "extract.jsonl").read_bytes() == (whole / "extract.jsonl").read_bytes()


def test_parquet_output_equals_json_lines(inputs, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    extra = ["--shard-rows", "7", "--mode", "both"]
    assert main(["score", *_args(inputs, tmp_path / "j", *extra)]) == 0
    assert main(["score", *_args(inputs, tmp_path / "p", *extra, "--output-format", "parquet")]) == 0
    folder = tmp_path / "p" / "score.parquet"
    assert sorted(x.name for x in folder.iterdir()) == [f"part-{j:08d}.parquet" for j in range(4)]
    table = pq.read_table(folder).to_pylist()
    assert table == _rows(tmp_path / "j" / "score.jsonl")
    s_p, s_j = (json.loads((tmp_path / d / "summary.json").read_text()) for d in "pj")
    assert s_p["n_exact"] == s_j["n_exact"] == 8 and s_p["mean_fractional"] == s_j["mean_fractional"]
