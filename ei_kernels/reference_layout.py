"""Conversion between `FusedMoRLinear`'s fused tensors and the authors' per-branch key layout.

Single linear: linear.weight, linear.bias, lora_as.{i}.weight (r_i x K),
lora_bs.{i}.weight (O x r_i), route.weight (L x K), route.bias (L).
qkv (groups=3): linear.*, then for each of q, k, v: lora_as_q.{i}.weight,
lora_bs_q.{i}.weight (O/3 x r_i), route_q.weight, route_q.bias (then _k, _v).
"""

from __future__ import annotations

import torch
from torch import Tensor

_GROUP_SUFFIXES = {1: ("",), 3: ("_q", "_k", "_v")}


def _layout(module) -> dict[str, tuple[Tensor, tuple]]:
    """Reference key -> (our tensor, index into it) for every tensor of `module`."""
    spec = module.spec
    if spec.groups not in _GROUP_SUFFIXES:
        raise ValueError(
            f"groups: the authors' layout exists for groups=1 and groups=3 (qkv), got {spec.groups}"
        )
    out = {"linear.weight": (module.weight, ())}
    if module.bias is not None:
        out["linear.bias"] = (module.bias, ())
    og, r, L = module.out_features // spec.groups, spec.rank, spec.num_logits
    for g, suffix in enumerate(_GROUP_SUFFIXES[spec.groups]):
        rows = slice(g * og, (g + 1) * og)
        for i, (start, end, _) in enumerate(spec.branch_spans()):
            out[f"lora_as{suffix}.{i}.weight"] = (module.lora_a, (slice(g * r + start, g * r + end),))
            out[f"lora_bs{suffix}.{i}.weight"] = (module.lora_b, (rows, slice(start, end)))
        if module.router_weight is not None:
            out[f"route{suffix}.weight"] = (module.router_weight, (slice(g * L, (g + 1) * L),))
            out[f"route{suffix}.bias"] = (module.router_bias, (slice(g * L, (g + 1) * L),))
    return out


def to_reference(module) -> dict[str, Tensor]:
    return {key: t[index].detach().clone() for key, (t, index) in _layout(module).items()}


def load_reference(module, state_dict: dict[str, Tensor]) -> None:
    layout = _layout(module)
    missing = sorted(set(layout) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(layout))
    if missing or unexpected:
        raise KeyError(
            f"state_dict: does not fit this layer ({module.extra_repr()}): "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )
    for key, (t, index) in layout.items():
        target, value = t[index], state_dict[key]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"state_dict[{key!r}]: expected shape {tuple(target.shape)}, "
                f"got {tuple(value.shape)}"
            )
    with torch.no_grad():
        for key, (t, index) in layout.items():
            t[index].copy_(state_dict[key])
