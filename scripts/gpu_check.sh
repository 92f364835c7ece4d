#!/usr/bin/env bash
# The first command to run on a lent GPU machine (torch, triton, timm, pytest preinstalled, no
# network). It returns data whatever goes wrong: every stage appends to files under $OUT as it
# goes and runs under a time limit taken from one overall budget, so a kill at any point keeps
# what was done. Stages, most informative first:
#   1. facts.json          GPU, driver, versions, commit
#   2. cuda_build.log      the CUDA extension build for this GPU only, in the background
#   3. correctness.jsonl   Triton backend cases, then CUDA once its build is done: norm-wise
#                          errors of ours and of PyTorch against fp64, and a verdict per case
#   4. timings.jsonl       bf16 GEMM and copy ceilings; nn.Linear and each backend, fwd and
#                          fwd+bwd, at the ViT-B layer shapes (CUDA events, medians)
#   4b. memcheck.log       compute-sanitizer's memcheck over the CUDA kernels, small odd shapes
#   5. plan_memory.jsonl   `ei plan`'s peak memory against max_memory_allocated of real steps
#   6. tests.xml           tests/gpu with per-test timeouts, in the time left
#   7. summary.md          the short table, printed last (also gpu_check.log: everything)
#
# Usage: OUT=/some/dir bash scripts/gpu_check.sh [--dry]
#   GPU_CHECK_BUDGET_S  overall budget in seconds (default 405: under 7 minutes in all)
#   GPU_CHECK_COMMIT    the commit to record when the tree has no .git
#   --dry               the same stages on the CPU, tiny shapes, Triton under the interpreter,
#                       no CUDA build (CI runs this so the script never rots; about 2 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
[[ "${1:-}" == "--dry" ]] && DRY=1
export GPU_CHECK_DRY=$DRY
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export OUT
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
start=$(date +%s)
budget=${GPU_CHECK_BUDGET_S:-405}
stage() { echo "=== $1 ($(( $(date +%s) - start )) s)"; }
left() { echo $(( budget - ($(date +%s) - start) )); }

# within CAP RESERVE CMD...: run CMD for at most CAP seconds, and never into the last RESERVE
# seconds of the budget (kept for the stages after it). 124: out of time.
within() {
    local cap=$1 reserve=$2 t
    shift 2
    t=$(( $(left) - reserve ))
    (( t > cap )) && t=$cap
    if (( t < 5 )); then
        echo "gpu_check: skipped, no time left: $*"
        return 124
    fi
    timeout -k 5 "$t" "$@"
}

# stage_with_restarts CAP RESERVE FILE CMD...: a stage whose process exits early when the CUDA
# context is lost, a case hangs (watchdog) or it crashes; restarted, it skips the cases already
# in FILE. No restart when an attempt added nothing to FILE (it fails before any case).
stage_with_restarts() {
    local cap=$1 reserve=$2 file="$OUT/$3" rc attempt before end=$(( $(date +%s) + $1 ))
    shift 3
    for attempt in 1 2 3 4 5 6; do
        before=$(cat "$file" 2>/dev/null | wc -l)
        within $(( end - $(date +%s) )) "$reserve" "$@"
        rc=$?
        (( rc == 0 || rc == 124 )) && return $rc
        if (( $(cat "$file" 2>/dev/null | wc -l) == before )); then
            echo "gpu_check: stage exited with $rc before any case; not restarted"
            return "$rc"
        fi
        echo "gpu_check: stage exited with $rc (attempt $attempt); restarting it"
    done
    return "$rc"
}

if (( DRY )); then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
fi

stage "1. machine facts"
within 30 0 $PY scripts/gpu_check/facts.py

stage "2. install (offline) and the CUDA extension build in the background"
within 60 0 env EI_KERNELS_SKIP_CUDA_BUILD=1 $PY -m pip install -q --no-index --no-deps \
    --no-build-isolation -e . || echo "gpu_check: pip install failed (PYTHONPATH has the checkout)"
if (( DRY )); then
    # CI builds the extension in its own stage; here the stand-in only checks that it loads.
    build_cmd=($PY -c "import ei_kernels; i = ei_kernels.cuda_extension_info(); print(i); \
assert i['loaded'], i['reason']")
else
    arch=$($PY -c "import torch; c = torch.cuda.get_device_capability(); \
print(f'{c[0]}{c[1]}' + ('a' if c[0] == 9 else ''))" 2>/dev/null || echo 90a)
    export EI_KERNELS_CUDA_ARCHS=${EI_KERNELS_CUDA_ARCHS:-$arch} EI_KERNELS_CUDA_WERROR=0
    export MAX_JOBS=${MAX_JOBS:-8}
    # The GPU machine has neither network nor CUDA's CUTLASS headers, which the sm_90a GEMM
    # needs: a run there carries this checkout's (the device tool's carry, e.g.
    # .venv/lib/python3.11/site-packages/cutlass_library/source/include, 27 MB).
    carried=$(ls -d "$ROOT"/.venv/lib/python3*/site-packages/cutlass_library/source/include \
              2>/dev/null | head -n 1)
    if [[ -z "${EI_KERNELS_CUTLASS_DIR:-}" && -n "$carried" ]]; then
        export EI_KERNELS_CUTLASS_DIR=$carried
    fi
    echo "gpu_check: CUTLASS headers: ${EI_KERNELS_CUTLASS_DIR:-none found (no sm_90a GEMM)}"
    build_cmd=(env PYTHON="$PY" bash scripts/build_cuda_ext.sh)
