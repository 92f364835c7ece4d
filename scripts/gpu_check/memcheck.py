"""Every memory access of the CUDA backend's kernels checked by compute-sanitizer's memcheck:
gpu_check.sh runs `compute-sanitizer --tool memcheck ... python memcheck.py`, output in
memcheck.log. The correctness stage checks values, with NaN-poisoned outputs; a write past the
end of an output lands in some other tensor and goes unseen there. Here each tensor is its own
cudaMalloc (PYTORCH_NO_CUDA_MEMORY_CACHING, set by gpu_check.sh), so the sanitizer knows its
bounds.

One forward + backward per case and sm_90a mode, on small shapes with partial tiles in every
dimension, from the mode the correctness ladder reached (the EI_KERNELS_CUDA_SM90* switches
as gpu_check.sh exports them; default all sm_90a kernels) down to the portable kernels.
Prints "memcheck case <id> mode <mode>: done" after each; the sanitizer's "ERROR SUMMARY"
line ends the log. In dry mode the same cases run on the CPU with
the torch backend, so that the script never rots.
"""

from __future__ import annotations

import os
import sys

from common import DRY, device, synchronize

import torch  # noqa: E402  (after common: it sets sys.path)

from correctness import (  # noqa: E402
    RANKS, SCALINGS, SM90_ENV, SM90_LADDER, SM90_SWITCHES, TRAINABLE)
from ei_kernels import mor_linear_with_routing  # noqa: E402
from mor_reference import make_inputs  # noqa: E402

# (id, tokens, K, O, groups, router): which kernels each takes in mode "1" on an H100/H200
CASES = [
    ("routed-K104-O200", 333, 104, 200, 1, True),  # the routed forward and input gradient
    ("routed-qkv-K104-O576", 333, 104, 576, 3, True),  # both routed, 3 groups
    ("lora-K104-O200", 333, 104, 200, 1, False),  # no router: plain LoRA
    ("portable-K100-O37", 333, 100, 37, 1, True),  # rows TMA cannot load: portable kernels
    ("one-token-K104-O200", 1, 104, 200, 1, True),
    # 198 tiles each way, more than an H100/H200 has SMs: persistent CTAs walk several tiles,
    # and the input gradient's (round-robin over 6 column tiles) add them in 22 shared slots
    ("persistent-N4100-K1000-O1000", 4100, 1000, 1000, 1, True),
]


def modes_left() -> list[str]:
    """The ladder from the mode set in the environment down to the portable kernels (a switch
    left unset matches any value, EI_KERNELS_CUDA_SM90 defaults to "1")."""
    env = [os.environ.get(name) for name in SM90_SWITCHES]
    env[0] = env[0] or "1"
    start = next((i for i, mode in enumerate(SM90_LADDER)
                  if all(v in (None, want) for v, want in zip(env, SM90_ENV[mode]))), 0)
    return list(SM90_LADDER[start:])


def forward_backward(n, k, o, groups, router, backend) -> None:
    if DRY:  # CPU time: tiny shapes in fp32
        n, k, o = min(n, 33), min(k, 104), o if o <= 576 else 200
    inputs = make_inputs((n,), k, o, ranks=RANKS, router=router, groups=groups,
                         dtype=torch.float32 if DRY else torch.bfloat16, seed=0)
    leaves = {name: None if v is None else v.to(device()).requires_grad_(name in TRAINABLE)
              for name, v in inputs.items()}
    y, _ = mor_linear_with_routing(*leaves.values(), ranks=RANKS, scalings=SCALINGS,
                                   groups=groups, backend=backend)
    y.backward(torch.randn_like(y))
    synchronize()


def main() -> int:
    backend = "torch" if DRY else "cuda"
    modes = modes_left()
    print(f"memcheck modes: {' '.join(modes)}", flush=True)
    for mode in modes:
        os.environ.update(zip(SM90_SWITCHES, SM90_ENV[mode]))  # read at every call
        for case_id, *shape in CASES:
            forward_backward(*shape, backend=backend)
            print(f"memcheck case {case_id} mode {mode}: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
