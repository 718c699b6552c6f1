"""Backend discovery and per-call selection for the fast ops.

Four backends implement every op family:

=========  =======  =====================  ==============================================
backend    runs on  source                 role
=========  =======  =====================  ==============================================
torch      any      tinymem_fast/ops       reference and test oracle; always available
cpp        CPU      csrc/cpu (``_C``)      CPU fast path
triton     CUDA     kernels/               default GPU fast path
cuda       CUDA     csrc/cuda (``_C``)     hand-written GPU kernels
=========  =======  =====================  ==============================================

Choice per call: the ``backend=`` keyword, else ``TINYMEM_BACKEND``, else by device (CPU -> cpp,
CUDA -> triton). A backend asked for explicitly that cannot run raises :class:`BackendUnavailable`;
an automatic choice that cannot run falls back to ``torch`` and warns once.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

BACKENDS = ("torch", "cpp", "triton", "cuda")
DEFAULT_BY_DEVICE = {"cpu": "cpp", "cuda": "triton"}


class BackendUnavailable(RuntimeError):
    """A backend was requested explicitly but cannot run here."""


# --- the compiled extension -------------------------------------------------------------------


@functools.cache
def _load_ext():
    """Import ``tinymem_fast._C`` once; returns (module or None, reason it is missing or '')."""
    if os.environ.get("TINYMEM_DISABLE_EXT") == "1":
        return None, "disabled by TINYMEM_DISABLE_EXT=1"
    try:
        mod = importlib.import_module("tinymem_fast._C")
    except ImportError as exc:
        msg = str(exc)
        if "No module named" in msg:
            reason = ("not built (pure-Python install); reinstall with torch present: "
                      "pip install --no-build-isolation -e .")
        else:
            reason = f"failed to load: {msg}"
        return None, reason
    built = mod.build_info()
    if built.get("torch") and built["torch"] != torch.__version__:
        return None, (f"built for torch {built['torch']} but torch {torch.__version__} is installed; "
                      "rebuild with pip install --no-build-isolation -e .")
    return mod, ""


def ext():
    """The loaded extension module, or None."""
    return _load_ext()[0]


def ext_has(op: str) -> bool:
    """``torch.ops.tinymem`` has ``op`` (an extension built before the op existed lacks it)."""
    try:
        return hasattr(torch.ops.tinymem, op)
    except (AttributeError, RuntimeError):
        return False


def ext_status() -> dict:
    """What the compiled extension provides: loaded, reason, cpu, cuda, build metadata."""
    mod, reason = _load_ext()
    if mod is None:
        return {"loaded": False, "reason": reason, "cpu": False, "cuda": False, "build": {}}
    info = mod.build_info()
    return {"loaded": True, "reason": "", "cpu": True, "cuda": bool(info.get("with_cuda")), "build": info}


#: The CPU kernels' instruction-set levels, lowest first (csrc/cpu/cpu_isa.h); TINYMEM_CPU_ISA picks one.
CPU_ISA_LEVELS = ("generic", "avx2", "avx512", "avx512_bf16")


def cpu_isa() -> dict | None:
    """The CPU kernels' instruction-set level: ``best`` (this CPU's), ``requested`` (TINYMEM_CPU_ISA or
    None) and ``chosen`` (the one in force: the request capped at ``best``); None without the extension
    (or one built before the levels were exposed)."""
    mod = ext()
    if mod is None or not hasattr(mod, "cpu_isa"):
        return None
    return dict(mod.cpu_isa())


def cpu_isa_levels() -> tuple[str, ...]:
    """Every level this CPU can run, lowest first: the settings of TINYMEM_CPU_ISA worth testing here."""
    info = cpu_isa()
    if info is None:
        return ()
    return CPU_ISA_LEVELS[: CPU_ISA_LEVELS.index(info["best"]) + 1]


def register_fakes(fakes: dict) -> None:
    """Register shape-only implementations (torch.compile, FakeTensor tracing) of compiled ops, once, when
    the op family's module is imported; ops the loaded extension lacks (a stale build) are skipped."""
    if ext() is None:
        return
    for name, fn in fakes.items():
        if ext_has(name):
            torch.library.register_fake(f"tinymem::{name}")(fn)


def register_autograd(rules: dict) -> None:
    """Register ``name -> (backward, setup_context)`` as the autograd formula of compiled ops, once, when
    the op family's module is imported (ops the loaded extension lacks are skipped)."""
    if ext() is None:
        return
    for name, (backward, setup_context) in rules.items():
        if ext_has(name):
            torch.library.register_autograd(f"tinymem::{name}", backward, setup_context=setup_context)


# --- triton -----------------------------------------------------------------------------------


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton_import():
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return ""


# --- selection --------------------------------------------------------------------------------


