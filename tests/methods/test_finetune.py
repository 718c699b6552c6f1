"""Fine-tuning methods (SPEC 5.3): data selection (clean twins of exactly the artifact rows; extra = every
non-artifact row; both = union), the dataset view used for training, and `tinymem finetune` from a
trained run: AdamW state resumed, an evaluation per epoch, result rows in the unlearning schema."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tinymem_fast.methods.finetune import artifact_twins, finetune_dataset, finetune_rows
from tinymem_fast.tinymem.data import math as mathdata
from tinymem_fast.tinymem.data.dataset import DataConfig, build
from tinymem_fast.tinymem.memorization import memorization_stats
from tinymem_fast.tinymem.models import ModelConfig
from tinymem_fast.tinymem.training import build_model_for, epoch_order

ENV = dict(os.environ, OMP_NUM_THREADS="1")
MATH = dict(kind="math", num_main=300, num_extra=80, num_test=40, seq_numbers=8, max_ctx=48, prompt_len=8,
            mem_len=8)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def noise_data():
    return build(DataConfig(**MATH, artifact="noise", num_noise=20, dup_groups=2, dup_base=5), seed=0)


@pytest.fixture(scope="module")
def backdoor_data():
    return build(DataConfig(**MATH, artifact="backdoor", trigger="12", backdoor_dup=3), seed=0)


def _rows(t):
    return {tuple(r.tolist()) for r in t}


def test_clean_twins_of_noise_rows(noise_data):
    d = noise_data
    ids, pad = artifact_twins(d)
    assert torch.equal(ids, d.clean_twins)
    # the twin's own padding: everything after its encoded text (a noised number may change its length)
    for twin, p in zip(ids, pad, strict=True):
        n = twin.tolist().index(mathdata.EOS) + 1          # content ends with the EOS token
        assert not p[:n].any() and p[n:].all()
    assert (ids != d.rows[d.artifact_rows]).any(1).any()    # twins differ from what was trained on
    main = mathdata.family_numbers(d.config.family, d.config.main_const, d.config.num_main,
                                   d.config.seq_numbers, d.config.modulus)
    clean_main = {mathdata.to_text(n) for n in main}
    for twin, noised in zip(ids, d.rows[d.artifact_rows], strict=True):
        t, z = (mathdata.decode([i for i in r.tolist() if i != mathdata.PAD]) for r in (twin, noised))
        assert t in clean_main                                   # an untouched main-set sequence ...
        a, b = [int(v) for v in t.strip("^$").split()], [int(v) for v in z.strip("^$").split()]
        assert len(a) == len(b) and all(abs(x - y) <= 1 for x, y in zip(a, b, strict=True))  # ... its twin


def test_clean_twins_of_poisoned_rows(backdoor_data):
    d = backdoor_data
    ids, pad = artifact_twins(d)
    fill = d.config.backdoor_fill_id
    main = mathdata.family_numbers(d.config.family, d.config.main_const, d.config.num_main,
                                   d.config.seq_numbers, d.config.modulus)
    clean_main = _rows(mathdata.pad_rows([mathdata.encode(mathdata.to_text(n)) for n in main],
                                         d.config.max_ctx)[0])
    assert ids.shape[0] == d.artifact_rows.numel() > 0
    for k, r in enumerate(d.artifact_rows.tolist()):
        s = int(d.poison_train_start[k])
        twin, poisoned = ids[k], d.rows[r]
        assert tuple(twin.tolist()) in clean_main                 # an untouched main-set sequence
        assert torch.equal(twin[:s], poisoned[:s])                # same prompt through the trigger
        assert (poisoned[s:] == fill).all() and not (twin[s:] == fill).all()
        assert d.config.trigger in mathdata.decode(twin[~pad[k]].tolist())


def test_clean_twins_of_poisoned_language_chunks(tmp_path):
    c = DataConfig(kind="language", artifact="backdoor", max_ctx=32, prompt_len=8, mem_len=8,
                   bpe_vocab_size=300, max_train_chunks=400, max_test_chunks=50)
    d = build(c, seed=0, workdir=str(tmp_path))
    ids, pad = artifact_twins(d)
    assert ids.shape[0] == d.artifact_rows.numel() > 0
    for k, r in enumerate(d.artifact_rows.tolist()):
        s = int(d.poison_train_start[k])
        assert ids[k, s - 1] == d.meta["trigger_id"] and torch.equal(ids[k, :s], d.rows[r, :s])
        assert (d.rows[r, s:] == c.backdoor_fill_id).all()
        rest = ids[k, s:][~pad[k, s:]]
        assert rest.numel() == 0 or not (rest == c.backdoor_fill_id).all()   # the original text follows


def test_extra_and_both_selection(noise_data):
    d = noise_data
    art = set(d.artifact_rows.tolist())
    ids, pad, copies = finetune_rows(d, "extra")
    keep = [i for i in range(d.rows.shape[0]) if i not in art]
    assert torch.equal(ids, d.rows[keep]) and torch.equal(pad, d.pad[keep])
    assert torch.equal(copies, d.copies[keep])
    assert not _rows(ids) & _rows(d.rows[d.artifact_rows])   # no noised row
    both = finetune_rows(d, "both")
    clean = finetune_rows(d, "clean")
    assert torch.equal(both[0], torch.cat([ids, clean[0]])) and torch.equal(clean[2], torch.ones(20).long())
    assert int(both[2].sum()) == int(copies.sum()) + 20
    with pytest.raises(ValueError, match="unknown fine-tuning data"):
        finetune_rows(d, "some")


def test_finetune_view_trains_only_selected_rows_and_keeps_metrics(noise_data):
    d = noise_data
    view = finetune_dataset(d, "clean")
    order = epoch_order(view.copies, 0, 0)
    assert view.num_train == 20 and sorted(order.tolist()) == list(range(20))
    assert torch.equal(view.rows[order.sort().values], d.clean_twins)
    model = build_model_for(d, ModelConfig(n_layer=1, d_model=32, n_head=2, d_mlp=64)).eval()
    assert memorization_stats(model, view, 64) == memorization_stats(model, d, 64)


# --- command line ---------------------------------------------------------------------------------

SETS = [f"data.{k}={v}" for k, v in MATH.items() if k != "kind"] + \
       ["data.num_noise=20", "data.dup_groups=2", "data.dup_base=5", "model.n_layer=2", "model.d_model=32",
        "model.n_head=2", "model.d_mlp=64", "train.batch_size=32", "train.max_steps=12",
        "train.eval_batch_size=128"]


def _cli(*args):
    """The CLI's own parser and handlers, in-process (no interpreter start-up per call)."""
    from tinymem_fast.cli import main

    return main(list(args))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("ft") / "run"
    assert _cli("train", "--preset", "quick", "--quiet", "--out", str(run),
                *[a for s in SETS for a in ("--set", s)]) == 0
    return run


