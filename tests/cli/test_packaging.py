"""What a new user installs: the sdist holds every tracked source, a build without torch stops with one
line instead of installing pure Python silently, one version everywhere, optional packages named."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

import tinymem_fast
from tinymem_fast.common.optional import MissingExtra, require

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# tracked, but not part of what is distributed
NOT_SHIPPED = (".ci/", ".gitignore")


def _repo_files() -> set[str]:
    """Files a commit of this tree would hold: tracked ones that still exist, plus new ones not ignored."""
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    return {f for f in out if os.path.isfile(os.path.join(ROOT, f)) and not f.startswith(NOT_SHIPPED)}


def test_sdist_holds_every_tracked_source(tmp_path):
    pytest.importorskip("build", reason="the dev extra brings `build`")
    want = _repo_files()
    cmd = [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (sdist,) = tmp_path.glob("tinymem_fast-*.tar.gz")
    assert sdist.name == f"tinymem_fast-{tinymem_fast.__version__}.tar.gz"
    with tarfile.open(sdist) as tar:
        got = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile() and "/" in m.name}
    generated = {f for f in got if f in ("PKG-INFO", "setup.cfg") or ".egg-info/" in f}
    missing, extra = sorted(want - got), sorted(got - want - generated)
    assert not missing, f"the sdist lacks {len(missing)} tracked files: {missing[:10]}"
    assert not extra, f"the sdist holds {len(extra)} files that are not tracked: {extra[:10]}"
    # the build needs these; the assertion above covers them, this says why they matter
    assert {"setup.py", "pyproject.toml", "LICENSE", "csrc/registration.cpp"} <= got
    assert any(f.endswith(".cu") for f in got) and any(f.startswith("kernels/") for f in got)


def _setup_py(argv: list[str], env: dict, hide_torch: bool) -> subprocess.CompletedProcess:
    """Run setup.py's module body with ``argv`` (without compiling anything: the failure comes first)."""
    code = ("import sys\n"
            + ("sys.modules['torch'] = None\n" if hide_torch else "")
            + f"sys.argv = ['setup.py', *{argv!r}]\n"
            + "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), "
            + "{'__file__': 'setup.py', '__name__': '__main__'})\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


@pytest.mark.parametrize("command", ["bdist_wheel", "editable_wheel", "build_ext"])
def test_build_without_torch_stops_with_one_line(command):
    """pip's default build isolation hides the user's torch: that must stop the build, saying what to
    run, never produce a package without its kernels."""
    env = {"TINYMEM_NO_EXT": "", "TINYMEM_NO_CUDA": ""}
    r = _setup_py([command], env, hide_torch=True)
    assert r.returncode != 0
    last = (r.stderr.strip().splitlines() or [""])[-1]
    assert "torch is not importable" in last and "--no-build-isolation" in last and "TINYMEM_NO_EXT=1" in last


def test_metadata_and_sdist_need_no_torch():
    """egg_info (what pip asks first) works without torch, so `python -m build --sdist` does too."""
    r = _setup_py(["--version"], {"TINYMEM_NO_EXT": ""}, hide_torch=True)
    assert r.returncode == 0, r.stderr[-1000:]
    assert r.stdout.strip().splitlines()[-1] == tinymem_fast.__version__


def test_one_version_everywhere():
    r = subprocess.run([sys.executable, "-m", "tinymem_fast", "--version"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"tinymem_fast {tinymem_fast.__version__}"
    assert importlib.metadata.version("tinymem_fast") == tinymem_fast.__version__


def test_missing_optional_package_names_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now raises ImportError
    with pytest.raises(MissingExtra, match=r"pip install 'tinymem_fast\[yaml\]'"):
        require("yaml", "the YAML config 'x.yaml'")


def test_cli_reports_a_missing_extra_in_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  max_steps: 1\n")
    code = ("import sys; sys.modules['yaml'] = None\n"
            "from tinymem_fast.cli import main\n"
            f"sys.exit(main(['train', '--preset', 'quick', '--config', {str(cfg)!r}, '--out', "
            f"{str(tmp_path / 'run')!r}, '--quiet']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'tinymem_fast[yaml]'" in lines[0], r.stderr
