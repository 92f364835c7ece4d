"""Which low-rank adaptation the backbone gets: MoR (default), plain LoRA, or none."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ei_kernels import inject_mor

ADAPTATIONS = ("mor", "lora", "none")


@dataclass
class MoRConfig:
    """`mode`: "mor" (routed ranks, the paper), "lora" (every branch weighted 1, no router) or
    "none" (frozen backbone). `bypass`: the relaxed router's extra "no branch" output.
    The defaults are the released configs: fc1 and fc2 of every block, ranks 2/4/8, alphas
    4/8/16; add "qkv" (one router per q/k/v slice) or "proj" to `targets` to adapt those too."""

    mode: str = "mor"
    targets: tuple[str, ...] = ("fc1", "fc2")
    ranks: tuple[int, ...] = (2, 4, 8)
    alphas: tuple[float, ...] = (4, 8, 16)
    bypass: bool = True
    backend: str = "auto"
    extra: dict = field(default_factory=dict)  # any other FusedMoRLinear argument

    def __post_init__(self) -> None:
        if self.mode not in ADAPTATIONS:
            raise ValueError(f"mor.mode: expected one of {ADAPTATIONS}, got {self.mode!r}")
        # YAML gives lists; tuples keep the config hashable and printable as the defaults are.
        self.targets, self.ranks, self.alphas = (
            tuple(self.targets), tuple(self.ranks), tuple(self.alphas)
        )


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
