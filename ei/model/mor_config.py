"""Which low-rank adaptation the backbone gets: MoR (default), plain LoRA, or none. Plain
data, checked arithmetically when built (no torch: the run config holds it)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"mor.targets: expected layer names such as fc1, fc2, qkv, "
                             f"got {self.targets!r}")
        if not self.ranks or any(isinstance(r, bool) or not isinstance(r, int) or r <= 0
                                 for r in self.ranks):
            raise ValueError(f"mor.ranks: expected positive integers, got {list(self.ranks)}")
        if len(self.alphas) != len(self.ranks):
            raise ValueError(f"mor.alphas: expected one alpha per rank ({len(self.ranks)}), "
                             f"got {list(self.alphas)}")
        if any(isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a)
               or a <= 0 for a in self.alphas):
            # (alpha 0 would switch its branch off without a word; drop the rank instead)
            raise ValueError(f"mor.alphas: expected finite numbers > 0, got {list(self.alphas)}")
