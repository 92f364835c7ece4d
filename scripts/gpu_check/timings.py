"""Timings of the key ViT-B layer shapes: one JSON line per case in timings.jsonl.

First the machine's measured ceilings (a bf16 GEMM's TFLOP/s, a device copy's bandwidth), then
per shape the frozen nn.Linear floor and FusedMoRLinear on each backend (torch, triton, cuda),
and three variants of the triton backend: the GPU's size not consulted ("fused-triton-unfitted":
the table's launch order, no split last round; a ViT-B proj layer then runs 594 programs in 5
rounds of 132 for 4.5 rounds of work), every row block's tile computing what it needs itself
("fused-triton-unshared": nothing published between programs; the forward's z and the
backward's du | dl | z then cost what they did in one-tile programs before, and every slot
pair's second stores in its own slot, which the slot sum then reads too), and the atomic
token reductions instead of the deterministic slots ("fused-triton-atomic"), and the cuda
backend with its sm_90a TMA + wgmma GEMM switched off ("fused-cuda-portable":
EI_KERNELS_CUDA_SM90=0, every GEMM on the portable mma.sync kernel), without its routed
kernels ("fused-cuda-unrouted": EI_KERNELS_CUDA_SM90=unrouted, the shrink, g and the routing
as launches of their own around the sm_90a GEMM), with d[A_cat; R] as a split-K launch of its
own instead of inside the routed input gradient ("fused-cuda-unfolded":
EI_KERNELS_CUDA_SM90=unfolded) or with one CTA per tile instead of one
persistent CTA per SM ("fused-cuda-one-tile": EI_KERNELS_CUDA_SM90_PERSISTENT=0), and with the
routed forward's shrink not shared out in a cluster ("fused-cuda-no-cluster":
EI_KERNELS_CUDA_SM90_CLUSTER=1, every column tile computes its rows' shrink) or shared out
four ways ("fused-cuda-cluster4": =4; "fused-cuda" pairs column tiles), the routed kernels'
tiles walked round-robin instead of in runs of one row block that share z or g
("fused-cuda-no-runs": EI_KERNELS_CUDA_SM90_RUNS=0; by default the forward walks in runs at
K = 768, the one-group input gradient at O = 768), and with the
backward's sum of the partials launched after the routed input gradient (and that, for qkv,
after the u GEMM) instead of as its programmatic dependent ("fused-cuda-no-pdl":
EI_KERNELS_CUDA_PDL=0). "fused-triton" is
the launcher's choice by its schedule model (ei_kernels/ops/triton_schedule.py); these rows say
what the split, the fitted order and the sharing buy,
forward (no grad) and forward + backward (x needs a gradient, the base is frozen): CUDA events
around each call, median and minimum after warm-up, the peak memory of one fwd+bwd, and for
nn.Linear and the triton and cuda backends the GPU time of each kernel of one fwd+bwd from the
profiler ("kernels_us": where the time goes, e.g. how close each sm_90a kernel comes to the
cuBLAS GEMM next to it).

    python scripts/gpu_check/timings.py [--case-seconds 60]

Dry mode: tiny shapes, fp32, wall clock on the CPU (the interpreter's times mean nothing; the
point is that the stage runs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from collections import defaultdict

from common import (CONTEXT_LOST, DRY, Watchdog, append, context_lost, device, read_records,
                    run_case, short_error, synchronize)

import torch  # noqa: E402

from benchmarks.harness import Timer  # noqa: E402
from benchmarks.layer_providers import build, layer_step  # noqa: E402
from ei_kernels import cuda_extension_info  # noqa: E402

FILE = "timings.jsonl"
N_TOKENS = 33 if DRY else 12608  # ViT-B at batch 64 (197 tokens each)
# (in_features, out_features, groups): attention proj, qkv (one router per q/k/v), fc1, fc2.
SHAPES = [(40, 24, 1), (40, 36, 3)] if DRY else [
    (768, 768, 1), (768, 2304, 3), (768, 3072, 1), (3072, 768, 1)]
# The Triton variants last: within the stage's time cap they are what may be cut.
PROVIDERS = ("linear", "fused-torch", "fused-triton", "fused-cuda", "fused-cuda-one-tile",
             "fused-cuda-no-cluster", "fused-cuda-cluster4", "fused-cuda-unfolded",
             "fused-cuda-no-runs", "fused-cuda-no-pdl",
             "fused-cuda-unrouted", "fused-cuda-portable", "fused-triton-unfitted",
             "fused-triton-unshared", "fused-triton-atomic")
PROFILED = ("linear", "fused-triton", "fused-cuda", "fused-cuda-one-tile",  # their fwd+bwd
            "fused-cuda-no-cluster", "fused-cuda-unfolded")
DTYPE = torch.float32 if DRY else torch.bfloat16
WARMUP, ROUNDS = (1, 2) if DRY else (10, 30)


def _median_ms(fn, warmup, rounds) -> tuple[float, float]:
    timer = Timer(fn, device(), warmup)
    for _ in range(warmup + rounds):
        timer()
    return timer.median_ms(), timer.min_ms()


def ceilings() -> list[dict]:
    """What this machine's bf16 tensor cores and memory actually deliver here."""
    dev = device()
    m = 256 if DRY else 8192
    a = torch.randn(m, m, device=dev, dtype=DTYPE)
    b = torch.randn(m, m, device=dev, dtype=DTYPE)
    gemm_ms, _ = _median_ms(lambda: a @ b, 3, 3 if DRY else 10)
    del a, b
    n = (1 << 20) if DRY else (1 << 30)  # 2 GiB of bf16 per buffer on the GPU
    src = torch.empty(n, device=dev, dtype=DTYPE)
    dst = torch.empty_like(src)
    copy_ms, _ = _median_ms(lambda: dst.copy_(src), 3, 3 if DRY else 10)
    moved = 2 * src.numel() * src.element_size()  # read + written
    return [
        dict(stage="ceiling", case=f"gemm-{m}", dtype=str(DTYPE).removeprefix("torch."),
             median_ms=gemm_ms, tflops=2 * m ** 3 / gemm_ms / 1e9),
        dict(stage="ceiling", case="copy", bytes=moved, median_ms=copy_ms,
             tb_per_s=moved / copy_ms / 1e9),
    ]


