"""The "cuda" backend: the hand-written kernels of csrc/ (ops `ei_kernels_cuda::mor_fwd` and
`mor_bwd` of the compiled extension), behind the contract of `torch_mor`.

The kernels read dense row-major operands. Inputs are passed through `.contiguous()`, a no-op
for the usual layouts; a transposed or sliced x (or an expanded dy from autograd) is copied
once here. float16, bfloat16 and float32 run on the GPU; float64 is refused (backend "torch").
"""

from __future__ import annotations

import os

import torch

from ..cuda_extension import cuda_extension_info
from ..spec import MoRSpec

# The extension's run-time switches (README, "Building the CUDA extension") and the values it
# knows. It reads any other value as the default, which would hide a typo: refused here.
SWITCHES = {
    "EI_KERNELS_CUDA_SM90": ("0", "1", "unrouted", "unfolded"),
    "EI_KERNELS_CUDA_SM90_PERSISTENT": ("0", "1"),
    "EI_KERNELS_CUDA_SM90_CLUSTER": ("1", "2", "4"),
    "EI_KERNELS_CUDA_SM90_RUNS": ("0", "1"),
    "EI_KERNELS_CUDA_PDL": ("0", "1"),
}


def check_switches() -> None:
    """Raises ValueError naming a switch set to a value the extension does not know (unset or
    empty: the default)."""
    for name, known in SWITCHES.items():
        value = os.environ.get(name, "")
        if value and value not in known:
            raise ValueError(f"environment variable {name}={value!r}: expected one of "
                             f"{', '.join(known)}, or unset for the default")


def _ops():
    check_switches()
    info = cuda_extension_info()
    if not info["loaded"]:
        raise RuntimeError(f"the cuda backend needs the compiled extension: {info['reason']}")
    return torch.ops.ei_kernels_cuda


def _dense(t):
    return None if t is None else t.contiguous()


def forward(x, weight, bias, lora_a, lora_b, router_weight, router_bias, spec: MoRSpec,
            keep_u: bool = False):
    """-> (y, probs), or (y, probs, u) with keep_u: here u is the kernels' fp32 [u | l]
    [N, G*(r + L)], the storage `torch_mor.keeps_u` budgets for, for `backward`."""
    y, probs, shrink = _ops().mor_fwd(
        x.contiguous(), weight.contiguous(), _dense(bias), lora_a.contiguous(),
        lora_b.contiguous(), _dense(router_weight), _dense(router_bias),
        list(spec.ranks), list(spec.scalings), spec.bypass, spec.groups,
    )
    return (y, probs, shrink) if keep_u else (y, probs)


def backward(dy, x, probs, weight, lora_a, lora_b, router_weight, spec: MoRSpec, compute_dx,
             u=None):
    """u: what `forward(..., keep_u=True)` returned, or None to recompute it from x."""
    return _ops().mor_bwd(
        dy.contiguous(), x.contiguous(), probs.contiguous(), weight.contiguous(),
        lora_a.contiguous(), lora_b.contiguous(), _dense(router_weight), u,
        list(spec.ranks), list(spec.scalings), spec.bypass, spec.groups, compute_dx,
    )
