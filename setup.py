"""Builds the compiled extension ``tinymem_fast._C`` against the torch already installed.

C++ CPU kernels always; CUDA kernels too when that torch has CUDA. Nothing is skipped silently: a build
that cannot happen (torch not importable, which is what pip's default build isolation does; torch with
CUDA but no nvcc; a compiler error) stops with one line that says what to run. Opt-outs, only when asked:
``TINYMEM_NO_EXT=1`` (pure Python, torch backend), ``TINYMEM_NO_CUDA=1`` (CPU kernels only).
``TORCH_CUDA_ARCH_LIST`` chooses GPU archs (default: 8.0 and 9.0).

Install with ``pip install --no-build-isolation .`` (or ``-e .``) after ``pip install torch``. Making a
source distribution needs no torch: ``python -m build --sdist`` (``python -m build --no-isolation`` for the
sdist and a wheel).
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = {"tinymem_fast": "tinymem_fast", "tinymem_fast.kernels": "kernels"}


# setup.py commands that compile; egg_info, dist_info and sdist (metadata, source archives) do not
_BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "bdist_egg", "develop", "install", "editable_wheel"}
_HOW = ("`pip install torch`, then `pip install --no-build-isolation .` (add -e for a checkout); "
        "TINYMEM_NO_EXT=1 installs pure Python on the torch backend")


def _log(msg: str) -> None:
    print(f"[tinymem_fast setup] {msg}", file=sys.stderr)


def _stop(msg: str) -> None:
    raise SystemExit(f"[tinymem_fast setup] error: {msg}")


def _toolkit_of_nvcc() -> str | None:
    """The CUDA toolkit root that the nvcc on PATH belongs to.

    torch guesses the parent of nvcc's directory, which is wrong when nvcc is a wrapper script or a
    symlink (e.g. /usr/local/bin/nvcc -> toolkit elsewhere); nvcc's dry run prints its real TOP.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for cand in ("/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)):
            if os.path.exists(os.path.join(cand, "bin", "nvcc")):
                return cand
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
        m = re.search(r"^#\$ TOP=(.+)$", out.stderr + out.stdout, re.M)
        if m:
            return os.path.realpath(m.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _extensions():
    if os.environ.get("TINYMEM_NO_EXT") == "1":
        _log("TINYMEM_NO_EXT=1: no compiled extension (pure Python, torch backend)")
        return [], {}
    if not _BUILD_COMMANDS.intersection(sys.argv[1:]):
        return [], {}  # metadata or an sdist: nothing to compile, no torch needed
    want_cuda = os.environ.get("TINYMEM_NO_CUDA") != "1"
    if want_cuda and not os.environ.get("CUDA_HOME"):
        home = _toolkit_of_nvcc()
        if home:
            # torch.utils.cpp_extension reads CUDA_HOME at import time
            os.environ["CUDA_HOME"] = home
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        _stop("torch is not importable here (pip's build isolation hides it): tinymem_fast compiles its "
              f"kernels against the torch you run. {_HOW}")

    with_cuda = want_cuda and torch.version.cuda is not None
    if with_cuda and ce.CUDA_HOME is None:
        _stop(f"torch {torch.__version__} has CUDA {torch.version.cuda} but no CUDA toolkit (nvcc) was "
              "found: put nvcc on PATH or set CUDA_HOME, or set TINYMEM_NO_CUDA=1 to build the CPU "
              "kernels only")
    if not want_cuda:
        _log("TINYMEM_NO_CUDA=1: building the CPU kernels only")
    elif not with_cuda:
        _log("building the CPU kernels only (this torch has no CUDA)")

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    if not sources:
        _stop(f"no C++ sources under {os.path.join(os.getcwd(), 'csrc')}: this source tree is incomplete")
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    # no -std: torch.utils.cpp_extension adds the standard its headers need (C++17 or C++20)
    cxx_flags = ["-O3", "-fopenmp", "-march=x86-64-v2"]
    if os.uname().machine not in ("x86_64", "AMD64"):
        cxx_flags.remove("-march=x86-64-v2")
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra_link = ["-fopenmp"]
    build_meta = {
        "torch": torch.__version__,
        "cuda": (torch.version.cuda or "") if with_cuda else "",
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }
    define_macros += [
        ("TINYMEM_BUILD_TORCH", f'"{build_meta["torch"]}"'),
        ("TINYMEM_BUILD_CUDA", f'"{build_meta["cuda"]}"'),
        ("TINYMEM_BUILD_PYTHON", f'"{build_meta["python"]}"'),
    ]
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("TINYMEM_WITH_CUDA", None))
        # torch's CUDA headers pull in cuSPARSE/cuBLAS headers that pip wheels keep under nvidia/*/include
        for inc in glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "*", "include")):
            include_dirs.append(os.path.realpath(inc))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext_cls = ce.CUDAExtension
        extra_compile = {
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-lineinfo"],
        }
        _log(f"building CPU + CUDA kernels (CUDA_HOME={ce.CUDA_HOME}, "
             f"archs {os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        ext_cls = ce.CppExtension
        extra_compile = {"cxx": cxx_flags}
    ext = ext_cls(
        name="tinymem_fast._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra_compile,
        extra_link_args=extra_link,
    )
    return [ext], {"build_ext": _loud_build_ext(ce.BuildExtension)}


def _loud_build_ext(base):
    class LoudBuildExt(base):
        """A failed compile fails the install, ending on one line that says what to do."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - re-raised with the way out
                _log(f"compiling the extension failed ({type(exc).__name__}: {exc}); the compiler's output "
                     "is above. TINYMEM_NO_CUDA=1 skips the CUDA kernels, TINYMEM_NO_EXT=1 installs pure "
                     "Python on the torch backend")
                raise

    return LoudBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["tinymem_fast", "tinymem_fast.*"]) + ["tinymem_fast.kernels"],
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