def unavailable_reason(backend: str, device: torch.device) -> str:
    """Why ``backend`` cannot run on tensors of ``device`` ('' when it can)."""
    dev = device.type
    if backend == "torch":
        return ""
    if backend == "cpp":
        if dev != "cpu":
            return f"the cpp backend is CPU-only, got {dev} tensors"
        mod, reason = _load_ext()
        return "" if mod is not None else f"the compiled extension is {reason}"
    if backend == "triton":
        why = _triton_import()
        if why:
            return why
        if dev == "cuda":
            return ""
        if dev == "cpu" and triton_interpreting():
            return ""
        return f"the triton backend runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {dev}"
    if backend == "cuda":
        if dev != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {dev} tensors"
        st = ext_status()
        if not st["loaded"]:
            return f"the compiled extension is {st['reason']}"
        if not st["cuda"]:
            return "the compiled extension was built without CUDA (torch without CUDA or nvcc not found)"
        return ""
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


_warned: set[tuple[str, str]] = set()


def backend_reasons(op: str, device: torch.device | str, *, backends: tuple[str, ...] = BACKENDS,
                    ext_ops: tuple[str, ...] = ()) -> dict[str, str]:
    """Why each backend of ``op`` cannot run on ``device`` ('' where it can): the one question every op
    family asks before a call, and what ``tinymem info`` and the errors print."""
    device = torch.device(device)
    return {b: _reason(op, b, device, backends, ext_ops) for b in BACKENDS}


def _reason(op: str, b: str, device: torch.device, backends: tuple[str, ...],
            ext_ops: tuple[str, ...]) -> str:
    if b not in backends:
        return f"{op} has no {b} backend (it has {', '.join(backends)})"
    why = unavailable_reason(b, device)
    if not why and b in ("cpp", "cuda"):
        missing = [o for o in ext_ops if not ext_has(o)]
        if missing:
            why = (f"the compiled extension has no tinymem::{missing[0]} (stale build); rebuild with "
                   "pip install --no-build-isolation -e .")
    return why


def select(op: str, device: torch.device | str, backend: str | None = None, *,
           backends: tuple[str, ...] = BACKENDS, ext_ops: tuple[str, ...] = (),
           suits: bool = True) -> str:
    """Pick the backend for one call of ``op`` on ``device``: the one dispatcher of every op family.

    ``backends``: the backends the family has; ``ext_ops``: the compiled ops its cpp/cuda backends call;
    ``suits``: whether this call's inputs suit the family's fast backend, consulted for automatic choices
    only (an explicit choice runs, and the kernel says what it does not take).
    An explicit ``backend=`` (or ``TINYMEM_BACKEND``) that cannot run raises :class:`BackendUnavailable`
    with the reason; a process-wide ``TINYMEM_BACKEND`` naming a backend this family lacks is ignored.
    An automatic choice that cannot run falls back to ``torch``, warning once per backend and device.

    Under ``torch.compile`` the choice is made once, while tracing, and becomes a constant of the graph
    (the environment, the extension and the warning are Python state dynamo cannot trace)."""
    device = torch.device(device)
    if torch.compiler.is_compiling():
        return _select_traced(op, device.type, backend, tuple(backends), tuple(ext_ops), suits)
    return _select(op, device, backend, backends, ext_ops, suits)


@torch.compiler.assume_constant_result
def _select_traced(op: str, device_type: str, backend: str | None, backends: tuple[str, ...],
                   ext_ops: tuple[str, ...], suits: bool) -> str:
    return _select(op, torch.device(device_type), backend, backends, ext_ops, suits)


def _select(op: str, device: torch.device, backend: str | None, backends: tuple[str, ...],
            ext_ops: tuple[str, ...], suits: bool) -> str:
    from_env = backend is None and bool(os.environ.get("TINYMEM_BACKEND"))
    requested = backend or os.environ.get("TINYMEM_BACKEND") or None
    if requested is not None:
        requested = requested.lower()
        if requested not in BACKENDS:
            raise ValueError(f"unknown backend {requested!r} (from "
                             f"{'TINYMEM_BACKEND' if from_env else 'backend='}); "
                             f"choose one of {', '.join(BACKENDS)}")
        if from_env and requested not in backends:
            requested = None  # a process-wide choice says nothing about a family without that backend
    if requested is not None:  # only the backends this call may take are asked (a call costs ~1-2 us)
        why = _reason(op, requested, device, backends, ext_ops)
        if why:
            raise BackendUnavailable(f"{op}: backend {requested!r} was requested but is unavailable: {why}")
        return requested
    auto = DEFAULT_BY_DEVICE.get(device.type, "torch")
    if auto not in backends:
        return "torch"
    why = _reason(op, auto, device, backends, ext_ops)
    if why:
        key = (auto, device.type)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"tinymem_fast: {auto} backend unavailable on {device.type} ({why}); "
                          "falling back to the torch backend", RuntimeWarning, stacklevel=3)
        return "torch"
    return auto if suits else "torch"


def default_backend(device: str, *, backends: tuple[str, ...] = BACKENDS,
                    ext_ops: tuple[str, ...] = ()) -> str:
    """The backend an op family would use on ``device`` without an explicit choice (``tinymem info``)."""
    dev = torch.device(device)
    auto = DEFAULT_BY_DEVICE.get(dev.type, "torch")
    if auto not in backends:
        return "torch"
    why = backend_reasons("op", dev, backends=backends, ext_ops=ext_ops)[auto]
    return auto if not why else "torch"
