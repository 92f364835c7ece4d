"""Which implementation of the fused MoR op runs where.

Nothing here touches the GPU at import time: availability is asked lazily, per call.
Each backend module exposes `forward(...)` and `backward(...)` with the signatures of
`ei_kernels.ops.torch_mor`.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("torch", "triton", "cuda")
# Preference of "auto" on a CUDA device, fastest first (see BENCHMARKS.md for the figures).
_CUDA_PREFERENCE = ("triton", "cuda", "torch")
# "auto" uses the fused kernels from sm_80 (Ampere) on. On sm_75 (T4) Triton's dots run on
# CUDA cores (its own small-tile table, `scripts/tune_triton.py check --arch sm75`) and the
# CUDA extension's bf16 products take an FMA path: both run there when asked for by name, but
# neither has been timed against the torch backend on such a GPU.
_FUSED_MIN_CAPABILITY = (8, 0)


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(name: str, device: torch.device | str | None = None) -> str | None:
    """Why backend `name` cannot run on `device` (None when it can)."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}"
    device = torch.device("cuda" if device is None and torch.cuda.is_available() else device or "cpu")
    if name == "torch":
        return None
    if name == "triton":
        try:
            importlib.import_module("triton")
        except ImportError:
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and _triton_interpreted():
            return None
        return f"triton runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got {device}"
    # name == "cuda"
    if device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got tensors on {device}"
    from .cuda_extension import cuda_extension_info

    info = cuda_extension_info()
    return None if info["loaded"] else f"the CUDA extension is not loaded: {info['reason']}"


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on `device` (default: the current CUDA device if any, else CPU)."""
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]


@functools.lru_cache(maxsize=None)
def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, None for any other; asked once per device."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def multiprocessor_count(device: torch.device) -> int | None:
    """SMs of a CUDA device (torch keeps its properties), None for any other."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def resolve(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Turn "auto" into a concrete backend for `device`, or raise why `name` cannot run there."""
    if name == "auto":
        # The fused kernels cover fp16/bf16/fp32; fp64 (gradcheck, references) stays in torch,
        # and so does every GPU older than the fused kernels' minimum.
        if (device.type != "cuda" or dtype == torch.float64
                or cuda_capability(device) < _FUSED_MIN_CAPABILITY):
            return "torch"
        return next(b for b in _CUDA_PREFERENCE if unavailable_reason(b, device) is None)
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} is not available: {reason}")
    return name


def implementation(name: str) -> ModuleType:
    """The module holding `forward`/`backward` of a concrete backend."""
    module = {"torch": "torch_mor", "triton": "triton_mor", "cuda": "cuda_mor"}[name]
    return importlib.import_module(f"ei_kernels.ops.{module}")
