"""A tiny `tinymem train` run (2 layers, 150 steps), trained through the CLI. It memorizes 9 of its 23
eligible noised rows (9 of the 12 in the x30 group, none at x1) with the default ISA, with
ATEN_CPU_CAPABILITY=default and one thread, and at 250 steps: the forget set the tests unlearn is never
close to empty on another CPU's rounding."""

import subprocess
import sys

TINY_SETS = ["data.num_main=400", "data.num_extra=100", "data.num_test=40", "data.seq_numbers=8",
             "data.max_ctx=48", "data.prompt_len=8", "data.mem_len=8", "data.num_noise=40",
             "data.noise_p=0.15", "data.dup_groups=2", "data.dup_base=30", "model.n_layer=2",
             "train.batch_size=32", "train.max_steps=150", "train.eval_batch_size=64"]


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "tinymem_fast", *args], capture_output=True, text=True,
                          timeout=timeout)


def train_tiny(out, arch="gpt2"):
    sets = [a for s in [*TINY_SETS, f"model.arch={arch}"] for a in ("--set", s)]
    r = cli("train", "--preset", "quick", "--quiet", "--out", str(out), *sets)
    assert r.returncode == 0, r.stderr[-2000:]
    return out
