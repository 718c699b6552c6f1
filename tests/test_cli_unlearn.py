"""`tinymem unlearn` from the command line on a tiny trained run: result rows, saved model, errors."""

import json
import subprocess
import sys

import pytest

TINY_SETS = ["data.num_main=400", "data.num_extra=100", "data.num_test=40", "data.seq_numbers=8",
             "data.max_ctx=48", "data.prompt_len=8", "data.mem_len=8", "data.num_noise=20",
             "data.dup_groups=2", "data.dup_base=30", "model.n_layer=2", "train.batch_size=32",
             "train.max_steps=150", "train.eval_batch_size=64"]


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "tinymem_fast", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    sets = [a for s in TINY_SETS for a in ("--set", s)]
    r = _cli("train", "--preset", "quick", "--quiet", "--out", str(out), *sets)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_unlearn_writes_row_and_model(trained, tmp_path):
    r = _cli("unlearn", "--method", "balanced_subnet", "--model", str(trained), "--quick-defaults",
             "--hp", "epochs=1", "--retain-size", "300", "--out", str(tmp_path), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    if "nothing is memorized" in r.stdout:
        pytest.skip("the tiny run memorized nothing (reported cleanly)")
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["method"] == "balanced_subnet" and rows[0]["n_retain"] == 300
    assert rows[0]["hparams"]["ratio"] == 0.1 and rows[0]["hparams"]["epochs"] == 1
    saved = list(tmp_path.glob("model-balanced_subnet-*/model.safetensors"))
    assert len(saved) == 1
    assert (tmp_path / "results.csv").read_text().startswith("run_id,")


@pytest.mark.parametrize("args,msg", [
    (["--method", "forgetful"], "unknown method"),
    (["--method", "subnet", "--hp", "ratio=5"], "open interval"),
    (["--method", "subnet", "--hp", "rate=0.1"], "no setting"),
])
def test_unlearn_bad_input(trained, tmp_path, args, msg):
    r = _cli("unlearn", "--model", str(trained), "--out", str(tmp_path), "--quiet", *args)
    assert r.returncode == 2 and msg in r.stderr, r.stderr[-1000:]


def test_unlearn_missing_model(tmp_path):
    r = _cli("unlearn", "--method", "subnet", "--model", str(tmp_path / "nope"), "--out", str(tmp_path))
    assert r.returncode == 2 and "does not exist" in r.stderr