@contextlib.contextmanager
def _triton_variant(provider: str):
    """The Triton backend as `provider` runs it: "-unfitted" with the GPU's size not consulted,
    "-unshared" with nothing shared between programs, "-atomic" with the atomic token
    reductions; yields the plain provider name."""
    from ei_kernels.ops import triton_mor

    deterministic, slots, share = triton_mor.DETERMINISTIC, triton_mor._slots, triton_mor.SHARE_Z
    if provider.endswith("-unfitted"):
        triton_mor._slots = lambda device, cfg: None
    if provider.endswith("-unshared"):
        triton_mor.SHARE_Z = False
    if provider.endswith("-atomic"):
        triton_mor.DETERMINISTIC = False
    try:
        yield "-".join(provider.split("-")[:2])  # "fused-triton-atomic" -> "fused-triton"
    finally:
        triton_mor.DETERMINISTIC, triton_mor._slots, triton_mor.SHARE_Z = deterministic, slots, \
            share


@contextlib.contextmanager
def _cuda_variant(provider: str):
    """The cuda backend as `provider` runs it: "-portable" without the sm_90a GEMM,
    "-unrouted" without its routed kernels, "-unfolded" with d[A_cat; R] on its own launch,
    "-one-tile" with one CTA per tile, "-no-cluster"
    and "-cluster4" with the routed forward in clusters of 1 and 4 CTAs, "-no-runs" with the
    routed kernels' tiles walked round-robin (every tile computing its z or g), "-no-pdl"
    with the backward's launches plain, none as the last one's programmatic dependent (the
    extension reads the switches at every call)."""
    switches = {"-portable": ("EI_KERNELS_CUDA_SM90", "0"),
                "-unrouted": ("EI_KERNELS_CUDA_SM90", "unrouted"),
                "-unfolded": ("EI_KERNELS_CUDA_SM90", "unfolded"),
                "-one-tile": ("EI_KERNELS_CUDA_SM90_PERSISTENT", "0"),
                "-no-cluster": ("EI_KERNELS_CUDA_SM90_CLUSTER", "1"),
                "-cluster4": ("EI_KERNELS_CUDA_SM90_CLUSTER", "4"),
                "-no-runs": ("EI_KERNELS_CUDA_SM90_RUNS", "0"),
                "-no-pdl": ("EI_KERNELS_CUDA_PDL", "0")}
    name, value = next((switch for suffix, switch in switches.items()
                        if provider.endswith(suffix)), (None, None))
    before = os.environ.get(name) if name else None
    if name:
        os.environ[name] = value
    try:
        yield
    finally:
        if name and before is None:
            os.environ.pop(name, None)
        elif name:
            os.environ[name] = before


