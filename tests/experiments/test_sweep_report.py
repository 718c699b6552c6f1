"""`tinymem sweep` and `tinymem report`: a sweep killed mid-way resumes without redoing finished runs,
shards split the plan, bad input fails before work, and the HTML report renders its plots."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from tiny_runs import cli

from tinymem_fast.experiments.sweep import SCHEMA_VERSION, load_rows, plan

GRID = {"durable": {"ratio": [0.01, 0.05, 0.1]}, "activations": {"ratio": [0.05, 0.1]},
        "slimming": {"ratio": [0.05], "epochs": [1, 2, 3]}}


@pytest.fixture()
def grid_file(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(GRID))
    return str(path)


def _rows(out):
    d = out / "rows"
    return {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in d.glob("*.json")} if d.exists() else {}


def test_killed_sweep_resumes_without_redoing(tiny_run, grid_file, tmp_path):
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "tinymem_fast", "sweep", str(tiny_run), "--methods",
            "durable,activations,slimming", "--grid", str(grid_file), "--out", str(out), "--retain-size",
            "100", "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(_rows(out)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = _rows(out)
    # each run re-evaluates the model (seconds here), so the 6 runs left after the second row cannot all
    # finish within one 50 ms poll: the kill always lands mid-sweep
    assert 2 <= len(first) < 8
    r = cli("sweep", str(tiny_run), "--methods", "durable,activations,slimming", "--grid", str(grid_file),
            "--out", str(out), "--retain-size", "100", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{len(first)} already finished" in r.stdout
    second = _rows(out)
    assert len(second) == 8
    for name, (mtime, text) in first.items():
        assert second[name] == (mtime, text), f"{name} was redone"
    rows = load_rows(str(out))
    assert {r["method"] for r in rows} == {"durable", "activations", "slimming"}
    assert all(r["schema"] == SCHEMA_VERSION for r in rows)


def test_shards_partition_the_plan(tiny_run, grid_file):
    runs = plan([str(tiny_run)], ["durable", "activations", "slimming"], grid_file, [0, 1])
    assert len(runs) == 16 and len({r.key for r in runs}) == 16
    parts = [runs[i::3] for i in range(3)]
    assert sorted(r.key for p in parts for r in p) == sorted(r.key for r in runs)
    again = plan([str(tiny_run)], ["durable", "activations", "slimming"], grid_file, [0, 1])
    assert [r.key for r in again] == [r.key for r in runs]  # keys are stable across processes


def test_precision_is_part_of_each_run(tiny_run):
    """--precision bf16 reaches every method with a precision setting and every training kind, and keys
    differ from the fp32 plan's; `run` (the default) leaves the plan as it was."""
    methods = ["balanced_subnet", "durable", "spectral_norm", "clean_ft"]
    grid = {"balanced_subnet": [{"ratio": 0.1}], "durable": [{"ratio": 0.01}]}
    default = plan([str(tiny_run)], methods, grid, [0])
    bf16 = plan([str(tiny_run)], methods, grid, [0], precision="bf16")
    fp32 = plan([str(tiny_run)], methods, grid, [0], precision="fp32")
    by = {r.method: r for r in bf16}
    assert by["balanced_subnet"].hp["precision"] == "bf16" and by["balanced_subnet"].precision == "run"
    assert by["spectral_norm"].precision == "bf16" and by["clean_ft"].precision == "bf16"
    assert {r.method: r.precision for r in default} == dict.fromkeys(methods, "run")
    with_precision = {"balanced_subnet", "spectral_norm", "clean_ft"}  # durable: whatever its config has
    assert not {r.key for r in bf16 if r.method in with_precision} & {r.key for r in fp32}
    # an unlearning method at its own default precision keeps its key under --precision fp32
    assert {r.key for r in default if r.method == "balanced_subnet"} == \
        {r.key for r in fp32 if r.method == "balanced_subnet"}


@pytest.mark.parametrize("args,msg", [
    (["--methods", "forgetful"], "unknown method"),
    (["--methods", "durable", "--grid", "huge"], "unknown grid"),
    (["--methods", "durable", "--seeds"], "expected at least one"),
])
def test_sweep_bad_input(tiny_run, tmp_path, args, msg):
    r = cli("sweep", str(tiny_run), "--out", str(tmp_path / "o"), *args)
    assert r.returncode == 2 and msg in r.stderr, r.stderr[-1000:]


def test_sweep_bad_grid_values(tiny_run, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"durable": {"rate": [0.1]}}))
    r = cli("sweep", str(tiny_run), "--methods", "durable", "--grid", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no setting 'rate'" in r.stderr and "valid:" in r.stderr
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"durable": []}))
    r = cli("sweep", str(tiny_run), "--methods", "durable", "--grid", str(empty), "--out",
            str(tmp_path / "o"))
    assert r.returncode == 2 and "zero runs" in r.stderr


def test_report_rejects_other_schema(tmp_path):
    (tmp_path / "rows").mkdir()
    (tmp_path / "sweep.json").write_text(json.dumps({"schema": SCHEMA_VERSION + 1}))
    r = cli("report", str(tmp_path))
    assert r.returncode == 2 and "schema version" in r.stderr


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_report_renders(tiny_run, grid_file, tmp_path):
    out = tmp_path / "sweep"
    r = cli("sweep", str(tiny_run), "--methods", "durable,slimming", "--grid", grid_file, "--out", str(out),
            "--retain-size", "100", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("report", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rep = out / "report"
    md = (rep / "report.md").read_text()
    assert "| durable |" in md and "| slimming |" in md
    assert (rep / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (rep / "epochs.png").exists()  # slimming over epochs 1/2/3
    page = (rep / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    browser = _chromium()
    if browser is None:
        pytest.skip("no headless browser installed (apt-get install chromium)")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu"]
    dom = subprocess.run([*flags, "--virtual-time-budget=5000", "--dump-dom", (rep / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert 'data-plots-loaded="2/2"' in dom.stdout, dom.stderr[-1000:]
    shot = tmp_path / "shot.png"
    page_uri = (rep / "report.html").as_uri()
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,1600", page_uri],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000


def test_scatter_labels_of_clustered_points_are_stacked():
    """Best runs on top of each other (several methods at -100% memorized) share one stacked label;
    distant ones keep their own."""
    from tinymem_fast.experiments.report import label_groups

    points = [("both_ft", 0.9, -100.0), ("balanced_subnet", -0.5, -100.0), ("extra_ft", 0.7, -100.0),
              ("greedy", -48.0, -100.0), ("durable", -1.8, -33.0), ("spectral_norm", -0.4, 8.0)]
    groups = label_groups(points, xspan=50.0, yspan=110.0)
    names = sorted(sorted(g[2]) for g in groups)
    assert names == [["balanced_subnet", "both_ft", "extra_ft"], ["durable"], ["greedy"], ["spectral_norm"]]
    assert sum(len(g[2]) for g in groups) == len(points)
    assert len(label_groups(points, xspan=0.0, yspan=0.0)) == len(points)  # degenerate spans: no merging
