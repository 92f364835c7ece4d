"""Conversion between `FusedMoRLinear`'s fused tensors and the authors' per-branch key layout.

Single linear: linear.weight, linear.bias, lora_as.{i}.weight (r_i x K),
lora_bs.{i}.weight (O x r_i), route.weight (L x K), route.bias (L).
qkv (groups=3): linear.*, then for each of q, k, v: lora_as_q.{i}.weight,
lora_bs_q.{i}.weight (O/3 x r_i), route_q.weight, route_q.bias (then _k, _v). The authors'
qkv layer can adapt a subset of q, k, v (e.g. q and v): a slice whose keys are all absent is
loaded as un-adapted (B = 0, so it adds nothing; its router sends every token to the bypass),
and is left out again when the layer is written back.
"""

from __future__ import annotations

import torch
from torch import Tensor

_GROUP_SUFFIXES = {1: ("",), 3: ("_q", "_k", "_v")}


def _layout(module, slices=None) -> dict[str, tuple[Tensor, tuple]]:
    """Reference key -> (our tensor, index into it) for every tensor of `module`, or of the
    qkv `slices` given (indices of q, k, v)."""
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
        if slices is not None and g not in slices:
            continue
        rows = slice(g * og, (g + 1) * og)
        for i, (start, end, _) in enumerate(spec.branch_spans()):
            out[f"lora_as{suffix}.{i}.weight"] = (module.lora_a, (slice(g * r + start, g * r + end),))
            out[f"lora_bs{suffix}.{i}.weight"] = (module.lora_b, (rows, slice(start, end)))
        if module.router_weight is not None:
            out[f"route{suffix}.weight"] = (module.router_weight, (slice(g * L, (g + 1) * L),))
            out[f"route{suffix}.bias"] = (module.router_bias, (slice(g * L, (g + 1) * L),))
    return out


def _slice_keys(module, g: int) -> set[str]:
    """The adapter keys of qkv slice g (its share of everything but linear.*)."""
    return {k for k in _layout(module, {g}) if not k.startswith("linear.")}


def to_reference(module) -> dict[str, Tensor]:
    slices = getattr(module, "reference_slices", None)
    return {key: t[index].detach().clone() for key, (t, index) in _layout(module, slices).items()}


def _present_slices(module, state_dict) -> set[int] | None:
    """qkv slices with any adapter key in `state_dict` (None: not qkv, all three, or none,
    which is no checkpoint of an adapted qkv: the full layout then names what is missing)."""
    if module.spec.groups != 3:
        return None
    present = {g for g in range(3) if _slice_keys(module, g) & set(state_dict)}
    return None if len(present) in (0, 3) else present


def _unadapt(module, g: int) -> None:
    """Slice g adds nothing (B = 0) and its router, if any, sends every token to the bypass."""
    og, L = module.out_features // 3, module.spec.num_logits
    module.lora_b[g * og:(g + 1) * og].zero_()
    if module.router_weight is not None:
        module.router_weight[g * L:(g + 1) * L].zero_()
        bias = module.router_bias[g * L:(g + 1) * L]
        bias.zero_()
        if module.spec.bypass:
            bias[0] = 30.0  # p(bypass) = 1 - 3e-13 * branches: no branch weight to speak of


def load_reference(module, state_dict: dict[str, Tensor]) -> None:
    slices = _present_slices(module, state_dict)
    layout = _layout(module, slices)
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
        for g in sorted(set(range(3)) - slices) if slices is not None else ():
            _unadapt(module, g)
    module.reference_slices = slices  # what reference_state_dict writes back