fi
(
    b0=$(date +%s)
    echo "gpu_check: building for ${EI_KERNELS_CUDA_ARCHS:-dry run}: ${build_cmd[*]}"
    timeout -k 5 240 "${build_cmd[@]}"
    echo "gpu_check: build rc=$? in $(( $(date +%s) - b0 )) s"
) > "$OUT/cuda_build.log" 2>&1 &
build_pid=$!

stage "3a. correctness: Triton"
stage_with_restarts 110 170 correctness.jsonl $PY scripts/gpu_check/correctness.py --backend triton

stage "3b. correctness: CUDA (after its build)"
while kill -0 "$build_pid" 2>/dev/null && (( $(left) > 120 )); do sleep 2; done
tail -n 3 "$OUT/cuda_build.log"
if grep -q "gpu_check: build rc=0" "$OUT/cuda_build.log" && (( ! DRY )); then
    stage_with_restarts 70 110 correctness.jsonl $PY scripts/gpu_check/correctness.py --backend cuda
    # What hung or lost the context there does not run again: the later stages take the
    # switches of the mode correctness.py's ladder reached (unless they were set already).
    read -r mode sm90 persistent cluster <<< "$(cd scripts/gpu_check && $PY -c "from common \
import read_records; from correctness import FILE, SM90_ENV, sm90_mode; \
m = sm90_mode(read_records(FILE)); print(m, *SM90_ENV[m])" 2>/dev/null)"
    if [[ -n "$mode" && "$mode" != 1 && -z "${EI_KERNELS_CUDA_SM90:-}" ]]; then
        export EI_KERNELS_CUDA_SM90=$sm90 EI_KERNELS_CUDA_SM90_PERSISTENT=$persistent \
               EI_KERNELS_CUDA_SM90_CLUSTER=$cluster
        echo "gpu_check: later stages run in mode $mode (EI_KERNELS_CUDA_SM90=$sm90," \
             "EI_KERNELS_CUDA_SM90_PERSISTENT=$persistent EI_KERNELS_CUDA_SM90_CLUSTER=$cluster)"
    fi
else
    echo "gpu_check: CUDA correctness skipped (build not done or failed, or dry run)"
fi

stage "4. timings"
stage_with_restarts 120 90 timings.jsonl $PY scripts/gpu_check/timings.py

stage "4b. memcheck of the CUDA kernels (compute-sanitizer)"
# The toolkit's that built the extension first, else PATH's, else the newest installed.
sanitizer=${CUDA_HOME:+$CUDA_HOME/bin/compute-sanitizer}
[[ -x "$sanitizer" ]] || sanitizer=$(command -v compute-sanitizer \
    || ls -d /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | sort -V | tail -n 1)
if (( DRY )); then
    # No sanitizer on the CPU: the same cases through the torch backend, so the script runs.
    within 60 25 $PY scripts/gpu_check/memcheck.py > "$OUT/memcheck.log" 2>&1
    echo "gpu_check: memcheck dry run rc=$?" >> "$OUT/memcheck.log"
elif kill -0 "$build_pid" 2>/dev/null; then
    echo "gpu_check: memcheck skipped: the CUDA extension build is still running" \
        > "$OUT/memcheck.log"
elif ! grep -q "gpu_check: build rc=0" "$OUT/cuda_build.log"; then
    echo "gpu_check: memcheck skipped: no CUDA extension build" > "$OUT/memcheck.log"
elif [[ -z "$sanitizer" ]]; then
    echo "gpu_check: memcheck skipped: no compute-sanitizer" > "$OUT/memcheck.log"
else
    # Every tensor its own cudaMalloc: the sanitizer sees the caching allocator's pool as one
    # allocation, so a write past one tensor into its neighbour would pass unseen.
    # --report-api-errors no: torch's harmless API errors are not our kernels' accesses
    within 45 45 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck \
        --report-api-errors no --print-limit 20 --error-exitcode 9 \
        $PY scripts/gpu_check/memcheck.py \
        > "$OUT/memcheck.log" 2>&1
    echo "gpu_check: memcheck rc=$?" >> "$OUT/memcheck.log"
fi
tail -n 3 "$OUT/memcheck.log"

stage "5. ei plan against measured memory"
stage_with_restarts 45 25 plan_memory.jsonl $PY scripts/gpu_check/plan_memory.py

stage "6. tests/gpu"
timeout_flag=()
$PY -c "import pytest_timeout" 2>/dev/null && timeout_flag=(--timeout=60)
within 400 20 $PY -m pytest tests/gpu -q -p no:cacheprovider "${timeout_flag[@]}" \
    --junitxml="$OUT/tests.xml" -o junit_family=xunit1
echo "gpu_check: tests/gpu rc=$?"
kill "$build_pid" 2>/dev/null

stage "7. summary"
require=()
(( DRY )) && require=(--require-complete)
$PY scripts/gpu_check/summary.py "${require[@]}"
rc=$?
stage "done (rc=$rc)"
ls -la "$OUT"
exec >&- 2>&-
sleep 1  # lets tee write the end of gpu_check.log
exit $rc
