"""A run folder belongs to one configuration: resuming under other settings is refused, --no-resume starts
clean, a checkpoint past the configured end is never loaded, a corrupt newest checkpoint falls back to the
one before it, and numeric settings are range-checked before anything runs."""

import json
import logging
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from tinymem_fast.tinymem.presets import apply_overrides, get_preset
from tinymem_fast.tinymem.training import train_run

SETS = ["data.num_main=300", "data.num_extra=60", "data.num_test=30", "data.seq_numbers=8", "data.max_ctx=48",
        "data.prompt_len=8", "data.mem_len=8", "data.num_noise=20", "data.dup_groups=0", "model.n_layer=1",
        "model.d_model=32", "model.n_head=2", "model.d_mlp=64", "train.batch_size=32", "train.max_steps=30",
        "train.ckpt_every=10", "train.eval_every=0", "train.eval_batch_size=64"]


def _cfg(*extra):
    return apply_overrides(get_preset("quick"), [*SETS, *extra])


def _final(out):
    return load_file(os.path.join(out, "final", "model.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _steps(out):
    return sorted(int(p.split("-")[1]) for p in os.listdir(os.path.join(out, "checkpoints")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """30 steps in one go, and 20 steps (a run cut short), for comparisons."""
    base = tmp_path_factory.mktemp("ref")
    train_run(_cfg(), str(base / "30"), progress=False)
    train_run(_cfg("train.max_steps=20"), str(base / "20"), progress=False)
    return {30: _final(str(base / "30")), 20: _final(str(base / "20"))}


def test_resume_with_another_configuration_is_refused(tmp_path):
    out = str(tmp_path / "run")
    train_run(_cfg("train.max_steps=10"), out, progress=False)
    before = open(os.path.join(out, "run.json")).read()
    for change, named in [("train.lr=0.002", "train.lr"), ("data.num_noise=21", "data.num_noise"),
                          ("model.d_mlp=32", "model.d_mlp"), ("seed=1", "seed")]:
        with pytest.raises(ValueError, match=rf"another configuration \({named}.*--no-resume"):
            train_run(_cfg("train.max_steps=10", change), out, progress=False)
    # the record still describes the model in the folder
    assert open(os.path.join(out, "run.json")).read() == before


def test_extending_a_run_resumes_it_exactly(tmp_path, reference):
    """How long a run goes is not part of its identity: 20 steps, then 30, equals 30 in one go."""
    out = str(tmp_path / "run")
    train_run(_cfg("train.max_steps=20"), out, progress=False)
    train_run(_cfg(), out, progress=False)
    assert _same(_final(out), reference[30])


def test_a_checkpoint_past_the_end_is_never_loaded(tmp_path, reference):
    out = str(tmp_path / "run")
    train_run(_cfg(), out, progress=False)          # checkpoints at 10, 20, 30
    r = train_run(_cfg("train.max_steps=20"), out, progress=False)
    assert r["step"] == 20 and _same(_final(out), reference[20])


def test_no_resume_starts_a_clean_folder(tmp_path, reference):
    out = str(tmp_path / "run")
    train_run(_cfg(), out, progress=False)
    train_run(_cfg("train.max_steps=20"), out, resume=False, progress=False)
    assert _steps(out) == [10, 20]                  # the old run's step-30 checkpoint is gone
    hist = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [h["step"] for h in hist] == [20]
    # a later plain rerun resumes the new run, not the old one's last checkpoint
    train_run(_cfg("train.max_steps=20"), out, progress=False)
    assert _same(_final(out), reference[20])


def test_corrupt_newest_checkpoint_falls_back(tmp_path, reference, caplog):
    out = str(tmp_path / "run")
    train_run(_cfg(), out, progress=False)
    newest = os.path.join(out, "checkpoints", "step-000000030", "model.safetensors")
    with open(newest, "r+b") as f:                  # a copy cut short
        f.truncate(100)
    with caplog.at_level(logging.WARNING):
        train_run(_cfg(), out, progress=False)
    assert "step-000000030" in caplog.text and "unreadable" in caplog.text
    assert _same(_final(out), reference[30])        # resumed at 20, trained 10 steps again
    # a corrupt optimizer state is handled the same way
    with open(os.path.join(out, "checkpoints", "step-000000030", "trainer_state.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    train_run(_cfg(), out, progress=False)
    assert _same(_final(out), reference[30])


def test_checkpoints_without_a_record_are_refused(tmp_path):
    out = str(tmp_path / "run")
    train_run(_cfg("train.max_steps=10"), out, progress=False)
    os.remove(os.path.join(out, "run.json"))
    with pytest.raises(ValueError, match="no run.json"):
        train_run(_cfg("train.max_steps=10"), out, progress=False)


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = str(tmp_path / "run")
        train_run(_cfg("train.max_steps=10"), out, progress=False)
    finally:
        os.umask(old)
    for rel in ("run.json", "final_metrics.json", "final", "final/model.safetensors",
                "checkpoints/step-000000010"):
        mode = stat.S_IMODE(os.stat(os.path.join(out, rel)).st_mode)
        assert mode & 0o044 == 0o044, f"{rel} is {oct(mode)}: not readable by others"


@pytest.mark.parametrize("setting,msg", [
    ("train.batch_size=0", "train.batch_size must be"), ("train.batch_size=-4", "train.batch_size must be"),
    ("train.max_steps=0", "train.max_steps must be"), ("train.epochs=0", "train.epochs must be"),
    ("train.lr=0", "train.lr must be"), ("train.betas=[0.9]", "train.betas must be"),
    ("model.n_head=0", "model.n_head must be"), ("model.n_layer=0", "model.n_layer must be"),
    ("data.num_main=0", "data.num_main must be"), ("data.num_test=0", "data.num_test must be"),
    ("data.num_noise=0", "data.num_noise must be"), ("data.num_extra=-1", "data.num_extra must be"),
    ("data.backdoor_test_frac=1", "data.backdoor_test_frac must be"),
])
def test_numeric_settings_are_checked(setting, msg):
    with pytest.raises(ValueError, match=msg):
        _cfg(setting)
