#!/usr/bin/env bash
# Builds the CUDA extension ei_kernels._C in place and checks that it loads; prints the time.
# The one build command of CI and scripts/gpu_check.sh. PYTHON: the interpreter (default python).
# Targets: EI_KERNELS_CUDA_ARCHS (see csrc/build.py); "90a" alone roughly halves the build for
# H100/H200-only use. EI_KERNELS_CUDA_WERROR=1 makes warnings errors (CI), and also ptxas's
# notes that it serialised wgmma ("Potential Performance Loss", C75xx), which it prints as info.
set -euo pipefail
cd "$(dirname "$0")/.."

start=$(date +%s)
PY=${PYTHON:-python}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
EI_KERNELS_FORCE_CUDA_BUILD=1 "$PY" setup.py build_ext --inplace 2>&1 | tee "$log"
if [ "${EI_KERNELS_CUDA_WERROR:-0}" = 1 ] && grep -q "Potential Performance Loss" "$log"; then
  echo "ei-kernels: ptxas serialised wgmma (above): an error with EI_KERNELS_CUDA_WERROR=1" >&2
  exit 1
fi
echo "ei-kernels: CUDA extension built in $(( $(date +%s) - start )) s" \
     "(targets: ${EI_KERNELS_CUDA_ARCHS:-default}, MAX_JOBS=${MAX_JOBS:-auto})"

"$PY" - <<'PY'
import ei_kernels

info = ei_kernels.cuda_extension_info()
print("ei-kernels:", info)
if not info["loaded"]:
    raise SystemExit(f"the CUDA extension did not load: {info['reason']}")
PY
