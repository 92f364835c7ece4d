"""What the benchmarks share: the device, the quick mode, timing, and saved-activation bytes.

Environment:
    EI_BENCH_DEVICE  cpu | cuda   (default: cuda when available)
    EI_BENCH_QUICK=1              smoke mode for CI: tiny sizes, one timed round
    EI_BENCH_OUT     folder for results JSON and markdown (default: benchmarks/results)
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch


def bench_device() -> torch.device:
    name = os.environ.get("EI_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def quick_mode() -> bool:
    return os.environ.get("EI_BENCH_QUICK", "0") == "1"


def out_dir() -> Path:
    return Path(os.environ.get("EI_BENCH_OUT", Path(__file__).parent / "results"))


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


class Timer:
    """Times one call of `fn` per round: CUDA events on a GPU, the wall clock on a CPU. Used as
    the function that pytest-benchmark's pedantic mode runs; its first `warmup` calls (the
    pedantic warm-up rounds) are not kept."""

    def __init__(self, fn, device: torch.device, warmup: int = 0):
        self.fn, self.device, self.ms, self.skip = fn, device, [], warmup

    def __call__(self):
        if self.skip:
            self.skip -= 1
            self.fn()
            return
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.fn()
            end.record()
            end.synchronize()
            self.ms.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            self.fn()
            self.ms.append((time.perf_counter() - t0) * 1e3)

    def median_ms(self) -> float:
        return statistics.median(self.ms)

    def min_ms(self) -> float:
        """The least disturbed round: on a shared CPU the ratio of minima is the steadier one."""
        return min(self.ms)


def saved_activation_bytes(run_forward, parameters) -> int:
    """Bytes autograd keeps for backward during `run_forward()`, not counting parameters
    (shared storages are counted once)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in parameters}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_forward()
    return sum(saved.values())
