"""The order and shape of the Triton MoR launches' programs, fitted to the GPU's size.

Both kernels run one program per tile (forward: output tiles; backward: dx tiles), in a grouped
order: `group_m` row blocks sweep all their column tiles together (their x / dy rows and the
weight tiles stay in L2), each row block's first tile first, since that one computes what the
row block's other tiles share (forward z, backward du | dl | z) and is longer by it. The GPU
runs as many programs at once as it has slots (SMs x programs per SM) and hands each freed
slot the next program: a last round only partly full leaves the rest of the GPU idle (ViT-B
proj at N = 12608: 594 tiles on 132 SMs are 4.5 rounds of work in 5), and longer programs
bunched in some slots leave others waiting at the end. So, per launch: `split_tiles` turns the
tiles of a last round at most half full into two programs each (halves of the reduction), and
`launch_order` picks the sweep size whose list schedule ends soonest.
"""

from __future__ import annotations

import functools
import heapq
import math


def split_tiles(tiles: int, slots: int | None) -> int:
    """How many of a launch's last tiles to split into two programs each (halves of the
    reduction: K forward, O backward): those of a last round that would run at most half full,
    so that it runs full, each program half as long. 0 where the GPU's size is unknown (the
    interpreter) or the last round is fuller."""
    if slots is None:
        return 0
    rest = tiles % slots
    return rest if 2 * rest <= slots else 0


def list_schedule_efficiency(durations, slots: int) -> float:
    """Busy share of `slots` program slots that take programs in launch order, each next
    program to the first free slot (what the GPU's block scheduler does, to first order)."""
    free = [0.0] * slots
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return sum(durations) / (slots * max(free))


def program_durations(row_blocks: int, groups: int, tiles: int, group_m: int, split: int,
                      extra: float) -> list[float]:
    """A launch's programs in launch order, in tiles' worth: the kernels' grouped order
    (group_m row blocks sweep all groups' tiles, tile by tile), each program a tile long but
    a group's first tile `extra` longer (it computes what the group's other tiles of its rows
    share), the last `split` tiles two programs of half a tile each."""
    total, width = row_blocks * groups * tiles, group_m * groups * tiles
    durations = []
    for t in range(total):
        size_m = min(row_blocks - (t // width) * group_m, group_m)
        first = ((t % width) // size_m) % tiles == 0
        durations += [1.0 + extra * first] if t < total - split else [0.5 + extra * first, 0.5]
    return durations


# Beyond this many rounds of programs the last round's shape hardly matters: no simulation.
_SIMULATED_ROUNDS = 24


@functools.lru_cache(maxsize=1024)  # once per layer shape and GPU
def launch_order(row_blocks: int, groups: int, tiles: int, slots: int | None, extra: float,
                 group_m: int) -> tuple[int, int]:
    """(group_m, split tiles) of a launch (`program_durations`' arguments; slots None where the
    GPU's size is unknown). The grouped order puts the longer programs (a group's first tiles)
    first in each sweep; a sweep as long as a round of programs (or a few) spreads them over
    the GPU's slots evenly, where a shorter one can leave some slots a quarter tile behind the
    others at the end. So: the table's group_m or a sweep of 1-4 rounds, whichever list
    scheduling ends soonest; the table's where the GPU's size is unknown or the launch is many
    rounds long."""
    total = row_blocks * groups * tiles
    split = split_tiles(total, slots)
    if slots is None or total > _SIMULATED_ROUNDS * slots:
        return group_m, split
    sweep = math.ceil(slots / (groups * tiles))
    candidates = dict.fromkeys([group_m] + [m * sweep for m in range(1, 5)])
    return max(candidates, key=lambda m: list_schedule_efficiency(
        program_durations(row_blocks, groups, tiles, m, split, extra), slots)), split
