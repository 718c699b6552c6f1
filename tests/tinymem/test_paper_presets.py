"""The paper presets build their data and train on a CPU; their window rule, retain sets and selection
variants are the paper's, the quick presets keep today's."""

import json

import pytest
import torch
from tiny_runs import cli

from tinymem_fast.tinymem.data import artifacts
from tinymem_fast.tinymem.data.dataset import DataConfig, build
from tinymem_fast.tinymem.presets import PRESETS, apply_overrides, get_preset

PAPER = sorted(p for p in PRESETS if p.startswith("paper-"))


def _train(preset, out, *sets):
    args = [a for s in ["train.max_steps=2", *sets] for a in ("--set", s)]
    r = cli("train", "--preset", preset, "--quiet", "--out", str(out), *args)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads((out / "run.json").read_text())
    final = json.loads((out / "final_metrics.json").read_text())
    assert (out / "final" / "model.safetensors").exists() and final["step"] == 2
    return info, final


def test_paper_math_noise_trains_on_cpu(tmp_path):
    # the paper's rows and windows (20 numbers up to ~20,000, context 150, prompt 50 + window 50); fewer
    # noised and test rows only, so the evaluation stays short
    info, final = _train("paper-math-noise", tmp_path, "data.num_noise=200", "data.num_test=100",
                         "data.num_extra=200", "train.batch_size=32")
    meta = info["data_meta"]
    assert info["config"]["data"]["window_rule"] == "padded" and info["config"]["train"]["loss_on_pad"]
    assert meta["window_past_end"] > 0           # some windows end in EOS / padding, and still count
    assert 0 < meta["eligible"] < 200 and final["n_eligible"] == meta["eligible"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", PAPER)
def test_every_paper_preset_trains_on_cpu(preset, tmp_path):
    info, final = _train(preset, tmp_path)
    assert info["preset"] == preset
    assert ("asr" in final) if "backdoor" in preset else ("mem" in final)


def test_window_rules():
    small = dict(num_main=300, num_extra=50, num_test=30, seq_numbers=8, max_ctx=60, prompt_len=20,
                 mem_len=30, num_noise=40, noise_p=0.2)
    with pytest.raises(ValueError, match="window_rule=padded"):
        build(DataConfig(**small))  # rows of ~27-40 tokens end before the window does
    d = build(DataConfig(**small, window_rule="padded"))
    noised, clean = d.rows[d.artifact_rows], d.clean_twins
    # eligibility is positional over the padded row: EOS and pads compared like digits
    want = [bool((noised[i, 20:50] != clean[i, 20:50]).any()) for i in range(40)]
    assert artifacts.window_eligible(noised, clean, 20, 30).tolist() == want
    assert d.meta["eligible"] == sum(want) and d.meta["window_past_end"] == 40
    with pytest.raises(ValueError, match="window_rule"):
        DataConfig(window_rule="anything").validate()


def test_window_eligible_by_hand():
    clean = torch.tensor([[1, 2, 3, 11, 13, 13], [1, 2, 3, 4, 11, 13], [1, 2, 3, 11, 13, 13]])
    noised = torch.tensor([[1, 2, 3, 11, 13, 13], [1, 2, 3, 5, 11, 13], [1, 2, 3, 3, 11, 13]])
    # row 0 equal; row 1 differs at 3; row 2's end moved one place: EOS vs a digit at 3, pad vs EOS at 4
    assert artifacts.window_eligible(noised, clean, 2, 4).tolist() == [False, True, True]
    assert artifacts.window_eligible(noised, clean, 4, 2).tolist() == [False, False, True]


def test_protocol_defaults_per_preset():
    for name in PAPER:
        p = get_preset(name).protocol
        lang = "language" in name
        assert p.retain_size == (100_000 if lang else None)          # SPEC 6.2
        assert p.utility_metric == ("ppl_batchmean" if lang else "acc_paper")
        assert p.mem_metric == "avg_perc_mem"
        assert get_preset(name).train.loss_on_pad and get_preset(name).data.window_rule == "padded"
    for name in (n for n in PRESETS if n.startswith("quick-")):
        p = get_preset(name).protocol
        assert (p.retain_size, p.utility_metric, p.mem_metric) == (2000, None, "mem")
        assert get_preset(name).data.window_rule == "content" and not get_preset(name).train.loss_on_pad
    with pytest.raises(ValueError, match="does not apply to math data"):
        apply_overrides(get_preset("quick"), ["protocol.utility_metric=ppl_batchmean"])
    with pytest.raises(ValueError, match="mem_metric"):
        apply_overrides(get_preset("quick"), ["protocol.mem_metric=median"])
    with pytest.raises(ValueError, match="retain_size"):
        apply_overrides(get_preset("quick"), ["protocol.retain_size=0"])
