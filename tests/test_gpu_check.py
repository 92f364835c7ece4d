"""scripts/gpu_check: the summary reads whatever a killed run left (cut lines, cases started but
never finished, missing files) and says so; its exit status flags failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check"
# The correctness stage's case list, counted from its source (the module imports torch and the
# package; the summary runs as its own process anyway).
N_CASES = (SCRIPTS / "correctness.py").read_text().split("\nCASES = [")[1].split("\n]")[0] \
    .count('    Case("')


def _summary(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / "summary.py"), *args],
                          env={**os.environ, "OUT": str(out)}, capture_output=True, text=True,
                          timeout=120)


def _lines(path: Path, records: list[dict], cut: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + cut)


def test_summary_of_a_run_killed_half_way(tmp_path):
    (tmp_path / "facts.json").write_text(json.dumps({"gpu": "NVIDIA H200", "torch": "2.11.0"}))
    (tmp_path / "cuda_build.log").write_text(
        "ei-kernels: {'built': True, 'loaded': True, 'sm90_gemm': True}\n"
        "gpu_check: build rc=0 in 61 s\n")
    case = {"stage": "correctness", "backend": "triton"}
    _lines(tmp_path / "correctness.jsonl", [
        {**case, "case": "vitb-fc1-bf16", "verdict": "started"},
        {**case, "case": "vitb-fc1-bf16", "verdict": "pass"},
        {**case, "case": "vitb-qkv-groups3-bf16", "verdict": "started"},  # hung: killed
    ], cut='{"stage": "correctness", "backend": "tri')  # a line cut by the kill
    _lines(tmp_path / "timings.jsonl", [
        {"stage": "ceiling", "case": "gemm-8192", "median_ms": 1.4, "tflops": 785.0},
        {"stage": "layer", "case": "K768-O768-N12608", "provider": "linear", "mode": "fwd",
         "median_ms": 0.05},
        {"stage": "layer", "case": "K768-O768-N12608", "provider": "fused-triton", "mode": "fwd",
         "median_ms": 0.06},
        {"stage": "layer", "case": "K768-O768-N12608", "provider": "fused-cuda",
         "mode": "fwd+bwd", "median_ms": 0.09,
         "kernels_us": {"routed_dgrad_kernel": 31.5, "routed_gemm_kernel": 30.25}},
    ])
    case = {"stage": "ei", "checkpointing": False, "precision": "bf16", "batch": 8,
            "image_size": 448}
    _lines(tmp_path / "plan_memory.jsonl", [
        {**case, "started": True},
        {**case, "planned_bytes": 12 * 2**30, "measured_bytes": 9 * 2**30},
    ])
    result = _summary(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr  # the hung case is a problem
    text = (tmp_path / "summary.md").read_text()
    assert "NVIDIA H200" in text and "build rc=0 in 61 s, sm_90a GEMM built: yes" in text
    assert (f"correctness triton: 1 hung or crashed, 1 pass, {N_CASES - 2} not run (time)"
            in text)
    assert "started vitb-qkv-groups3-bf16: hung or crashed" in text
    assert "ceiling gemm-8192: 785 TFLOP/s" in text
    # providers: linear, torch, triton, cuda, cuda one CTA per tile, cuda without clusters and
    # in clusters of 4, cuda with d[A_cat; R] on its own launch, cuda with the routed forward's
    # tiles round-robin, cuda with the backward's sum launched after the routed input gradient
    # (not as its dependent), cuda without its routed
    # kernels, cuda without its sm_90a kernels, and triton with the GPU's size not consulted,
    # nothing shared between programs, atomic
    assert ("| K768-O768-N12608 | fwd | 0.050 | - | 0.060 | - | - | - | - | - | - | - | - | - "
            "| - | - | - | - | 1.20 | - | - | - | - | - | - | - | - | - | - | - |" in text)
    assert ("K768-O768-N12608 fused-cuda: routed_dgrad_kernel 31.5, routed_gemm_kernel 30.2"
            in text)
    assert "| ei bf16 b8 448 px | 12.00 | 9.00 | 0.75 |" in text
    assert "plan_memory incomplete" in text  # 1 of its 4 cases
    assert "no tests.xml" in text


def test_summary_of_a_clean_run_passes_and_require_complete_checks_completeness(tmp_path):
    (tmp_path / "facts.json").write_text(json.dumps({"gpu": "none", "dry": True}))
    (tmp_path / "cuda_build.log").write_text("gpu_check: build rc=0 in 3 s\n")
    _lines(tmp_path / "correctness.jsonl", [
        {"stage": "correctness", "backend": "triton", "case": "vitb-fc1-bf16", "verdict": "pass"}])
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite tests="2" failures="0" errors="0" skipped="2">'
        '<testcase classname="t" name="a"/><testcase classname="t" name="b"/>'
        '</testsuite></testsuites>')
    assert _summary(tmp_path).returncode == 0
    incomplete = _summary(tmp_path, "--require-complete")
    assert incomplete.returncode == 1
    assert (f"incomplete: triton: {N_CASES - 1} cases not run, no layer timings"
            in incomplete.stdout)


def test_summary_reports_memcheck_errors_and_a_cut_memcheck_run(tmp_path):
    (tmp_path / "cuda_build.log").write_text("gpu_check: build rc=0 in 40 s\n")
    log = tmp_path / "memcheck.log"
    log.write_text(
        "========= COMPUTE-SANITIZER\n"
        "memcheck modes: unrouted 0\n"
        "memcheck case routed-K104-O200 mode unrouted: done\n"
        "========= Invalid __global__ write of size 2 bytes\n"
        "=========     at void ei_kernels::ext_gemm_kernel<T>(Params)+0x1f30\n"
        "=========     by thread (5,0,0) in block (3,0,0)\n"
        "========= ERROR SUMMARY: 1 error\n"
        "gpu_check: memcheck rc=9\n")
    result = _summary(tmp_path)
    assert result.returncode == 1
    text = (tmp_path / "summary.md").read_text()
    assert "memcheck: 1 of 12 fwd+bwd runs (sm_90a modes unrouted 0), 1 errors" in text
    assert ("Invalid __global__ write of size 2 bytes at void ei_kernels::ext_gemm_kernel<T>"
            in text)
    assert "PROBLEMS: memcheck errors" in text
    # killed by its time limit: no error found so far is no failure, but it is incomplete
    log.write_text("memcheck modes: 1 one-tile unrouted 0\n"
                   "memcheck case routed-K104-O200 mode 1: done\n"
                   "gpu_check: memcheck rc=124\n")
    result = _summary(tmp_path)
    assert result.returncode == 0, result.stdout
    assert "memcheck: 1 of 24 fwd+bwd runs (sm_90a modes 1 one-tile unrouted 0), no error " \
           "summary, timed out" in result.stdout
    assert "memcheck incomplete" in result.stdout
    log.write_text("memcheck modes: 0\n"
                   "========= Invalid __shared__ read of size 2048 bytes\n"
                   "=========     at routed_gemm_kernel+0x2570\n"
                   "========= ERROR SUMMARY: 1 error\n"
                   "gpu_check: memcheck rc=9\n")
    result = _summary(tmp_path)
    assert result.returncode == 0, result.stdout  # listed, not counted (sanitizer misjudgements)
    assert "(1 of 1 reports on shared memory: not counted)" in result.stdout
    log.write_text("memcheck modes: 0\n"  # a hardware exception is no shared-memory report
                   "========= Warp Illegal Address\n"
                   "=========     at routed_dgrad_kernel+0x1a0\n"
                   "========= Invalid __shared__ read of size 2048 bytes\n"
                   "=========     at routed_gemm_kernel+0x2570\n"
                   "========= ERROR SUMMARY: 2 errors\n"
                   "gpu_check: memcheck rc=9\n")
    result = _summary(tmp_path)
    assert result.returncode == 1 and "Warp Illegal Address at routed_dgrad_kernel" in \
        result.stdout
    log.write_text("gpu_check: memcheck skipped: no compute-sanitizer\n")
    assert "memcheck skipped: no compute-sanitizer" in _summary(tmp_path).stdout


def test_kernel_times_sum_launches_under_short_names():
    """The profiled breakdown: demangled names shortened (no namespaces, template arguments or
    parameters), launches of one kernel summed, the largest first."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        import timings
    finally:
        sys.path.remove(str(SCRIPTS))
    routed = ("void ei::(anonymous namespace)::routed_gemm_kernel<ei::(anonymous namespace)::"
              "RoutedConfig<cutlass::bfloat16_t>, cute::TmaDescriptor>(int, float*)")
    times = timings.kernel_times([
        (routed, 30.0), ("void ei::gemm_kernel<ei::TallTile, true>(ei::GemmArgs)", 4.0),
        ("void ei::gemm_kernel<ei::WideTile, false>(ei::GemmArgs)", 5.5),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_"
         "execute_segment_k_off_kernel__5x_cublas", 18.0)])
    assert list(times) == ["routed_gemm_kernel",
                           "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_",
                           "gemm_kernel"]
    assert times["gemm_kernel"] == 9.5 and times["routed_gemm_kernel"] == 30.0


