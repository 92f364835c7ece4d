"""Launch configurations of the Triton MoR kernels (`triton_mor.py`): small static tables.

Every entry compiles for its architecture within the shared-memory limit, and with at most
256 bytes of register spills: none for one group on tensor cores (16-bit, TF32), up to 200 B
for the IEEE-fp32 backward's FMA tiles (its operands live in registers) and for groups=3
(the backward unrolls its group loop). `python scripts/tune_triton.py check` verifies this
without a GPU. The timings behind the choices are not measured yet (`tune_triton.py tune`
on a GPU does it).

One table per architecture family (sm75 for Turing, sm80 for the A100 and as the conservative
default, sm86 for the 100 KiB Ampere/Ada cards, sm90 for Hopper), keyed by kernel, dtype class
and shape class. Nothing is autotuned in the autograd path: a new shape never triggers
benchmarking, only (at most) one compilation.

Block meanings per kernel (every kernel tiles tokens by `block_m`):
    fwd       block_n: output columns per tile (inside one group), block_k: step over K.
    bwd       block_n: dx columns (over K) per tile, block_k: step over O (the dy loops) and over
              K (the u recompute).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

# Below this many tokens a layer is "small": smaller token tiles so that the grid still fills
# the 108-132 SMs of an A100/H100 (ViT-B at batch 8 has 1576 tokens).
SMALL_ROWS = 4096


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    # Row blocks that sweep all their column tiles together (L2 reuse of W and x); the launcher
    # may widen the sweep to fit the GPU's rounds (triton_schedule.launch_order).
    group_m: int = 8
    # Programs of this config that fit on one SM at once (registers, shared memory, threads)
    # for every variant of the kernel: what the launcher's schedule assumes of the GPU
    # (triton_schedule). `tune_triton.py check` fails where the compiled code fits fewer.
    programs_per_sm: int = 1


_C = KernelConfig

# fp32 without TF32 runs tl.dot on CUDA cores (FMA): operands live in registers, so its tiles
# are much smaller.
_IEEE32 = {
    ("fwd", "fp32", "large"): _C(128, 64, 16, 8, 3),
    ("fwd", "fp32", "small"): _C(64, 64, 16, 4, 3),
    ("bwd", "fp32", "large"): _C(32, 64, 16, 4, 3),
    ("bwd", "fp32", "small"): _C(32, 64, 16, 4, 3),
}

# (kernel, dtype class, shape class) -> config; dtype class "16" is fp16/bf16, "tf32" is fp32
# with TF32 allowed, "fp32" is IEEE fp32.
# sm90 (227 KiB shared memory per SM). The launcher fits each launch's order to the SM count
# (triton_schedule): for ViT-B proj at N = 12608 on 132 SMs, 594 tiles of 128 x 128 in sweeps
# of 22 row blocks, the last 66 split in two, 660 programs.
_SM90 = {
    ("fwd", "16", "large"): _C(128, 128, 64, 8, 4),
    ("fwd", "16", "small"): _C(64, 128, 64, 4, 4),
    ("fwd", "tf32", "large"): _C(128, 128, 32, 8, 3),
    ("fwd", "tf32", "small"): _C(64, 128, 32, 4, 3),
    ("bwd", "16", "large"): _C(128, 128, 32, 8, 3),
    ("bwd", "16", "small"): _C(64, 128, 64, 8, 4),
    ("bwd", "tf32", "large"): _C(64, 128, 32, 8, 3),
    ("bwd", "tf32", "small"): _C(64, 128, 32, 8, 3),
    **_IEEE32,
}

# sm80 (A100: 164 KiB shared memory). The bf16/fp16 large forward steps 32 deep over 4 stages:
# 64 deep over 3 it spilled 40 B on sm_80 and 72 B on sm_86/89 (255 registers; now 219-220
# and none, tune_triton.py check). The bf16/fp16 large backward on 64-row tiles: with 128 rows
# its groups=3 form spills 332 B, at the cost of twice the deterministic slot traffic. None of
# this is timed on such a card yet.
_SM80 = {
    ("fwd", "16", "large"): _C(128, 128, 32, 8, 4),
    ("fwd", "16", "small"): _C(64, 128, 32, 4, 3),
    ("fwd", "tf32", "large"): _C(128, 128, 32, 8, 3),
    ("fwd", "tf32", "small"): _C(64, 128, 32, 4, 3),
    ("bwd", "16", "large"): _C(64, 128, 32, 8, 3),
    ("bwd", "16", "small"): _C(64, 128, 32, 8, 3),
    ("bwd", "tf32", "large"): _C(64, 64, 32, 8, 3),
    ("bwd", "tf32", "small"): _C(64, 64, 32, 8, 3),
    **_IEEE32,
}

# sm86/sm89 (RTX 30xx/40xx, A10, L4: about 100 KiB shared memory): every sm80 entry fits, so
# the table is sm80's, checked against that limit (tune_triton.py's sm86 and sm89 targets).
_SM86 = dict(_SM80)

# sm75 (T4, 64 KiB shared memory): no tensor-core dots in Triton there and no asynchronous
# copies, so every dtype runs the FMA tiles of IEEE fp32, unpipelined (one stage). A fallback
# for `backend="triton"` asked for explicitly; `auto` picks the torch backend below sm_80.
_SM75 = {
    (kernel, dtype_class, shape_class): dataclasses.replace(cfg, num_stages=1)
    for (kernel, _, shape_class), cfg in _IEEE32.items()
    for dtype_class in ("16", "fp32")  # no TF32 before sm_80 (triton_mor._dot_precision)
}

# TRITON_INTERPRET=1 on CPU: the smallest tiles tl.dot accepts, so that the tiny test shapes
# (K=40, O=24, N=33) cross several tiles and every masked edge is exercised.
_INTERPRETER = {
    "fwd": _C(16, 16, 32, 1, 1),
    "bwd": _C(16, 16, 16, 1, 1, group_m=2),
}

TABLES = {"sm75": _SM75, "sm80": _SM80, "sm86": _SM86, "sm90": _SM90}


def arch_name(capability: tuple[int, int]) -> str:
    """Table of a compute capability: Hopper gets sm90, Turing sm75, the 100 KiB Ampere/Ada
    cards (sm_86, sm_87, sm_89) sm86, everything else the conservative sm80."""
    if capability[0] == 9:
        return "sm90"
    if capability < (8, 0):
        return "sm75"
    return "sm86" if (8, 6) <= capability < (9, 0) else "sm80"


def launch_config(
    kernel: str, capability: tuple[int, int] | None, n_rows: int, dtype: torch.dtype,
    precision: str,
) -> KernelConfig:
    """Config of `kernel` for `n_rows` tokens of `dtype`, tl.dot `precision` ("tf32" or "ieee",
    which only matters for fp32); capability None means the CPU interpreter."""
    if capability is None:
        return _INTERPRETER[kernel]
    if dtype != torch.float32:
        dtype_class = "16"
    else:
        dtype_class = "tf32" if precision == "tf32" else "fp32"
    shape_class = "small" if n_rows <= SMALL_ROWS else "large"
    return TABLES[arch_name(capability)][(kernel, dtype_class, shape_class)]
