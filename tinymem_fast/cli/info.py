"""Environment report for bug reports and for checking which backends run (``tinymem info``)."""

from __future__ import annotations

import argparse
import importlib
import json
import platform

import torch

from ..ops import OP_FAMILIES, registry


def _version(mod: str) -> str:
    try:
        return getattr(importlib.import_module(mod), "__version__", "?")
    except ImportError:
        return "not installed"


def _cpu_isa_line() -> str:
    try:
        isa = registry.cpu_isa()
    except RuntimeError as exc:  # an unknown TINYMEM_CPU_ISA
        return f"error: {str(exc).splitlines()[0]}"
    if isa is None:
        return "n/a (no compiled extension)"
    line = f"{isa['chosen']} (this CPU's best: {isa['best']}"
    if isa["requested"] is not None:
        capped = ", capped" if isa["requested"] != isa["chosen"] else ""
        line += f"; TINYMEM_CPU_ISA={isa['requested']}{capped}"
    return line + ")"


def _auto_precision_line() -> str:
    from ..integrations.mixed_precision import native_bf16, resolve_precision

    cpu = resolve_precision("auto", "cpu")
    why = "it has AVX512-BF16/AMX" if native_bf16("cpu") else "no native bf16 here: bf16 would be slower"
    return f"demo/sweep --precision auto runs {cpu} on this CPU ({why}), bf16 on a GPU"


def collect() -> dict:
    ext = registry.ext_status()
    cuda_ok = torch.cuda.is_available()
    backends = {}
    why_not = {}
    for fam, spec in OP_FAMILIES.items():
        on_cuda = registry.default_backend("cuda", **spec) if cuda_ok else "n/a (no CUDA device)"
        backends[fam] = {"cpu": registry.default_backend("cpu", **spec), "cuda": on_cuda}
        # per family, the reason each backend that has an implementation does not run on the CPU here
        why_not[fam] = {b: r for b, r in registry.backend_reasons(fam, "cpu", **spec).items()
                        if r and b in spec["backends"] and b in ("torch", "cpp")}
    avail = {}
    for b in registry.BACKENDS:
        dev = "cuda" if b in ("triton", "cuda") else "cpu"
        why = registry.unavailable_reason(b, torch.device(dev))
        if b in ("triton", "cuda") and not cuda_ok and not why:
            why = "no CUDA device"
        avail[b] = why or "available"
    return {
        "versions": {
            "python": platform.python_version(),
            "tinymem_fast": _version("tinymem_fast"),
            "torch": torch.__version__,
            "torch CUDA": torch.version.cuda or "none (CPU build)",
            "triton": _version("triton"),
            "transformers": _version("transformers"),
            "numpy": _version("numpy"),
        },
        "platform": f"{platform.system()} {platform.machine()}, {torch.get_num_threads()} torch threads",
        "cuda devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda_ok else [],
        "extension _C": ("loaded (" + ", ".join(p for p in ("cpu", "cuda") if ext[p]) + ")")
        if ext["loaded"] else f"not loaded: {ext['reason']}",
        "extension build": ext["build"],
        "cpu isa": _cpu_isa_line(),
        "precision auto": _auto_precision_line(),
        "backends": avail,
        "default backend per op family": backends,
        "why a CPU backend does not run": why_not,
    }


def format_report(info: dict) -> str:
    lines = ["tinymem_fast environment", ""]
    for k, v in info["versions"].items():
        lines.append(f"  {k:<14} {v}")
    lines.append(f"  {'platform':<14} {info['platform']}")
    lines.append(f"  {'GPUs':<14} {', '.join(info['cuda devices']) or 'none'}")
    lines.append(f"  {'bf16 (auto)':<14} {info['precision auto']}")
    lines.append("")
    lines.append(f"  compiled extension: {info['extension _C']}")
    if info["extension build"]:
        b = info["extension build"]
        lines.append(f"    built for torch {b.get('torch')}, CUDA {b.get('cuda') or 'none'}, "
                     f"python {b.get('python')}, OpenMP {b.get('openmp')}")
        lines.append(f"    CPU kernels' instruction set: {info['cpu isa']}")
    lines.append("")
    lines.append("  backends:")
    for k, v in info["backends"].items():
        lines.append(f"    {k:<8} {v}")
    lines.append("")
    lines.append("  backend used per op family (CPU tensors / CUDA tensors):")
    for fam, d in info["default backend per op family"].items():
        lines.append(f"    {fam:<16} cpu: {d['cpu']:<8} cuda: {d['cuda']}")
    for fam, reasons in info.get("why a CPU backend does not run", {}).items():
        for b, why in reasons.items():
            lines.append(f"    {fam}: {b} not used on the CPU: {why}")
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0
