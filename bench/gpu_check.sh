#!/usr/bin/env bash
# One-shot GPU check for one device call (aim: <= 7 minutes on a fresh H100/H200 image, build included;
# the timeouts below sum to 420 s).
# It proves or fails: the CUDA kernels must build and load, every CUDA/Triton test must run on the GPU (a
# skipped one fails the check, as a missing CUDA build used to pass it by skipping everything) -- the GPU
# cases of tests/ops and all of tests/gpu (decoding against generate, tensors past 2^31 elements, side
# streams, edge cases, opcheck) -- and every benchmark correctness check must hold (`python -m bench`
# exits 1 on a row whose check failed). Timeouts: 185 + 140 + 90 s.
# Usage: bash bench/gpu_check.sh OUTDIR
# Writes OUTDIR/gpu_check.log, OUTDIR/gpu_tests.xml (junit), OUTDIR/results.json (this GPU's figures) and
# OUTDIR/RESULTS.md.
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
cd "$(dirname "$0")/.."
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# the GPU at hand only: one arch compiles in a fraction of the time
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
status=0
fail() { echo "FAILED: $1"; status=1; }
step() { echo; echo "== $1 ($(date +%T))"; }

step "build (arch $TORCH_CUDA_ARCH_LIST)"
start=$(date +%s)
MAX_JOBS=${MAX_JOBS:-16} timeout 140 python3 -m pip install -q --no-build-isolation --no-deps -e . \
    || fail "build"
echo "build took $(( $(date +%s) - start )) s"
python3 -m tinymem_fast info || fail "tinymem info"
python3 - <<'PY' || fail "the extension has no CUDA kernels"
import sys
import torch
from tinymem_fast.ops import registry
st = registry.ext_status()
print(f"extension loaded={st['loaded']} cuda={st['cuda']} build={st['build']} reason={st['reason']!r}")
sys.exit(0 if st["loaded"] and st["cuda"] and torch.cuda.is_available() else 1)
PY

step "GPU tests (every CUDA and Triton case; none may skip)"
# the backend is part of every op test's id, so -k picks the GPU cases of every family in tests/ops; every
# test in tests/gpu carries the cuda marker, which -k matches too. The big tests (tensors past 2^31
# elements, ~20 GB each) form one xdist group: --dist loadgroup runs them one after another on one worker.
timeout 110 python3 -m pytest -q -p no:cacheprovider -n 8 --dist loadgroup -rs --durations=15 \
    -k "cuda or triton" --junitxml="$OUT/gpu_tests.xml" tests/ops tests/gpu || fail "GPU tests"
python3 - "$OUT/gpu_tests.xml" <<'PY' || fail "GPU tests were skipped"
import sys
import xml.etree.ElementTree as ET
cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
skipped = [(c.get("classname"), c.get("name"), s.get("message", "")) for c in cases for s in c.iter("skipped")]
gpu = [c for c in cases if (c.get("classname") or "").startswith("tests.gpu.")]
print(f"{len(cases)} GPU test cases ({len(gpu)} of them in tests/gpu), {len(skipped)} skipped")
for cls, name, why in skipped[:30]:
    print(f"  skipped: {cls}::{name}: {why}")
for c in gpu:  # peak memory and time of the big tests (their user_properties)
    props = {p.get("name"): p.get("value") for p in c.iter("property")}
    if props:
        print(f"  {c.get('name')}: {props}")
sys.exit(1 if skipped or not cases or not gpu else 0)
PY

step "GPU benchmarks (correctness checks fail the run)"
# one suite per call, the scoring figures first: a suite cut short by its timeout loses only its own rows
bench() {  # seconds, suite, extra args
    local t=$1 suite=$2
    shift 2
    timeout "$t" python3 -m bench --device cuda --only "$suite" "$@" || fail "GPU benchmark $suite"
}
bench 40 memscore_head --repeats 10
bench 75 scoring_scale --repeats 3
bench 30 memscore --repeats 5
bench 25 masked_subnet --repeats 10
cp bench/results/gpu-*.json "$OUT/" 2>/dev/null
cp bench/RESULTS.md "$OUT/RESULTS.md"
step "done, status $status"
exit $status
