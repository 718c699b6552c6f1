"""The LM head at Pythia scale on a GPU (bench.kernels.memscore.bench_big_head): memscore in bf16 for
4,096 rows x d 4,096 x V 50,304 against the bare cuBLAS GEMM of that shape, F.linear + argmax +
cross_entropy and torch.compile of it. A suite of its own so that the GPU check measures it first."""

from __future__ import annotations

from bench.harness import Row
from bench.kernels.memscore import SUITE, bench_big_head


def run(device: str = "cpu", repeats: int = 5) -> list[Row]:
    if not device.startswith("cuda"):
        return [Row(SUITE, "head match+NLL, M=4096, d=4096, V=50304, bf16", "-", float("nan"), float("nan"),
                    float("nan"), note="GPU only (a 4,096 x 50,304 bf16 head)")]
    return bench_big_head(device, repeats)
