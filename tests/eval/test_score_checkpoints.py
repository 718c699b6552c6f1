"""`tinymem score --checkpoints`: memorization of the same sequences under every checkpoint of a run."""

import json

import numpy as np
from tiny_runs import cli

from tinymem_fast.eval.checkpoints import expand_checkpoints
from tinymem_fast.eval.scoring import score_exact
from tinymem_fast.methods.finetune import load_run
from tinymem_fast.tinymem.models import load_model


def test_checkpoints_of_a_run(tiny_run, tmp_path):
    from tinymem_fast.tinymem.data.dataset import build

    cfg, _ = load_run(str(tiny_run))
    data = build(cfg.data, seed=cfg.seed)
    rows = data.rows[data.artifact_rows][:, :16]
    np.save(tmp_path / "noised.npy", rows.numpy())
    cks = expand_checkpoints([str(tiny_run)])
    assert [s for s, _ in cks] == sorted(s for s, _ in cks) and len(cks) >= 2
    out = tmp_path / "out"
    r = cli("score", "--checkpoints", str(tiny_run), "--input", str(tmp_path / "noised.npy"),
            "--prefix-len", "8", "--suffix-len", "8", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(x) for x in (out / "checkpoints.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [s for s, _ in cks]
    for rec, (_, path) in zip(recs, cks, strict=True):
        want = score_exact(load_model(path), rows, 8, 8).exact
        assert rec["n_exact"] == int(want.sum()) and rec["n"] == rows.shape[0]
    assert (out / "memorization_over_training.png").read_bytes()[:4] == b"\x89PNG"


def test_checkpoints_bad_folder(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 16), dtype=np.int64))
    r = cli("score", "--checkpoints", str(tmp_path), "--input", str(tmp_path / "x.npy"),
            "--prefix-len", "8", "--suffix-len", "8", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "neither a model folder" in r.stderr
