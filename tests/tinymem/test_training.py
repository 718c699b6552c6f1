"""Training: a killed and restarted run ends on the same weights as an uninterrupted one; CLI errors."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

TINY = ["--preset", "quick", "--quiet",
        "--set", "data.num_main=400", "--set", "data.num_extra=100", "--set", "data.num_test=40",
        "--set", "data.seq_numbers=8", "--set", "data.max_ctx=48", "--set", "data.prompt_len=8",
        "--set", "data.mem_len=8", "--set", "data.num_noise=20", "--set", "data.dup_groups=0",
        "--set", "model.n_layer=2", "--set", "train.batch_size=32", "--set", "train.max_steps=60",
        "--set", "train.ckpt_every=10", "--set", "train.eval_every=30", "--set", "train.eval_batch_size=64"]


def _run(out, extra=(), wait=True):
    cmd = [sys.executable, "-m", "tinymem_fast", "train", *TINY, "--out", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def test_kill_and_resume_reaches_the_same_weights(tmp_path):
    ref = _run(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    proc = _run(tmp_path / "killed", wait=False)
    ck = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline:
        if ck.is_dir() and any(p.name.startswith("step-000000020") for p in ck.iterdir()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [p.name for p in ck.iterdir() if p.name.startswith("step-")]
    assert "step-000000060" not in done, "the run finished before it could be killed"
    again = _run(tmp_path / "killed")
    assert again.returncode == 0, again.stderr[-2000:]
    a = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
    hist = [json.loads(x) for x in open(tmp_path / "killed" / "metrics.jsonl")]
    assert [h["step"] for h in hist] == [30, 60]  # no duplicate rows after the resume
    ref_hist = [json.loads(x) for x in open(tmp_path / "ref" / "metrics.jsonl")]
    assert hist[-1]["mem"] == ref_hist[-1]["mem"]


@pytest.mark.parametrize("args,msg", [
    (["--preset", "nope"], "unknown preset"),
    (["--set", "data.nope=1"], "unknown setting"),
    (["--set", "data.family=square"], "unknown math family"),
    (["--set", "data.prompt_len=200"], "exceeds max_ctx"),
    (["--config", "/nonexistent.json"], "does not exist"),
])
def test_train_bad_input_fails_fast(tmp_path, args, msg):
    r = subprocess.run([sys.executable, "-m", "tinymem_fast", "train", *args, "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and msg in r.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_evaluation_from_hidden_states_equals_the_logits_path(arch, monkeypatch):
    """evaluate_lm scores through memscore (no [B, T, V] logits) when the head is plain; every metric
    equals the logits path's, and a diverged model reports NaN instead of raising."""
    import torch
    from tiny_models import T, V, tiny

    from tinymem_fast.tinymem import metrics

    model = tiny(arch).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (37, T), generator=g)
    pad = torch.zeros_like(ids, dtype=torch.bool)
    pad[::3, -5:] = True
    assert metrics.plain_head(model) is not None
    fast = metrics.evaluate_lm(model, ids, pad, batch_size=16)
    monkeypatch.setattr(metrics, "plain_head", lambda m: None)
    slow = metrics.evaluate_lm(model, ids, pad, batch_size=16)
    assert fast.keys() == slow.keys()
    for k in fast:
        assert fast[k] == pytest.approx(slow[k], rel=1e-5, abs=1e-6), k
    monkeypatch.undo()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "embed" in n or "wte" in n)[0, 0] = float("nan")
    ids[:, 0] = 0  # every row reads the NaN embedding row
    bad = metrics.evaluate_lm(model, ids, pad, batch_size=16)
    assert math.isnan(bad["loss"]) and math.isnan(bad["ppl_token"])
