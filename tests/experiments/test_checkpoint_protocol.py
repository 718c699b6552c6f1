"""Selection variants (utility_metric, group-mean memorization) with hand-computed scores, and unlearning
at any checkpoint of a run: `tinymem unlearn --model RUN/checkpoints/...`, `tinymem sweep --checkpoints`,
the report keyed by checkpoint, and a data mismatch refused in one line."""

import json
import math

import pytest
from tiny_runs import cli

from tinymem_fast.experiments.report import best_runs
from tinymem_fast.experiments.runs import locate, run_checkpoints
from tinymem_fast.tinymem.results import rescore, selection_score, utility

# --- selection variants, by hand ---------------------------------------------------------------------


def test_math_score_with_each_accuracy():
    before = {"mem": 50.0, "acc7/acc": 0.8, "acc7/acc_paper": 0.9, "acc2/acc": 0.5, "acc2/acc_paper": 0.6}
    after = {"mem": 25.0, "acc7/acc": 0.6, "acc7/acc_paper": 0.9, "acc2/acc": 0.5, "acc2/acc_paper": 0.3}
    # d_mem = -0.5; acc: mean(-25%, 0) = -0.125; acc_paper: mean(0, -50%) = -0.25; score = d_mem - d_util
    s = selection_score(before, after, "math", "mem")
    assert math.isclose(s["d_util"], -0.125) and math.isclose(s["score"], -0.375)
    s = selection_score(before, after, "math", "mem", "acc_paper")
    assert math.isclose(s["d_mem"], -0.5) and math.isclose(s["d_util"], -0.25)
    assert math.isclose(s["score"], -0.25)
    with pytest.raises(ValueError, match="does not apply to math"):
        selection_score(before, after, "math", "mem", "ppl_batchmean")


BASE = {"mem": 40.0, "avg_perc_mem": 25.0, "test/ppl_token": 10.0, "test/ppl_batchmean": 12.0}


def _row(name, mem, avg, ppl_token, ppl_bm):
    after = {"mem": mem, "avg_perc_mem": avg, "test/ppl_token": ppl_token, "test/ppl_batchmean": ppl_bm}
    return {"run_id": name, "method": "m", "model": "/runs/lang", "seed": 0, "mem_metric": "mem",
            "mem_before": BASE["mem"], "mem_after": mem, "utility_before": utility(BASE, "language"),
            "utility_after": utility(after, "language"), **selection_score(BASE, after, "language", "mem"),
            "base": BASE, "after": after}


# A: pooled 40 -> 20 (-0.5), group mean 25 -> 20 (-0.2), ppl_token +10%, ppl_batchmean +0%
# B: pooled 40 -> 30 (-0.25), group mean 25 -> 5 (-0.8), ppl_token -20%, ppl_batchmean +50%
ROWS = [_row("A", 20.0, 20.0, 11.0, 12.0), _row("B", 30.0, 5.0, 8.0, 18.0)]


@pytest.mark.parametrize("utility_metric,mem_metric,winner,score", [
    (None, None, "B", -0.45),                            # recorded: pooled + ppl_token: A -0.4, B -0.45
    ("ppl_batchmean", "mem", "A", -0.5),                 # A -0.5, B +0.25
    ("ppl_token", "avg_perc_mem", "B", -1.0),            # A -0.1, B -1.0
    ("ppl_batchmean", "avg_perc_mem", "B", -0.3),        # A -0.2, B -0.3
])
def test_best_run_follows_the_selection_variants(utility_metric, mem_metric, winner, score):
    best = best_runs(ROWS, utility_metric=utility_metric, mem_metric=mem_metric)
    (row,) = best.values()
    assert row["run_id"] == winner and math.isclose(row["score"], score, abs_tol=1e-12)
    if mem_metric:
        assert row["mem_metric"] == mem_metric and row["selection"]["mem_metric"] == mem_metric


def test_rescore_group_mean_falls_back_without_groups():
    base, after = {"mem": 10.0, "test/ppl_token": 5.0}, {"mem": 5.0, "test/ppl_token": 5.0}
    row = {"mem_metric": "mem", "utility_before": {"ppl_token": 5.0}, "base": base, "after": after}
    r = rescore(row, mem_metric="avg_perc_mem")   # one group: the group mean is the pooled figure
    assert r["mem_metric"] == "mem" and math.isclose(r["score"], -0.5)
    with pytest.raises(ValueError, match="before/after"):
        rescore({"mem_metric": "mem", "utility_before": {}}, mem_metric="mem")


