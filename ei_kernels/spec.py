"""The static description of one MoR layer: branch ranks, scalings and the routing flags.

Every backend receives a `MoRSpec`; it holds only Python numbers, so it is hashable, cheap to
build per call and constant under torch.compile.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence


def check_ranks(ranks: Sequence[int]) -> tuple[int, ...]:
    """`ranks` as a tuple of positive integers, or a ValueError naming the argument."""
    ranks = tuple(ranks)
    if len(ranks) == 0:
        raise ValueError("ranks: expected at least one LoRA branch, got an empty sequence")
    if not all(is_integer(r) and r > 0 for r in ranks):
        raise ValueError(f"ranks: expected positive integers, got {ranks!r}")
    return tuple(int(r) for r in ranks)


def is_integer(value) -> bool:
    """An integer, numpy's included; not a bool (True is no rank)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_real(value) -> bool:
    """A finite real number, numpy's included; not a bool."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))


def check_flag(value, name: str) -> bool:
    """True or False (numpy's too), never a truthy string such as "no"."""
    if type(value).__name__ not in ("bool", "bool_"):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


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
        if not all(is_finite_real(s) for s in scalings):
            raise ValueError(f"scalings: expected finite numbers, got {scalings!r}")
        if not is_integer(groups) or groups <= 0:
            raise ValueError(f"groups: expected a positive integer, got {groups!r}")
        bypass, router, groups = check_flag(bypass, "bypass"), check_flag(router, "router"), \
            int(groups)
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
