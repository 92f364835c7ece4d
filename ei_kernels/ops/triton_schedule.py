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