# --- any checkpoint of a run ---------------------------------------------------------------------------


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_locate_and_select_checkpoints(tiny_run):
    cks = run_checkpoints(str(tiny_run), "all")
    assert len(cks) >= 2 and all(c.run_dir == str(tiny_run.resolve()) for c in cks)
    assert [c.step for c in cks] == sorted(c.step for c in cks)
    first = cks[0]
    assert locate(first.path) == first and locate(str(tiny_run)).label == "final"
    assert locate(str(tiny_run / "final")).run_dir == first.run_dir
    assert [c.label for c in run_checkpoints(str(tiny_run), f"{first.step},final")] == [first.label, "final"]
    with pytest.raises(ValueError, match="no checkpoint at step 7"):
        run_checkpoints(str(tiny_run), "7")


def test_unlearn_a_checkpoint(tiny_run, tmp_path):
    last = run_checkpoints(str(tiny_run), "all")[-1]
    r = cli("unlearn", "--model", last.path, "--method", "durable", "--hp", "ratio=0.05", "--out",
            str(tmp_path), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = _rows(tmp_path / "results.jsonl")
    assert row["checkpoint"] == last.label and row["model"] == last.path
    assert row["n_retain"] == row["retain_size"] == 2000 or row["n_retain"] == row["retain_pool"]
    assert row["selection"] == {"utility_metric": "acc", "mem_metric": "mem"}   # the quick preset's
    # other data than the run's: refused in one line before any work
    r = cli("unlearn", "--model", last.path, "--method", "durable", "--set", "data.num_noise=38",
            "--out", str(tmp_path / "x"), "--quiet")
    assert r.returncode == 2 and "is not the data" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_sweep_over_checkpoints_and_report(tiny_run, tmp_path):
    cks = run_checkpoints(str(tiny_run), "all")
    steps = ",".join(str(c.step) for c in cks[-2:])
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"durable": {"ratio": [0.05]}}))
    out = tmp_path / "sweep"
    r = cli("sweep", str(tiny_run), "--methods", "durable", "--grid", str(grid), "--checkpoints",
            f"{steps},final", "--retain-size", "all", "--mem-metric", "avg_perc_mem", "--out", str(out),
            "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(p.read_text()) for p in (out / "rows").glob("*.json")]
    labels = {row["checkpoint"] for row in rows}
    assert cks[-1].label in labels and "final" in labels
    for row in rows:
        assert row["retain_size"] is None and row["n_retain"] == row["retain_pool"]   # every clean row
        assert row["selection"]["mem_metric"] == "avg_perc_mem" == row["mem_metric"]
    r = cli("report", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    best = json.loads((out / "report" / "best_runs.json").read_text())
    assert {b["checkpoint"] for b in best} == labels
    assert any(b["setting"].endswith(f"@ {cks[-1].label}") for b in best)
    r = cli("sweep", str(tiny_run), "--methods", "durable", "--grid", str(grid), "--checkpoints", "12345",
            "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "no checkpoint at step 12345" in r.stderr


def test_csv_utility_columns_are_the_selected_utility(tmp_path):
    """results.csv's util_before/util_after are the utility d_util was computed from (ppl_batchmean here),
    not always the token perplexity."""
    import csv

    from tinymem_fast.tinymem.results import append_row

    row = {"run_id": "r", "model": "m", "method": "durable", "seed": 0, "hparams": {"ratio": 0.1},
           "mem_metric": "mem", "mem_before": 50.0, "mem_after": 10.0, "d_mem": -0.8,
           "utility_before": {"ppl_token": 20.0, "ppl_batchmean": 22.0},
           "utility_after": {"ppl_token": 25.0, "ppl_batchmean": 33.0}, "d_util": 0.5,
           "selection": {"utility_metric": "ppl_batchmean", "mem_metric": "mem"}, "score": -0.3,
           "time_method_s": 1.0, "n_forget": 4, "n_retain": 8}
    append_row(row, str(tmp_path))
    got = next(csv.DictReader(open(tmp_path / "results.csv")))
    assert (float(got["util_before"]), float(got["util_after"])) == (22.0, 33.0)
