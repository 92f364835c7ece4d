"""Finding and loading the compiled CUDA extension (`ei_kernels._C`), lazily and safely.

`import ei_kernels` never needs the extension: the first call that asks for it tries the import
once and remembers the outcome, so `cuda_extension_info()` can say why it is missing. Nothing
here touches the GPU. With EI_KERNELS_CUDA_JIT=1 a missing `_C` is compiled from csrc/ by
torch.utils.cpp_extension on first use (minutes) instead.

Loading also registers the fake (meta) functions of the ops `ei_kernels_cuda::mor_fwd` and
`ei_kernels_cuda::mor_bwd`, so they trace under torch.compile and pass torch.library.opcheck.
mor_fwd returns (y, probs, [u | l]); mor_bwd takes that [u | l] back, or None to recompute u.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from pathlib import Path

import torch

_JIT_ENV = "EI_KERNELS_CUDA_JIT"
_CSRC = Path(__file__).resolve().parent.parent / "csrc"


def _built_path() -> str | None:
    """Where `ei_kernels._C` was built to, whether or not it can be loaded."""
    spec = importlib.util.find_spec("ei_kernels._C")
    return spec.origin if spec is not None else None


def _jit_build() -> tuple[str | None, str | None]:
    if not (_CSRC / "build.py").is_file():
        return None, f"{_JIT_ENV}=1 but the sources are not at {_CSRC}"
    spec = importlib.util.spec_from_file_location("ei_kernels_cuda_build", _CSRC / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    try:
        path = build.jit_load(_CSRC.parent / "build" / "cuda_jit")
    except Exception as err:  # a compiler failure surfaces as the reason, never at import
        return None, f"the just-in-time build ({_JIT_ENV}=1) failed: {err}"
    return str(path), None


@functools.lru_cache(maxsize=None)
def _load() -> tuple[str | None, str | None, str | None]:
    """(built library path, loaded library path, reason it is not loaded)."""
    built = _built_path()
    try:
        module = importlib.import_module("ei_kernels._C")
    except ImportError as err:
        if os.environ.get(_JIT_ENV) == "1":
            loaded, reason = _jit_build()
            if loaded is not None:
                _register_fakes()
            return loaded, loaded, reason
        how = ("scripts/build_cuda_ext.sh, `EI_KERNELS_FORCE_CUDA_BUILD=1 pip install "
               f"--no-build-isolation -e .`, or set {_JIT_ENV}=1")
        return built, None, f"ei_kernels._C could not be imported ({err}); build it with {how}"
    _register_fakes()
    return built, module.__file__, None


def cuda_extension_info() -> dict:
    """{"built": bool, "loaded": bool, "path": str | None, "reason": str | None,
    "sm90_gemm": bool | None}.

    "path" is the loaded library (else the built one, if any); "reason" says why it is not
    loaded (None when it is); "sm90_gemm" whether the loaded library holds the sm_90a TMA +
    wgmma GEMM (None when nothing is loaded). It runs on compute capability 9.0 devices for
    16-bit inputs unless EI_KERNELS_CUDA_SM90=0 (=unrouted: without the routed forward and
    input gradient; =unfolded: d[A_cat; R] not inside the routed input gradient); elsewhere
    every GEMM takes the portable kernel.
    """
    built, loaded, reason = _load()
    return {
        "built": built is not None,
        "loaded": loaded is not None,
        "path": loaded or built,
        "reason": reason,
        "sm90_gemm": _sm90_gemm_built() if loaded else None,
    }


@functools.lru_cache(maxsize=None)
def _sm90_gemm_built() -> bool:
    # Asked once: cuda_extension_info() runs on every call of the cuda backend.
    return bool(torch.ops.ei_kernels_cuda.sm90_gemm_built())


def _register_fakes() -> None:
    """Output shapes and dtypes of the C++ ops, without running them."""

    @torch.library.register_fake("ei_kernels_cuda::mor_fwd")
    def _(x, weight, bias, lora_a, lora_b, router_weight, router_bias, ranks, scalings, bypass,
          groups):
        logits = groups * (len(ranks) + int(bypass)) if router_weight is not None else 0
        n, f32 = x.shape[0], torch.float32
        return (x.new_empty((n, weight.shape[0])), x.new_empty((n, logits), dtype=f32),
                x.new_empty((n, lora_a.shape[0] + logits), dtype=f32))  # [u | l]

    @torch.library.register_fake("ei_kernels_cuda::mor_bwd")
    def _(dy, x, probs, weight, lora_a, lora_b, router_weight, shrink, ranks, scalings, bypass,
          groups, compute_dx):
        logits = probs.shape[1]
        k = x.shape[1]
        return (
            x.new_empty((x.shape[0] if compute_dx else 0, k)),
            x.new_empty(lora_a.shape),
            x.new_empty(lora_b.shape),
            x.new_empty((logits, k)),
            x.new_empty((logits,)),
        )