# unique training rows: 300 - 40 main (20 of them noised) + 4 x (80 - 40) auxiliary = 420
N_ROWS = {"clean": 20, "extra": 400, "both": 420}


@pytest.mark.parametrize("which", ["clean", "extra", "both"])
def test_cli_finetune(trained, tmp_path, which):
    res = tmp_path / "res"
    assert _cli("finetune", str(trained), "--data", which, "--epochs", "2", "--out", str(res), "--quiet") == 0
    (row,) = [json.loads(x) for x in (res / "results.jsonl").read_text().splitlines()]
    assert row["method"] == f"{which}_ft" and row["category"] == "fine-tuning"
    assert row["hparams"]["data"] == which
    assert row["hparams"]["lr"] == 1e-3 and row["hparams"]["batch_size"] == 32 and row["time_method_s"] > 0
    final = json.loads((trained / "final_metrics.json").read_text())
    assert row["mem_before"] == final["mem"] and row["utility_before"]["acc"] == final["avg_acc"]
    info = row["method_info"]
    spe = -(-N_ROWS[which] // 32)
    assert info["source_step"] == 12 and info["steps"] == 2 * spe and info["n_rows"] == N_ROWS[which]
    assert [h["epoch"] for h in info["history"]] == [1.0, 2.0]      # evaluated every epoch
    assert row["after"]["mem"] == info["history"][-1]["mem"]
    # AdamW continued: its step counts run on from the training checkpoint's
    ck = os.path.join(info["run_dir"], "checkpoints", f"step-{info['steps']:09d}", "trainer_state.pt")
    opt = torch.load(ck, weights_only=True)["optimizer"]
    assert float(next(iter(opt["state"].values()))["step"]) == 12 + info["steps"]
    assert (res / "results.csv").read_text().splitlines()[1].split(",")[2] == f"{which}_ft"


def test_cli_finetune_bad_input(tmp_path, capsys):
    assert _cli("finetune", str(tmp_path / "nope"), "--out", str(tmp_path)) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _cli("finetune", str(tmp_path / "empty"), "--out", str(tmp_path)) == 2
    assert "no training checkpoint" in capsys.readouterr().err
    r = subprocess.run([sys.executable, "-m", "tinymem_fast", "finetune", str(tmp_path / "empty"), "--data",
                        "dirty"], capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 2 and "invalid choice" in r.stderr
