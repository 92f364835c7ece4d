#!/usr/bin/env bash
# Builds the CUDA extension ei_kernels._C in place and checks that it loads; prints the time.
# The one build command of CI and scripts/gpu_check.sh. PYTHON: the interpreter (default python).
# Targets: EI_KERNELS_CUDA_ARCHS (see csrc/build.py); "90a" alone roughly halves the build for
# H100/H200-only use. EI_KERNELS_CUDA_WERROR=1 makes warnings errors (CI).
set -euo pipefail
cd "$(dirname "$0")/.."

start=$(date +%s)
PY=${PYTHON:-python}
EI_KERNELS_FORCE_CUDA_BUILD=1 "$PY" setup.py build_ext --inplace
echo "ei-kernels: CUDA extension built in $(( $(date +%s) - start )) s" \
     "(targets: ${EI_KERNELS_CUDA_ARCHS:-default}, MAX_JOBS=${MAX_JOBS:-auto})"

"$PY" - <<'PY'
import ei_kernels

info = ei_kernels.cuda_extension_info()
print("ei-kernels:", info)
if not info["loaded"]:
    raise SystemExit(f"the CUDA extension did not load: {info['reason']}")
PY
