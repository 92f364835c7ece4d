"""Whole backbones in the authors' checkpoint layout.

The authors' ViT keeps timm's keys except in each MoR layer, which holds its frozen base as
`linear.*` and its branches per rank: e.g. `blocks.0.mlp.fc1.linear.weight`,
`blocks.0.mlp.fc1.lora_as.0.weight`, `blocks.0.mlp.fc1.lora_bs.0.weight`,
`blocks.0.mlp.fc1.route.weight` (qkv: `lora_as_q.0.weight`, `route_q.weight`, ...).
`FusedMoRLinear` converts one layer; these functions do the whole backbone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from ei_kernels import FusedMoRLinear

from .checkpoint import read_state_dict


def _vit(backbone: nn.Module) -> nn.Module:
    # Accept the ViTBackbone wrapper or the timm model itself: keys are the timm model's.
    return getattr(backbone, "vit", backbone)


def _mor_layers(vit: nn.Module) -> dict[str, FusedMoRLinear]:
    return {name: m for name, m in vit.named_modules() if isinstance(m, FusedMoRLinear)}


def _owner(key: str, layers: Mapping[str, nn.Module]) -> str | None:
    parent = key.rpartition(".")[0]
    while parent:
        if parent in layers:
            return parent
        parent = parent.rpartition(".")[0]
    return None


def reference_state_dict(backbone: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """Every tensor of the backbone under the authors' keys (with `prefix` prepended)."""
    vit = _vit(backbone)
    layers = _mor_layers(vit)
    out = {prefix + k: v for k, v in vit.state_dict().items() if _owner(k, layers) is None}
    for name, layer in layers.items():
        out.update({f"{prefix}{name}.{k}": v for k, v in layer.reference_state_dict().items()})
    return out


def load_reference_state_dict(backbone: nn.Module, state_dict: Mapping[str, Tensor],
                              prefix: str = "") -> None:
    """Load a backbone saved in the authors' layout. Only keys starting with `prefix` are read
    (a whole-model checkpoint may hold other parts too); among them every key must fit: a
    missing or unexpected key raises KeyError, a wrong shape ValueError, naming it. The timm
    tensors are all checked before anything is copied; a MoR layer that does not fit stops the
    load part-way (the layers before it are loaded), so discard the backbone after an error."""
    vit = _vit(backbone)
    layers = _mor_layers(vit)
    state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    per_layer: dict[str, dict[str, Tensor]] = {name: {} for name in layers}
    rest = {}
    for key, value in state.items():
        owner = _owner(key, layers)
        if owner is None:
            rest[key] = value
        else:
            per_layer[owner][key[len(owner) + 1:]] = value
    plain = {k: v for k, v in vit.state_dict().items() if _owner(k, layers) is None}
    missing = sorted(set(plain) - set(rest))
    unexpected = sorted(set(rest) - set(plain))
    if missing or unexpected:
        raise KeyError(f"reference checkpoint: does not fit the backbone: missing keys "
                       f"{missing[:8]}, unexpected keys {unexpected[:8]}")
    for key, value in rest.items():
        if tuple(value.shape) != tuple(plain[key].shape):
            raise ValueError(f"reference checkpoint: {prefix + key!r} has shape "
                             f"{tuple(value.shape)}, the backbone expects "
                             f"{tuple(plain[key].shape)}")
    for name, layer in layers.items():
        try:
            layer.load_reference_state_dict(per_layer[name])
        except KeyError as err:
            message = f"reference checkpoint, layer {prefix + name!r}: {err.args[0]}"
            raise KeyError(message) from None
        except ValueError as err:
            raise ValueError(f"reference checkpoint, layer {prefix + name!r}: {err}") from None
    with torch.no_grad():
        for key, value in rest.items():
            plain[key].copy_(value)


def save_reference_backbone(backbone: nn.Module, path: str | Path, prefix: str = "") -> None:
    torch.save(reference_state_dict(backbone, prefix), path)


def load_reference_backbone(backbone: nn.Module, path: str | Path, prefix: str = "") -> None:
    load_reference_state_dict(backbone, read_state_dict(path), prefix)
