#!/usr/bin/env bash
# One-shot GPU check (fits in 8 minutes on one H100): build with CUDA, run the CUDA/Triton tests on the
# GPU, run the GPU benchmarks. Usage: bash bench/gpu_check.sh OUTDIR
# Writes OUTDIR/gpu_check.log, OUTDIR/results.json (this GPU's figures) and OUTDIR/RESULTS.md.
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
cd "$(dirname "$0")/.."
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# the GPU at hand only: one arch compiles in a fraction of the time
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
status=0
step() { echo; echo "== $1 ($(date +%T))"; }

step "build (arch $TORCH_CUDA_ARCH_LIST)"
start=$(date +%s)
timeout 240 python3 -m pip install -q --no-build-isolation --no-deps -e . || status=1
echo "build took $(( $(date +%s) - start )) s"
python3 -m tinymem_fast info || status=1

step "GPU tests"
# one file per op family holds every backend's cases; its CPU cases run too (seconds on 16 cores), within
# the same limits as before, so that the whole check still fits in 8 minutes
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/ops/test_masked_subnet.py || status=1
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/ops/test_memscore.py || status=1

step "GPU benchmarks"
timeout 200 python3 -m bench --device cuda --repeats 10 --only masked_subnet --only training \
    --only memscore || status=1
cp bench/results/gpu-*.json "$OUT/" 2>/dev/null
cp bench/RESULTS.md "$OUT/RESULTS.md"
step "done, status $status"
exit $status