def test_cuda_correctness_steps_down_the_sm90_ladder_past_modes_that_hung():
    """A case that never finished (or lost the context) under a mode moves the cases still to
    run one step down: every sm_90a kernel persistent, then without clusters, then one CTA per
    tile, then without d[A_cat; R] in the routed input gradient, then the plain sm_90a GEMM,
    then none."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        import correctness
    finally:
        sys.path.remove(str(SCRIPTS))
    cuda = {"backend": "cuda"}
    passed = [{**cuda, "case": "a", "sm90": "1", "verdict": "started"},
              {**cuda, "case": "a", "sm90": "1", "verdict": "pass"}]
    hung = [{**cuda, "case": "b", "sm90": "1", "verdict": "started"}]
    lost = [{**cuda, "case": "c", "sm90": "one-tile", "verdict": "started"},
            {**cuda, "case": "c", "sm90": "one-tile", "verdict": "error", "context_lost": True}]
    triton_hung = [{"backend": "triton", "case": "d", "verdict": "started"}]
    assert correctness.sm90_mode([]) == "1"
    assert correctness.sm90_mode(passed + triton_hung) == "1"
    assert correctness.sm90_mode(passed + hung) == "no-cluster"
    no_cluster_hung = [{**cuda, "case": "e", "sm90": "no-cluster", "verdict": "started"}]
    assert correctness.sm90_mode(passed + hung + no_cluster_hung) == "one-tile"
    assert correctness.sm90_mode(passed + hung + no_cluster_hung + lost) == "unfolded"
    assert correctness.sm90_mode(lost) == "1"  # "one-tile" broke, but "1" never did
    assert set(correctness.SM90_ENV) == set(correctness.SM90_LADDER)
