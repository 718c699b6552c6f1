"""`tinymem demo` end to end on a tiny configuration (the real one takes minutes): files, rows, reuse."""

import json

from tiny_runs import TINY_SETS

from tinymem_fast.experiments.demo import run_demo
from tinymem_fast.tinymem.presets import apply_overrides, get_preset

TINY = [*TINY_SETS, "train.ckpt_every=0", "train.eval_every=0"]
METHODS = {"balanced_subnet": dict(ratio=0.1, lr=1.0, loss_weight=0.9, epochs=1, batch_size=32),
           "subnet": dict(ratio=0.05, lr=1.0, epochs=2, batch_size=32)}


def test_demo_writes_table_rows_and_plot(tmp_path):
    cfg = apply_overrides(get_preset("quick"), TINY)
    said = []
    rows = run_demo(str(tmp_path), cfg=cfg, methods=METHODS, progress=False, say=said.append,
                    precision="fp32")  # the same numerics on every CPU
    text = "\n".join(said)
    assert "[1/3] training" in text
    # the tiny model memorizes 9 of its 23 eligible noised rows (x30 group: 9 of 12), on every CPU tried
    assert rows, text
    assert [r["method"] for r in rows] == ["balanced_subnet", "subnet"]
    for name in ("table.md", "results.jsonl", "results.csv", "memorization_vs_accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(r["mem_before"] > 0 for r in lines)
    assert (tmp_path / "memorization_vs_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    # the model folder is a whole `tinymem train` run: sweeps, unlearn and finetune take it
    assert (tmp_path / "model" / "final_metrics.json").exists() and (tmp_path / "model" / "run.json").exists()
    table = (tmp_path / "table.md").read_text()
    assert "| base |" in table and "balanced_subnet" in table
    # a second run reuses the trained model
    said.clear()
    run_demo(str(tmp_path), cfg=cfg, methods=METHODS, progress=False, say=said.append, precision="auto")
    assert any("reusing the trained model" in s and "trained in fp32" in s for s in said)


def test_auto_precision_follows_the_hardware(monkeypatch):
    import pytest
    import torch

    from tinymem_fast.integrations import mixed_precision as mp

    assert mp.resolve_precision("fp32") == "fp32" and mp.resolve_precision("bf16") == "bf16"
    assert mp.resolve_precision("auto", "cuda") == "bf16"
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        assert mp.resolve_precision("auto", "cpu") == want
    with pytest.raises(ValueError, match="unknown precision"):
        mp.resolve_precision("fp8")


def test_info_says_what_auto_precision_picks(monkeypatch):
    import torch

    from tinymem_fast.cli.info import collect, format_report

    for native, want in ((True, "runs bf16 on this CPU"), (False, "runs fp32 on this CPU")):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        info = collect()
        assert want in info["precision auto"] and want in format_report(info)