def kernel_name(name: str) -> str:
    """A kernel's short name: no return type, namespaces or template arguments (CuTe kernels'
    demangled names run to thousands of characters), at most 60 characters."""
    name = re.sub(r"^void\s+", "", name)
    name = re.sub(r"\(anonymous namespace\)::|\b\w+::", "", name)
    return re.split(r"[<(]", name, maxsplit=1)[0][:60]


def kernel_times(launches) -> dict[str, float]:
    """{short kernel name: GPU microseconds summed over its launches}, the largest first, from
    (demangled name, microseconds) pairs."""
    total = defaultdict(float)
    for name, us in launches:
        total[kernel_name(name)] += us
    return dict(sorted(total.items(), key=lambda item: -item[1]))


def _profiled_kernels(step) -> dict[str, float]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        synchronize()
    return kernel_times((e.name, e.time_range.elapsed_us()) for e in prof.events()
                        if e.device_type == torch.autograd.DeviceType.CUDA)


def time_case(provider: str, k: int, o: int, groups: int, mode: str) -> dict:
    with _triton_variant(provider) as backend_provider, _cuda_variant(provider):
        record = _time_layer(backend_provider, k, o, groups, mode)
        if provider.startswith("fused-cuda"):  # the switches it ran under (gpu_check may set
            record["sm90"] = os.environ.get("EI_KERNELS_CUDA_SM90", "1")  # them)
            record["persistent"] = os.environ.get("EI_KERNELS_CUDA_SM90_PERSISTENT", "1")
            record["cluster"] = os.environ.get("EI_KERNELS_CUDA_SM90_CLUSTER", "2")
        return record


def _time_layer(provider: str, k: int, o: int, groups: int, mode: str) -> dict:
    dev = device()
    layer = build(provider, k, o, groups, dev, DTYPE)
    x = torch.randn(N_TOKENS, k, device=dev, dtype=DTYPE, requires_grad=(mode == "fwd+bwd"))
    dy = torch.randn(N_TOKENS, o, device=dev, dtype=DTYPE)

    step = layer_step(layer, x, dy, mode)
    t0 = time.perf_counter()
    step()  # compiles the kernels of a new specialisation
    synchronize()
    first_call_s = time.perf_counter() - t0
    median_ms, min_ms = _median_ms(step, WARMUP, ROUNDS)
    record = dict(median_ms=median_ms, min_ms=min_ms, first_call_s=round(first_call_s, 3))
    if not DRY and mode == "fwd+bwd":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        record["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        if provider in PROFILED:
            try:
                record["kernels_us"] = _profiled_kernels(step)
            except Exception as err:  # the timing stands without its breakdown
                if context_lost(err):
                    raise
                record["kernels_error"] = short_error(err)
    return record


def _shape_id(k, o, groups):
    return f"K{k}-O{o}{'-qkv' if groups == 3 else ''}-N{N_TOKENS}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case-seconds", type=float, default=60.0)
    args = parser.parse_args()
    done = {(r.get("stage"), r.get("case"), r.get("provider"), r.get("mode"))
            for r in read_records(FILE)}
    if ("ceiling", "copy", None, None) not in done:
        with Watchdog(args.case_seconds):
            for record in ceilings():
                append(FILE, record)
                print(record, flush=True)
    cuda_loaded = cuda_extension_info()["loaded"]
    for k, o, groups in SHAPES:
        for provider in PROVIDERS:
            for mode in ("fwd", "fwd+bwd"):
                case = _shape_id(k, o, groups)
                if ("layer", case, provider, mode) in done:
                    continue
                base = dict(stage="layer", case=case, provider=provider, mode=mode, k=k, o=o,
                            groups=groups, n=N_TOKENS, dtype=str(DTYPE).removeprefix("torch."))
                if provider.startswith("fused-cuda") and (DRY or not cuda_loaded):
                    append(FILE, {**base, "skipped": "no CUDA device" if DRY else
                                  "the CUDA extension is not loaded"})
                    continue
                result, lost = run_case(
                    FILE, base, lambda: time_case(provider, k, o, groups, mode),
                    args.case_seconds)
                shown = (f"{result['median_ms']:9.3f} ms" if "median_ms" in result
                         else result["error"])
                print(f"{case:24s} {provider:13s} {mode:8s} {shown}", flush=True)
                if lost:
                    return CONTEXT_LOST
    return 0


if __name__ == "__main__":
    sys.exit(main())
