"""Applying the adaptation of a MoRConfig (mor_config.py) to a timm ViT."""

from __future__ import annotations

from torch import nn

from ei_kernels import inject_mor

from .mor_config import MoRConfig


def apply_mor(vit: nn.Module, config: MoRConfig) -> list[str]:
    """Adapt `vit` in place as `config` says and freeze everything else; return the adapted
    layer names (empty for mode "none")."""
    if config.mode == "none":
        vit.requires_grad_(False)
        return []
    return inject_mor(
        vit, config.targets, ranks=config.ranks, alphas=config.alphas, bypass=config.bypass,
        router=config.mode == "mor", backend=config.backend, **config.extra,
    )
