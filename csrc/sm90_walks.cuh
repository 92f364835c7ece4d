// The orders in which the routed kernels' persistent CTAs walk their output tiles: the routed
// forward's RoutedWalk (built in the kernel from the host's in_runs) and for_each_routed_tile,
// the input gradient's SegmentWalk (built by the host's segment_launch, read from the kernel's
// parameters) and for_each_segment, each with a compile-time proof on ViT-B's and odd shapes
// that every tile is visited exactly once and that a tile which reuses its predecessor's
// routing really follows it.
#pragma once

#include <cute/arch/cluster_sm90.hpp>

#include <cstdint>

namespace ei {
namespace sm90 {

// The routed forward's walk over units of cs = cluster-size column tiles of one row block
// (rank r computes each unit's r-th tile). In runs (in_runs) the launch's clusters take equal
// shares (to a unit) of the row-major units, so that a CTA's next tile mostly lies in the row
// block and group of its last and reuses its z (no shrink, no routing); otherwise the units
// round-robin, for_each_tile's order, every tile a run of its own. A run starts at the CTA's
// first tile and wherever the row block or group changes (so the group's first column tile
// always starts one), the same for every CTA of a cluster (routed_walk_is_sound checks all
// this at compile time). 32-bit: the producer has 40 registers; tiles < 2^30
// (sm90_routed_accepts).
struct RoutedWalk {
  bool in_runs;
  int first, last, stride;  // the cluster's units
  __host__ __device__ constexpr RoutedWalk(int units, int clusters, int cluster, bool runs)
      : in_runs(runs),
        first(runs ? int(int64_t(units) * cluster / clusters) : cluster),
        last(runs ? int(int64_t(units) * (cluster + 1) / clusters) : units),
        stride(runs ? 1 : clusters) {}
  // Whether `unit`, whose tile for `rank` lies in column tile col, starts a run.
  __host__ __device__ constexpr bool starts_run(int unit, int col, int rank,
                                                int group_col_tiles) const {
    return !in_runs || unit == first || (col - rank) % group_col_tiles == 0;
  }
};

// body(row tile, column tile, i, starts_run) for the CTA's i-th tile of the walk. One loop for
// both orders: a second copy of the consumers' body (its MMAs) made ptxas serialise them and
// spill.
template <class Body>
__device__ void for_each_routed_tile(int tiles, int col_tiles, int group_col_tiles, bool in_runs,
                                     Body&& body) {
  const int cs = int(cute::cluster_shape().x), rank = int(cute::block_rank_in_cluster());
  const RoutedWalk walk(tiles / cs, int(gridDim.x) / cs, int(blockIdx.x) / cs, in_runs);
  int i = 0;
  for (int unit = walk.first; unit < walk.last; unit += walk.stride, ++i) {
    const int tile = unit * cs + rank, col = tile % col_tiles;
    body(tile / col_tiles, col, i, walk.starts_run(unit, col, rank, group_col_tiles));
  }
}

// The walk of every CTA of a launch of `ctas` (a multiple of cs) over row_tiles x col_tiles
// tiles (a multiple of cs; groups of group_col_tiles column tiles, which cs divides): every
// tile exactly once, every CTA of a cluster as many tiles and runs starting at the same
// steps, and the group's first column tile of every row block a run's start (where p and
// [u | l] are written).
constexpr bool routed_walk_is_sound(int row_tiles, int col_tiles, int group_col_tiles, int cs,
                                    int ctas, bool in_runs) {
  constexpr int kMaxTiles = 2048;
  int seen[kMaxTiles] = {};
  const int tiles = row_tiles * col_tiles;
  if (tiles > kMaxTiles || tiles % cs != 0 || ctas % cs != 0 || group_col_tiles % cs != 0) {
    return false;
  }
  for (int cluster = 0; cluster < ctas / cs; ++cluster) {
    const RoutedWalk walk(tiles / cs, ctas / cs, cluster, in_runs);
    for (int unit = walk.first; unit < walk.last; unit += walk.stride) {
      for (int rank = 0; rank < cs; ++rank) {
        const int tile = unit * cs + rank, col = tile % col_tiles;
        const bool starts = walk.starts_run(unit, col, rank, group_col_tiles);
        if (starts != walk.starts_run(unit, unit * cs % col_tiles, 0, group_col_tiles)) {
          return false;
        }
        if (col % group_col_tiles == 0 && !starts) return false;
        ++seen[tile];
      }
    }
  }
  for (int t = 0; t < tiles; ++t) {
    if (seen[t] != 1) return false;
  }
  return true;
}
// 12608 tokens (99 row tiles) at proj (4 column tiles), fc1 (16), qkv (3 groups of 4) on 132
// SMs in pairs or quads, or where fewer clusters fit (128 CTAs, 62 pairs); 4100 tokens at
// O = 1000 (6 column tiles); 333 tokens at O = 40 (3 tiles, fewer than SMs); one CTA per tile.
static_assert(routed_walk_is_sound(99, 4, 4, 2, 132, true));
static_assert(routed_walk_is_sound(99, 4, 4, 4, 128, true));
static_assert(routed_walk_is_sound(99, 16, 16, 2, 132, true));
static_assert(routed_walk_is_sound(99, 16, 16, 1, 132, true));
static_assert(routed_walk_is_sound(99, 12, 4, 2, 124, true));
static_assert(routed_walk_is_sound(99, 12, 4, 4, 132, true));
static_assert(routed_walk_is_sound(33, 6, 6, 2, 132, true));
static_assert(routed_walk_is_sound(3, 1, 1, 1, 3, true));
static_assert(routed_walk_is_sound(99, 12, 4, 2, 132, false));
static_assert(routed_walk_is_sound(99, 4, 4, 2, 396, true));

// The routed input gradient's walk: CTA b's s-th tile is b * per_cta + s * stride, for
// s < steps and below `tiles`: round-robin (for_each_tile's order: per_cta 1, stride the
// grid) or in runs (one group only: per_cta = steps = the tiles per CTA, stride 1), where a
// CTA's next tile mostly lies in its last one's row block and its g, du and dl are the last
// one's. Kernel parameters: read from the constant bank, they take no registers.
struct SegmentWalk {
  int per_cta, stride, steps;
  int tiles;  // all of the launch's
  // The token reductions' partial slots: row tile r's partials go to slot r % slots. One per
  // row tile, or, where every CTA walks round-robin over several tiles of one column tile
  // (the grid a multiple of the column tiles), one per CTA of a column tile: the CTA adds its
  // later row tiles' partials to its first's (row tiles from `slots` on add), so the sum after
  // reads a fraction of them, and each slot element has one writer, adding in walk order.
  int slots;
  // Row tile `row`'s slot, and whether its partials add to what the CTA stored there for an
  // earlier row tile (the reducer's and segment_walk_is_sound's one definition)
  __host__ __device__ constexpr int slot(int row) const { return row % slots; }
  __host__ __device__ constexpr bool adds(int row) const { return row >= slots; }
  // Whether the CTA's tile of step `step`, in column tile col, computes its g and routes:
  // everywhere but where the CTA's last tile, just before, lay in the same row block (one
  // group).
  __host__ __device__ constexpr bool starts_run(int step, int col, int groups) const {
    return stride != 1 || groups > 1 || step == 0 || col == 0;
  }
};

// The walk and the CTAs of a launch over row_tiles x col_tiles tiles on at most `ctas` CTAs,
// round-robin or in runs (as many CTAs as runs of tiles / ctas, rounded up, take).
struct SegmentLaunch {
  SegmentWalk walk;
  int ctas;
};
__host__ __device__ constexpr SegmentLaunch segment_launch(int row_tiles, int col_tiles, int ctas,
                                                           bool runs) {
  const int tiles = row_tiles * col_tiles;
  if (!runs) {
    const bool shared_slots = tiles > ctas && ctas % col_tiles == 0;
    const int slots = shared_slots ? ctas / col_tiles : row_tiles;
    return SegmentLaunch{SegmentWalk{1, ctas, INT32_MAX, tiles, slots}, ctas};
  }
  const int per_cta = (tiles + ctas - 1) / ctas;
  return SegmentLaunch{SegmentWalk{per_cta, 1, per_cta, tiles, row_tiles},
                       (tiles + per_cta - 1) / per_cta};
}

// body(row tile, column tile, group, segment, starts_run) for each of the CTA's tiles, group
// by group, where segment counts the CTA's (tile, group) pairs (its double buffers alternate
// per segment). The segment is the loop's only register state, in 32 bits (tiles x groups
// < 2^30: sm90_routed_dgrad_accepts): the z warp has 40 registers, and with more loop state
// (for_each_tile's 64-bit loop around a group loop, a bound of its own, or a tile and a group)
// it spilled (4 bytes with the tile count in a register).
template <class Body>
__device__ void for_each_segment(int col_tiles, int groups, const SegmentWalk walk,
                                 Body&& body) {
  for (int segment = 0;; ++segment) {
    const int step = segment / groups;
    const int tile = int(blockIdx.x) * walk.per_cta + step * walk.stride;
    if (step >= walk.steps || tile >= walk.tiles) return;
    const int col = tile % col_tiles;
    body(tile / col_tiles, col, segment % groups, segment, walk.starts_run(step, col, groups));
  }
}

// The walk of every CTA of segment_launch(row_tiles, col_tiles, ctas, runs) with one group:
// every tile exactly once; a tile that does not compute its g right after the same CTA's tile
// to its left (the same row block); every partial slot's share of each column tile written
// once, by a tile of a row tile below `slots`, and added to only by that tile's CTA, after.
// Per element that takes one more fact, of the reducer (sm90_routed_dgrad_warps.cuh): its
// addresses depend only on the thread, the slot, the column tile and the group (whose K steps
// the column tile picks), so the store and every later add to an element come from one
// thread, in walk order, and need no barrier.
// Groups change neither the tiles nor the slots (each tile runs all of them), hence one here.
constexpr bool segment_walk_is_sound(int row_tiles, int col_tiles, int ctas, bool runs) {
  constexpr int kMaxTiles = 2048;
  int seen[kMaxTiles] = {};
  int writer[kMaxTiles] = {};  // per (slot, column tile): 1 + the CTA that wrote it, or 0
  const int tiles = row_tiles * col_tiles;
  if (tiles > kMaxTiles) return false;
  const SegmentLaunch launch = segment_launch(row_tiles, col_tiles, ctas, runs);
  const int slots = launch.walk.slots;
  if (slots < 1 || slots > row_tiles) return false;
  for (int cta = 0; cta < launch.ctas; ++cta) {
    int last = -1;
    for (int step = 0; step < launch.walk.steps; ++step) {
      const int tile = cta * launch.walk.per_cta + step * launch.walk.stride;
      if (tile >= tiles) break;
      const int row = tile / col_tiles, col = tile % col_tiles;
      if (!launch.walk.starts_run(step, col, 1) && (last != tile - 1 || col == 0)) return false;
      ++seen[tile];
      last = tile;
      int& slot_writer = writer[launch.walk.slot(row) * col_tiles + col];
      if (!launch.walk.adds(row)) {
        if (slot_writer != 0) return false;
        slot_writer = 1 + cta;
      } else if (slot_writer != 1 + cta) {
        return false;
      }
    }
  }
  for (int t = 0; t < tiles; ++t) {
    if (seen[t] != 1) return false;
  }
  for (int i = 0; i < slots * col_tiles; ++i) {
    if (writer[i] == 0) return false;
  }
  return true;
}
// 12608 tokens (99 row tiles) at proj's and fc1's 4 column tiles and fc2's 16, on 132 SMs and
// 114 (an H100 PCIe's); odd sizes; one CTA per tile; round-robin, where 132 CTAs over 4 or 6
// column tiles share their slots and 114 over 4 or 16 do not.
static_assert(segment_walk_is_sound(99, 4, 132, true));
static_assert(segment_walk_is_sound(99, 16, 132, true));
static_assert(segment_walk_is_sound(99, 16, 114, true));
static_assert(segment_walk_is_sound(99, 4, 114, true));
static_assert(segment_walk_is_sound(3, 1, 132, true));
static_assert(segment_walk_is_sound(33, 6, 132, true));
static_assert(segment_walk_is_sound(99, 4, 396, true));
static_assert(segment_walk_is_sound(99, 16, 132, false));
static_assert(segment_walk_is_sound(7, 3, 1, false));
static_assert(segment_walk_is_sound(99, 4, 132, false));
static_assert(segment_walk_is_sound(99, 4, 114, false));
static_assert(segment_walk_is_sound(34, 6, 132, false));
static_assert(segment_walk_is_sound(23, 6, 132, false));
static_assert(segment_walk_is_sound(22, 6, 132, false));
static_assert(segment_walk_is_sound(99, 4, 396, false));
static_assert(segment_walk_is_sound(5, 1, 2, false));
static_assert(segment_launch(99, 4, 132, false).walk.slots == 33);
static_assert(segment_launch(99, 4, 114, false).walk.slots == 99);
static_assert(segment_launch(99, 4, 132, true).walk.slots == 99);
static_assert(segment_launch(33, 4, 132, false).walk.slots == 33);

}  // namespace sm90
}  // namespace ei
