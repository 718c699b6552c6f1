"""`tinymem unlearn` from the command line on a tiny trained run: result rows, saved model, errors."""

import json

import pytest
from tiny_runs import cli, train_tiny

_cli = cli
_train = train_tiny


@pytest.fixture(scope="module")
def trained(tiny_run):
    return tiny_run


# every unlearning method at a tiny setting (Greedy: a few weights; SOU, IG: few gradients / steps)
ALL_HP = ["--hp", "ratio=0.05", "--hp", "epochs=1", "--hp", "greedy:ratio=2e-5", "--hp", "sou_num_grads=16",
          "--hp", "ig_steps=2"]


def _run_all(run_dir, out):
    from tinymem_fast.methods import method_names

    r = _cli("unlearn", "--method", "all", "--model", str(run_dir), "--retain-size", "200", "--out", str(out),
             "--quiet", *ALL_HP)
    assert r.returncode == 0, r.stderr[-2000:]
    # the tiny runs memorize several rows on every CPU tried (tiny_runs.py): an empty forget set is a failure
    assert "nothing is memorized" not in r.stdout, r.stdout[-2000:]
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [row["method"] for row in rows] == method_names()
    assert all(row["n_forget"] >= 1 and row["mem_before"] > 0 for row in rows)
    base = {(row["mem_before"], json.dumps(row["base"], sort_keys=True)) for row in rows}
    assert len(base) == 1  # one shared base evaluation, every method from a fresh copy
    for row in rows:
        assert 0.0 <= row["mem_after"] <= 100.0 and row["time_method_s"] > 0, row["method"]
        assert len(list(out.glob(f"model-{row['method']}-*/model.safetensors"))) == 1
    return rows


def test_unlearn_all_methods_gpt2(trained, tmp_path):
    _run_all(trained, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_unlearn_all_methods_other_archs(arch, tmp_path):
    _run_all(_train(tmp_path / "run", arch), tmp_path / "out")


def test_hp_scoping_errors(trained, tmp_path):
    r = _cli("unlearn", "--method", "greedy,durable", "--model", str(trained), "--out", str(tmp_path),
             "--hp", "ig_steps=3")
    assert r.returncode == 2 and "no setting 'ig_steps'" in r.stderr
    r = _cli("unlearn", "--method", "greedy", "--model", str(trained), "--out", str(tmp_path),
             "--hp", "durable:ratio=0.1")
    assert r.returncode == 2 and "not among --method" in r.stderr


def test_unlearn_writes_row_and_model(trained, tmp_path):
    r = _cli("unlearn", "--method", "balanced_subnet", "--model", str(trained), "--quick-defaults",
             "--hp", "epochs=1", "--retain-size", "300", "--out", str(tmp_path), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "nothing is memorized" not in r.stdout, r.stdout[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["method"] == "balanced_subnet" and rows[0]["n_retain"] == 300
    assert rows[0]["n_forget"] >= 1 and rows[0]["mem_before"] > 0
    from tinymem_fast.experiments.demo import QUICK_METHODS

    want = QUICK_METHODS["balanced_subnet"]["ratio"]  # --quick-defaults, with --hp on top
    assert rows[0]["hparams"]["ratio"] == want and rows[0]["hparams"]["epochs"] == 1
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
