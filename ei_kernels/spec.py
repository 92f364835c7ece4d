"""The static description of one MoR layer: branch ranks, scalings and the routing flags.

Every backend receives a `MoRSpec`; it holds only Python numbers, so it is hashable, cheap to
build per call and constant under torch.compile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


def check_ranks(ranks: Sequence[int]) -> tuple[int, ...]:
    """`ranks` as a tuple of positive integers, or a ValueError naming the argument."""
    ranks = tuple(ranks)
    if len(ranks) == 0:
        raise ValueError("ranks: expected at least one LoRA branch, got an empty sequence")
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"ranks: expected positive integers, got {ranks!r}")
    return ranks


@dataclass(frozen=True)
class MoRSpec:
    ranks: tuple[int, ...]
    scalings: tuple[float, ...]
    bypass: bool = True
    router: bool = True
    groups: int = 1

    @classmethod
    def build(
        cls,
        ranks: Sequence[int],
        scalings: Sequence[float],
        *,
        bypass: bool = True,
        router: bool = True,
        groups: int = 1,
    ) -> "MoRSpec":
        """Validate user-facing config values and return the spec (errors name the argument)."""
        ranks = check_ranks(ranks)
        scalings = tuple(scalings)
        if len(scalings) != len(ranks):
            raise ValueError(
                f"scalings: expected one value per branch ({len(ranks)} for ranks={ranks}), "
                f"got {len(scalings)}"
            )
        for s in scalings:
            if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s):
                raise ValueError(f"scalings: expected finite numbers, got {scalings!r}")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
            raise ValueError(f"groups: expected a positive integer, got {groups!r}")
        if not router and bypass:
            # Without a router there is no bypass probability to drop: plain LoRA.
            bypass = False
        return cls(ranks, tuple(float(s) for s in scalings), bool(bypass), bool(router), groups)

    @property
    def num_branches(self) -> int:
        return len(self.ranks)

    @property
    def rank(self) -> int:
        """Total rank r = sum(ranks) of one group (columns of z, rows of A_cat)."""
        return sum(self.ranks)

    @property
    def num_logits(self) -> int:
        """Router outputs per group: E + 1 with the bypass entry, E without, 0 with no router."""
        if not self.router:
            return 0
        return self.num_branches + int(self.bypass)

    def branch_spans(self) -> list[tuple[int, int, float]]:
        """(start, end, scaling) of each branch's columns inside one group's rank-r block."""
        spans, start = [], 0
        for r, s in zip(self.ranks, self.scalings):
            spans.append((start, start + r, s))
            start += r
        return spans
