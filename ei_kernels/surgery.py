"""Model surgery: put MoR on the linear layers of any model (timm ViTs in particular)."""

from __future__ import annotations

from typing import Iterable

from torch import nn

from .module import FusedMoRLinear


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def inject_mor(model: nn.Module, targets: Iterable[str] = ("fc1", "fc2"), **config) -> list[str]:
    """Replace every nn.Linear whose qualified name ends with one of `targets` by a
    `FusedMoRLinear` over the same (shared) weights, freeze every other parameter of `model`,
    and return the replaced names. A target ending in "qkv" gets groups=3 (one router and set of
    branches per q/k/v slice) unless `groups` is given. `config` goes to FusedMoRLinear.
    """
    if isinstance(targets, str) or not tuple(targets):
        raise ValueError(f"targets: expected a non-empty sequence of module names, got {targets!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    targets = tuple(targets)
    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not any(_matches(name, t) for t in targets):
            continue
        layer_config = dict(config)
        if name.endswith("qkv"):
            layer_config.setdefault("groups", 3)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FusedMoRLinear.from_linear(module, **layer_config))
        replaced.append(name)
    if not replaced:
        raise ValueError(f"targets: no nn.Linear of the model matches any of {targets}")
    return replaced


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of parameter elements that receive gradients (shared tensors counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
