"""How the Triton MoR launchers split a row block's column tiles into programs ("chunks").

A program computes one row block and a chunk of consecutive column tiles; the per-row work every
tile needs (the forward's shrink, the backward's g = dy B, du, dl) is done once per chunk. Few
large chunks redo less of it; but the GPU runs the grid in rounds of as many programs as fit on
it at once, and a last round that is mostly idle costs as much as a full one. At N = 12608 a
ViT-B proj layer has 99 row blocks of 128 tokens and 6 column tiles of 128: chunks of 3 make
198 programs, 1.5 rounds of an H200's 132 SMs, so the second round runs half empty and the
layer takes 2 rounds of 3 tiles (6 tile times), where chunks of 1 take 5 rounds of 1 tile
plus its share of the redone work. `column_chunks` picks, per launch, the chunking that ends the
grid soonest under this model (equal programs, `slots` of them at a time), ties to fewer chunks.
"""

from __future__ import annotations

import functools
import heapq
import math


def _finish(tiles: int, chunks: int, row_programs: int, slots: int, chunk_cost: float) -> float:
    """When the grid ends, in tiles' worth: its rounds times the longest program."""
    rounds = math.ceil(row_programs * chunks / slots)
    return rounds * (math.ceil(tiles / chunks) + chunk_cost)


@functools.lru_cache(maxsize=4096)  # called on every launch; a layer's arguments repeat
def column_chunks(tiles: int, col_tiles: int, row_programs: int = 1, slots: int | None = None,
                  chunk_cost: float = 0.0) -> tuple[int, int]:
    """(chunks, tiles per chunk) for rows of `tiles` column tiles, chunks of at most `col_tiles`
    tiles with the tiles spread evenly (6 tiles at col_tiles 4 make 2 chunks of 3, not 4 + 2).

    row_programs: row blocks (times groups) that each make that many chunks. slots: programs the
    GPU runs at once (SMs x programs per SM), None where unknown (the interpreter): then the
    fewest chunks. chunk_cost: the work done once per chunk, in tiles' worth."""
    fewest = math.ceil(tiles / col_tiles)
    if slots is None:
        return fewest, math.ceil(tiles / fewest)
    best = min(range(fewest, tiles + 1), key=lambda chunks: (
        _finish(tiles, chunks, row_programs, slots, chunk_cost), chunks))
    return best, math.ceil(tiles / best)


def schedule_efficiency(tiles: int, chunks: int, row_programs: int, slots: int,
                        chunk_cost: float) -> float:
    """Average over longest use of the GPU under the same model (1.0: the last round is full
    and every program as long as the others); what `scripts/kernel_model.py` charges."""
    work = row_programs * (tiles + chunks * chunk_cost)
    return work / (slots * _finish(tiles, chunks, row_programs, slots, chunk_cost))


def split_tiles(tiles: int, slots: int | None) -> int:
    """How many of a launch's last tiles to split into two programs each (K halves): those of a
    last round that would run at most half full, so that it runs full, each program half as
    long. 0 where the GPU's size is unknown (the interpreter) or the last round is fuller."""
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


def forward_durations(row_blocks: int, groups: int, tiles: int, group_m: int, split: int,
                      z_cost: float) -> list[float]:
    """The forward's programs in launch order, in tiles' worth: the kernel's grouped order
    (group_m row blocks sweep all groups' tiles, tile by tile), each program a tile long but
    a group's first tile z_cost longer (it computes z for the group's other tiles of its rows),
    the last `split` tiles two programs of half a tile each."""
    total, width = row_blocks * groups * tiles, group_m * groups * tiles
    durations = []
    for t in range(total):
        size_m = min(row_blocks - (t // width) * group_m, group_m)
        extra = z_cost if ((t % width) // size_m) % tiles == 0 else 0.0
        durations += [1.0 + extra] if t < total - split else [0.5 + extra, 0.5]
    return durations


# Beyond this many rounds of programs the last round's shape hardly matters: no simulation.
_SIMULATED_ROUNDS = 24


@functools.lru_cache(maxsize=1024)  # once per layer shape and GPU
def forward_order(row_blocks: int, groups: int, tiles: int, slots: int | None, z_cost: float,
                  group_m: int) -> tuple[int, int]:
    """(group_m, split tiles) of a forward launch. The grouped order puts the longer programs
    (a group's first tiles) first in each sweep of group_m row blocks; a sweep as long as a
    round of programs (or a few) spreads them over the GPU's slots evenly, where a shorter
    one can leave some slots a quarter tile behind the others at the end. So: the table's
    group_m or a sweep of 1-4 rounds, whichever list scheduling ends soonest; the table's
    where the GPU's size is unknown or the launch is many rounds long."""
    total = row_blocks * groups * tiles
    split = split_tiles(total, slots)
    if slots is None or total > _SIMULATED_ROUNDS * slots:
        return group_m, split
    sweep = math.ceil(slots / (groups * tiles))
    candidates = dict.fromkeys([group_m] + [m * sweep for m in range(1, 5)])
    return max(candidates, key=lambda m: list_schedule_efficiency(
        forward_durations(row_blocks, groups, tiles, m, split, z_cost), slots)), split
