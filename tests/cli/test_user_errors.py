"""Inputs that used to give a wrong result with exit code 0, lose finished work, or print a traceback:
each now fails in one line on stderr with exit code 2, before the work starts."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from tiny_runs import cli
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
)

from tinymem_fast.integrations.loading import load_causal_lm
from tinymem_fast.tinymem.models import load_model


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    lines = [x for x in r.stderr.strip().splitlines() if not x.startswith("[transformers]")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(autouse=True)
def _ci_logging(monkeypatch):
    """Under ``CI=true`` transformers lets its records reach the root logger too; the one-line promise
    must hold there (a root handler of ours printed each of its warnings twice)."""
    monkeypatch.setenv("CI", "true")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A causal GPT-2, a BERT encoder, and a folder whose weights belong to another architecture."""
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=24, n_embd=16, n_layer=1, n_head=2,
                                      bos_token_id=None, eos_token_id=None))
    gpt2.save_pretrained(d / "gpt2")
    bert = BertForMaskedLM(BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=32,
                                      max_position_embeddings=24))
    bert.save_pretrained(d / "bert")
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=32,
                                            max_position_embeddings=24))
    neox.save_pretrained(d / "neox")
    os.makedirs(d / "mixed")
    shutil.copy(d / "gpt2" / "config.json", d / "mixed" / "config.json")
    shutil.copy(d / "neox" / "model.safetensors", d / "mixed" / "model.safetensors")
    np.save(d / "seqs.npy", np.random.default_rng(0).integers(0, 20, size=(6, 16)))
    return d


@pytest.mark.parametrize("loader", [load_causal_lm, load_model])
def test_encoder_and_foreign_weights_are_refused(folders, loader):
    assert loader(str(folders / "gpt2")) is not None
    with pytest.raises(ValueError, match="bert encoder .bidirectional attention"):
        loader(str(folders / "bert"))
    with pytest.raises(ValueError, match="weights are missing from its checkpoint.*random weights"):
        loader(str(folders / "mixed"))


@pytest.mark.parametrize("which,msg", [("bert", "bidirectional attention"), ("mixed", "random weights")])
def test_score_refuses_what_it_cannot_score(folders, tmp_path, which, msg):
    r = cli("score", str(folders / which), "--input", str(folders / "seqs.npy"), "--prefix-len", "8",
            "--suffix-len", "8", "--out", str(tmp_path / "o"), "--quiet")
    _one_line_error(r, msg)
    assert not (tmp_path / "o" / "score.jsonl").exists()


@pytest.mark.parametrize("kind", ["file", "readonly"])
def test_unusable_out_fails_before_the_work(folders, tmp_path, kind):
    if kind == "file":
        out = tmp_path / "taken"
        out.write_text("a file, not a folder")
        why = "a file of that name is in the way"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o500)
        why = "Permission denied"
    r = cli("score", str(folders / "gpt2"), "--input", str(folders / "seqs.npy"), "--prefix-len", "8",
            "--suffix-len", "8", "--out", str(out), "--quiet")
    _one_line_error(r, "cannot write results to --out", why)


def test_unlearn_checks_every_method_before_the_first(tiny_run, tmp_path):
    out = tmp_path / "res"
    r = cli("unlearn", "--model", str(tiny_run), "--method", "durable,subnet", "--hp", "subnet:epochs=0",
            "--out", str(out), "--quiet")
    _one_line_error(r, "subnet: epochs must be > 0")
    assert not (out / "results.jsonl").exists()  # durable did not run first
    assert not any(p.name.startswith("model-") for p in out.iterdir()) if out.exists() else True


@pytest.mark.parametrize("size", ["-5", "0", "many"])
def test_retain_size_must_be_a_count(tiny_run, tmp_path, size):
    r = cli("unlearn", "--model", str(tiny_run), "--method", "durable", "--retain-size", size,
            "--out", str(tmp_path / "res"), "--quiet")
    assert r.returncode == 2 and "--retain-size" in r.stderr and "Traceback" not in r.stderr


def test_retain_size_checked_in_the_library():
    from tinymem_fast.experiments.unlearning import retain_set

    with pytest.raises(ValueError, match="retain_size must be a whole number >= 1"):
        retain_set(None, torch.tensor([0]), -5, 0)


@pytest.mark.parametrize("setting", ["train.batch_size=0", "train.max_steps=0", "model.n_head=0",
                                     "data.num_main=0", "data.num_test=0"])
