"""Input validation for the MoR op: every bad input becomes a Python error naming the argument.

Runs before any backend sees the tensors, so native kernels only ever get consistent inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .spec import MoRSpec

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _expect_shape(name: str, t: Tensor, shape: tuple[int, ...], why: str) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape} ({why}), got {tuple(t.shape)}")


def check_mor_inputs(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    router_weight: Tensor | None,
    router_bias: Tensor | None,
    spec: MoRSpec,
) -> None:
    named = {
        "x": x, "weight": weight, "bias": bias, "lora_a": lora_a, "lora_b": lora_b,
        "router_weight": router_weight, "router_bias": router_bias,
    }
    for name, t in named.items():
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: expected a floating-point dtype {FLOAT_DTYPES}, got {x.dtype}")
    for name, t in named.items():
        if t is None or name == "x":
            continue
        if t.dtype != x.dtype:
            raise TypeError(
                f"{name}: expected dtype {x.dtype} (the dtype of x), got {t.dtype}; cast the "
                f"layer or run under torch.autocast"
            )
        if t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (where x is), got {t.device}")
    if router_bias is not None and router_weight is None:
        raise ValueError("router_bias: given without router_weight (no router means plain LoRA)")

    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dimension (..., in_features), got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected 2 dimensions (out, in), got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x: expected last dimension {in_features} (weight is {tuple(weight.shape)}), "
            f"got shape {tuple(x.shape)}"
        )
    G, r, L = spec.groups, spec.rank, spec.num_logits
    if out_features % G:
        raise ValueError(f"groups: {G} does not divide out_features={out_features}")
    if bias is not None:
        _expect_shape("bias", bias, (out_features,), "out_features")
    _expect_shape("lora_a", lora_a, (G * r, in_features), f"groups*sum(ranks)={G * r}, in_features")
    _expect_shape("lora_b", lora_b, (out_features, r), f"out_features, sum(ranks)={r}")
    if router_weight is not None:
        why = f"groups*(branches{' + bypass' if spec.bypass else ''})={G * L}, in_features"
        _expect_shape("router_weight", router_weight, (G * L, in_features), why)
    if router_bias is not None:
        _expect_shape("router_bias", router_bias, (G * L,), "one per router output")
