"""Model surgery: put MoR on the linear layers of any model (timm ViTs in particular)."""

from __future__ import annotations

from typing import Iterable

from torch import nn

from .module import FusedMoRLinear


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def inject_mor(model: nn.Module, targets: Iterable[str] = ("fc1", "fc2"), **config) -> list[str]:
    """Replace every nn.Linear whose qualified name ends with one of `targets` by a
    `FusedMoRLinear` over the same (shared) weights, freeze every other parameter of `model`
    (the branches and routers of MoR layers, from an earlier call too, keep theirs), and return
    the replaced names; on an error `model` is left as it was. A target ending in "qkv" gets
    groups=3 (one router and set of branches per q/k/v slice) unless `groups` is given.
    `config` goes to FusedMoRLinear.
    """
    if isinstance(targets, str) or not tuple(targets):
        raise ValueError(f"targets: expected a non-empty sequence of module names, got {targets!r}")
    targets = tuple(targets)
    # Every new layer is built before the model is touched: a bad target or argument leaves it
    # as it was, not half frozen.
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(_matches(name, t) for t in targets):
            layer_config = dict(config)
            if name.endswith("qkv"):
                layer_config.setdefault("groups", 3)
            layers[name] = FusedMoRLinear.from_linear(module, **layer_config)
    if not layers:
        raise ValueError(f"targets: no nn.Linear of the model matches any of {targets}")
    # Frozen: everything but the branches and routers of MoR layers, those of an earlier call
    # included (their base weights are frozen already).
    adapters = {id(p) for m in model.modules() if isinstance(m, FusedMoRLinear)
                for n, p in m.named_parameters() if n not in ("weight", "bias")}
    for p in model.parameters():
        if id(p) not in adapters:
            p.requires_grad_(False)
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    return list(layers)


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of parameter elements that receive gradients (shared tensors counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