def test_train_numeric_settings_fail_in_one_line(tmp_path, setting):
    r = cli("train", "--preset", "quick", "--set", setting, "--out", str(tmp_path / "run"), "--quiet")
    _one_line_error(r, setting.split("=")[0])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_refuses_to_resume_another_configuration(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = (run / "run.json").read_text()
    cfg = json.loads(before)["config"]
    cfg["train"]["lr"] *= 2
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    r = cli("train", "--preset", "quick", "--config", str(tmp_path / "cfg.json"), "--out", str(run),
            "--quiet")
    _one_line_error(r, "holds a run of another configuration (train.lr", "--no-resume")
    assert (run / "run.json").read_text() == before


def _case_files(folders, tmp_path, tiny_run):
    """Builds the inputs of the listed cases; returns name -> (argv, what the one line must contain)."""
    d = tmp_path
    seqs = str(folders / "seqs.npy")
    score = ["score", str(folders / "gpt2"), "--input", seqs, "--prefix-len", "8", "--suffix-len", "8",
             "--out", str(d / "o"), "--quiet"]
    # a GPT-2 whose EOS id (GPT-2's 50256) lies outside its 20-token vocabulary
    eos = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=24, n_embd=16, n_layer=1, n_head=2))
    eos.save_pretrained(d / "eos")
    # pickled weights that are more than tensors
    (d / "pickled").mkdir()
    shutil.copy(folders / "gpt2" / "config.json", d / "pickled" / "config.json")
    torch.save({"weights": _NotATensor()}, d / "pickled" / "pytorch_model.bin")
    # a model with fewer token ids than the run's data
    small = GPT2LMHeadModel(GPT2Config(vocab_size=10, n_positions=64, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=None, eos_token_id=None))
    small.save_pretrained(d / "small")
    (d / "list.json").write_text("[1, 2]")
    (d / "broken.yaml").write_text("train:\n  lr: [1\n")
    (d / "types.json").write_text(json.dumps({"train": {"batch_size": "many"}}))
    (d / "scalar_grid.json").write_text(json.dumps({"durable": 5}))
    (d / "text_grid.json").write_text(json.dumps({"durable": {"ratio": ["tiny"]}}))
    (d / "big.jsonl").write_text(json.dumps({"ids": [1] * 15 + [2**70]}) + "\n")
    (d / "latin1.jsonl").write_bytes(json.dumps({"ids": [1] * 16}).encode() + b"\n{\"text\": \"caf\xe9\"}\n")
    (d / "rows").mkdir()
    (d / "rows" / "r1.json").write_text('{"method": "durable", ')
    train = ["train", "--preset", "quick", "--out", str(d / "run"), "--quiet"]
    sweep = ["sweep", str(tiny_run), "--methods", "durable", "--out", str(d / "sw"), "--quiet", "--grid"]
    return {
        "device_bogus": (score + ["--device", "bogus"], "--device 'bogus' is not a device"),
        "backend_unavailable": (score + ["--backend", "cuda"], "cuda"),
        "suppress_eos_outside_vocab": (["score", str(d / "eos"), "--input", seqs, "--prefix-len", "8",
                                        "--suffix-len", "8", "--out", str(d / "o"), "--suppress-eos"],
                                       "EOS id 50256 is outside its vocabulary of 20"),
        "unsafe_pickle": (["score", str(d / "pickled"), "--input", seqs, "--prefix-len", "8", "--suffix-len",
                           "8", "--out", str(d / "o")], "never unpickled here"),
        "unlearn_vocab_mismatch": (["unlearn", "--model", str(d / "small"), "--method", "durable", "--out",
                                    str(d / "u"), "--quiet"], "vocabulary of 10 ids but the data uses 14"),
        "train_device": (train + ["--set", "train.device=gpu7"], "train.device 'gpu7' is not a device"),
        "set_section": (train + ["--set", "data=5"], "'data' is a section, not a setting"),
        "config_not_mapping": (train + ["--config", str(d / "list.json")], "must hold a mapping of sections"),
        "config_broken_yaml": (train + ["--config", str(d / "broken.yaml")], "is not valid YAML at line"),
        "config_wrong_type": (train + ["--config", str(d / "types.json")], "setting 'train.batch_size'"),
        "unknown_section": (train + ["--set", "optim.lr=1"], "has no section 'optim'"),
        "grid_scalar": (sweep + [str(d / "scalar_grid.json")], "'durable' must map to settings"),
        "grid_not_numeric": (sweep + [str(d / "text_grid.json")], "durable:ratio"),
        "id_too_large": (["score", str(folders / "gpt2"), "--input", str(d / "big.jsonl"), "--prefix-len",
                          "8", "--suffix-len", "8", "--out", str(d / "o")], "big.jsonl:1: token id"),
        "not_utf8": (["score", str(folders / "gpt2"), "--input", str(d / "latin1.jsonl"), "--prefix-len",
                      "8", "--suffix-len", "8", "--out", str(d / "o")], "latin1.jsonl:2: not UTF-8"),
        "broken_row": (["report", str(d / "rows" / "r1.json"), "--out", str(d / "rep")],
                       "r1.json:1: a broken"),
    }


class _NotATensor:
    def __reduce__(self):
        return (print, ("this must never run",))


CASES = ["device_bogus", "backend_unavailable", "suppress_eos_outside_vocab", "unsafe_pickle",
         "unlearn_vocab_mismatch", "train_device", "set_section", "config_not_mapping",
         "config_broken_yaml", "config_wrong_type", "unknown_section", "grid_scalar", "grid_not_numeric",
         "id_too_large", "not_utf8", "broken_row"]


@pytest.mark.parametrize("case", CASES)
def test_listed_case_fails_in_one_line(folders, tiny_run, tmp_path, case):
    argv, needle = _case_files(folders, tmp_path, tiny_run)[case]
    r = cli(*argv)
    _one_line_error(r, needle)
    assert "this must never run" not in r.stdout + r.stderr
