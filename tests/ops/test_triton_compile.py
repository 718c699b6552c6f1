"""Compile every Triton kernel for an A100 (sm_80) and an H100 (sm_90) without needing either.

On a CPU-only machine the other Triton tests run the kernels in the interpreter, which accepts code the
real compiler rejects (and never touches layouts, shared memory or ptxas). This test lowers each kernel
all the way to a cubin for each arch using the ptxas that ships with triton. It runs in a subprocess without
TRITON_INTERPRET, because that variable makes @triton.jit return interpreter objects that cannot be
compiled, and another test module may already have set it in this process.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

_SCRIPT = r"""
import inspect
import sys

import triton
from triton.backends.compiler import GPUTarget

from tinymem_fast.kernels import masked_subnet as tk

TARGET = GPUTarget("cuda", int(sys.argv[1]), 32)
_PARAMS = inspect.signature(triton.compiler.ASTSource).parameters


def compile_for_target(fn, signature, constexprs, **options):
    if signature.get("n") == "one":  # Triton specialises an int argument equal to 1 into a constant
        del signature["n"]
        constexprs = dict(constexprs, n=1)
    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    kw = "constexprs" if "constexprs" in _PARAMS else "constants"
    src = triton.compiler.ASTSource(fn=fn, signature=signature, **{kw: constexprs})
    kernel = triton.compile(src, target=TARGET, options=options)
    assert kernel.asm.get("cubin"), f"{fn.__name__}: no cubin"
    return kernel


FLOATS = ("fp32", "fp16", "bf16")
# (numel type, scores dtype, other dtype): each dtype alone and mixed with each other one, the int64 numel
# that tensors of 2**31+ elements get, and numel 1, which Triton turns into a compile-time constant
CASES = ([("i32", s, s) for s in FLOATS]
         + [("i32", "fp32", "fp16"), ("i32", "fp16", "bf16"), ("i32", "bf16", "fp32")]
         + [("i64", "fp32", "fp32"), ("one", "fp16", "fp16")])
done = 0
for n_ty, s_ty, o_ty in CASES:
    if o_ty == s_ty:  # kernels that read only the scores: once per scores dtype
        for shift, bits in tk._DIGITS:
            compile_for_target(tk._radix_hist_kernel,
                             {"s_ptr": f"*{s_ty}", "state_ptr": "*i64", "hist_ptr": "*i64", "n": n_ty},
                             {"SHIFT": shift, "BITS": bits, "NUM_BINS": 1 << bits, "BLOCK": tk._HIST_BLOCK},
                             num_warps=tk._HIST_WARPS)
            done += 1
        compile_for_target(tk._tie_count_kernel,
                         {"s_ptr": f"*{s_ty}", "state_ptr": "*i64", "counts_ptr": "*i32", "n": n_ty},
                         {"BLOCK": tk._TIE_BLOCK})
        compile_for_target(tk._tie_cut_kernel,
                         {"s_ptr": f"*{s_ty}", "state_ptr": "*i64", "counts_ptr": "*i32", "cum_ptr": "*i64",
                          "block_ptr": "*i64", "cut_ptr": "*i64", "n": n_ty},
                         {"BLOCK": tk._TIE_BLOCK})
        done += 2
    compile_for_target(tk._masked_weight_kernel,
                     {"w_ptr": f"*{o_ty}", "s_ptr": f"*{s_ty}", "value_ptr": "*fp32", "cut_ptr": "*i64",
                      "out_ptr": f"*{o_ty}", "n": n_ty},
                     {"BLOCK": tk._EW_BLOCK}, num_warps=tk._EW_WARPS)
    compile_for_target(tk._ste_grad_kernel,
                     {"g_ptr": f"*{o_ty}", "w_ptr": f"*{o_ty}", "s_ptr": f"*{s_ty}", "out_ptr": f"*{s_ty}",
                      "n": n_ty},
                     {"BLOCK": tk._EW_BLOCK}, num_warps=tk._EW_WARPS)
    for maximize in (False, True):
        sgd = compile_for_target(tk._sgd_step_kernel,
                               {"s_ptr": f"*{s_ty}", "g_ptr": f"*{o_ty}", "buf_ptr": "*fp32", "n": n_ty,
                                "lr": "fp32", "momentum": "fp32", "weight_decay": "fp32"},
                               {"MAXIMIZE": maximize, "BLOCK": tk._EW_BLOCK},
                               num_warps=tk._EW_WARPS, enable_fp_fusion=False)
        # sgd_step promises torch's rounding: no fused multiply-add may survive
        assert "fma" not in sgd.asm["ptx"], "fma in _sgd_step_kernel"
    done += 4
for last in (False, True):
    for shift, bits in tk._DIGITS:
        compile_for_target(tk._radix_select_kernel,
                         {"hist_ptr": "*i64", "state_ptr": "*i64", "value_ptr": "*fp32"},
                         {"SHIFT": shift, "NUM_BINS": 1 << bits, "LAST": last}, num_warps=1)
        done += 1
print(f"compiled {done} kernel variants for sm_{sys.argv[1]}")
"""


# the GPUs the CUDA build targets by default (setup.py: TORCH_CUDA_ARCH_LIST 8.0;9.0): A100 and H100/H200
ARCHS = [80, 90]


@pytest.mark.parametrize("arch", ARCHS)
def test_masked_subnet_kernels_compile(tmp_path, arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # really compile, never reuse a cached cubin
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(arch)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"kernel variants for sm_{arch}" in proc.stdout


_MEMSCORE_SCRIPT = r"""
import inspect
import sys

import triton
from triton.backends.compiler import GPUTarget

from tinymem_fast.kernels import memscore as tk

TARGET = GPUTarget("cuda", int(sys.argv[1]), 32)
_PARAMS = inspect.signature(triton.compiler.ASTSource).parameters
kw = "constexprs" if "constexprs" in _PARAMS else "constants"

done = 0
for dt in ("fp32", "fp16", "bf16"):
    cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32 if dt == "fp32" else 64)
    # (has_bias, has_targets, need_nll, early_exit): memscore with NLL, pruned match-only, plain match-only,
    # lm_head_argmax
    for has_bias, has_t, nll, early in ((True, True, True, False), (False, True, False, True),
                                        (True, True, False, False), (False, False, False, False)):
        sig = {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "y_ptr": "*i64", "thi_ptr": "*fp32",
               "best_ptr": "*fp32", "arg_ptr": "*i32", "sum_ptr": "*fp32", "tgt_ptr": "*fp32",
               "dead_ptr": "*i8", "M": "i32", "V": "i32", "D": "i32", "v_per_split": "i32"}
        const = dict(HAS_BIAS=has_bias, HAS_TARGETS=has_t, NEED_NLL=nll, EARLY_EXIT=early,
                     IEEE=dt == "fp32", **cfg)
        sig.update({name: "constexpr" for name in const})
        src = triton.compiler.ASTSource(fn=tk._memscore_kernel, signature=sig, **{kw: const})
        kernel = triton.compile(src, target=TARGET, options=dict(num_warps=8, num_stages=3))
        assert kernel.asm.get("cubin"), "_memscore_kernel: no cubin"
        if dt != "fp32":
            assert "mma" in kernel.asm["ptx"], "half-precision logits must use tensor cores"
        done += 1
print(f"compiled {done} memscore kernel variants for sm_{sys.argv[1]}")
"""


@pytest.mark.parametrize("arch", ARCHS)
def test_memscore_kernels_compile(tmp_path, arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, "-c", _MEMSCORE_SCRIPT, str(arch)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"memscore kernel variants for sm_{arch}" in proc.stdout
