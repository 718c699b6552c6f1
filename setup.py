"""Builds the optional compiled extension ``tinymem_fast._C``.

C++ CPU kernels are always built; CUDA kernels too when the installed torch has CUDA and nvcc is found.
If the extension cannot be built at all, the package still installs (pure Python, ``torch`` backend).
Set ``TINYMEM_NO_EXT=1`` to skip the extension, ``TINYMEM_NO_CUDA=1`` to build the CPU part only,
``TORCH_CUDA_ARCH_LIST`` to choose GPU archs (default: 8.0 and 9.0).

Must be built against the torch already installed: ``pip install --no-build-isolation -e .``.
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


def _log(msg: str) -> None:
    print(f"[tinymem_fast setup] {msg}", file=sys.stderr)


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
        _log("TINYMEM_NO_EXT=1: skipping the compiled extension (torch backend only)")
        return [], {}
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
        _log("torch is not installed: install torch first, then `pip install --no-build-isolation -e .`")
        return [], {}

    with_cuda = want_cuda and torch.version.cuda is not None and ce.CUDA_HOME is not None
    if want_cuda and not with_cuda:
        why = "torch has no CUDA" if torch.version.cuda is None else "nvcc / CUDA toolkit not found"
        _log(f"building CPU kernels only ({why})")

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
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
    return [ext], {"build_ext": _optional_build_ext(ce.BuildExtension)}


def _optional_build_ext(base):
    class OptionalBuildExt(base):
        """A failed extension build leaves a working pure-Python install behind, and says why."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler failure must not break the install
                if os.environ.get("TINYMEM_REQUIRE_EXT") == "1":
                    raise
                _log(f"compiled extension NOT built ({type(exc).__name__}: {exc}); "
                     "tinymem_fast will run on the torch backend")

    return OptionalBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["tinymem_fast", "tinymem_fast.*"]) + ["tinymem_fast.kernels"],
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
