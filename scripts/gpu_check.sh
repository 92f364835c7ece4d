#!/usr/bin/env bash
# One command for a GPU machine with no network (torch, triton, timm preinstalled):
# install offline, build the CUDA extension, run the GPU tests, run the GPU benchmarks.
# Everything lands under $OUT: gpu_check.log, tests.xml, bench-cuda.json, bench-cuda.md.
# Usage: OUT=/some/dir bash scripts/gpu_check.sh     (finishes in under 8 minutes on an H100)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
exec > >(tee "$OUT/gpu_check.log") 2>&1
start=$(date +%s)
stage() { echo "=== $1 ($(( $(date +%s) - start )) s)"; }

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
git log -1 --format='commit %h %s' 2>/dev/null || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

stage "install (offline) and build the CUDA extension for this GPU only"
export MAX_JOBS=${MAX_JOBS:-16}
export EI_KERNELS_CUDA_ARCHS=${EI_KERNELS_CUDA_ARCHS:-90a}
timeout 300 $PY -m pip install -q --no-deps --no-build-isolation -e . || echo "INSTALL FAILED"
$PY -c "import ei_kernels as e; print(e.cuda_extension_info()); print('backends:', e.available_backends())"

stage "GPU tests"
# The interpreter tests are the CPU stand-in for these; on a GPU the real kernels run.
timeout 200 $PY -m pytest -q -m "not interpreter" -p no:cacheprovider \
    --junitxml="$OUT/tests.xml" tests/
tests_rc=$?

stage "GPU benchmarks"
EI_BENCH_OUT="$OUT" timeout 240 $PY -m pytest benchmarks/ -q -p no:cacheprovider \
    --benchmark-disable-gc
bench_rc=$?

stage "done: tests rc=$tests_rc benchmarks rc=$bench_rc"
ls -la "$OUT"
