"""A traffic and FLOP model of the MoR kernels (Triton and CUDA backends) next to nn.Linear,
at the benchmark's ViT-B layer shapes, and the time it implies at an H200's measured ceilings.
A model, not a measurement: each kernel is charged max(MMA FLOPs / peak, HBM bytes / bandwidth)
divided by its schedule efficiency (the busy share of the GPU's program slots when the block
scheduler hands each freed slot the next program, list scheduling, for the launch order and
split the launcher picks on 132 SMs; nn.Linear's taken as perfect, in its favour),
plus a fixed cost per launch, kernels one after the other, assuming every operand tile that
several thread blocks share is read from HBM once (the grouped launch order keeps x, dy and W
in the 50-60 MB L2) and perfect overlap of memory and math inside a kernel. What it is for:
seeing where the fused kernels spend work beyond the floor before a GPU measures them
(scripts/gpu_check.sh does).

    python scripts/kernel_model.py [--tokens 12608] [--tflops 790] [--tbps 4.3] [--launch-us 3]
                                   [--mma-sync-fraction 0.6] [--wgmma-fraction 0.8]
                                   [--cluster 2] [--dependent-launch-us 1] [--no-runs]

Defaults: bf16, ranks 2/4/8 (r = 14) with a bypass router (4 outputs), the sm90 launch table;
ceilings as measured on an H200 of the lent machines (bf16 8192^3 GEMM 769-798 TFLOP/s, device
copy 4.3 TB/s). The CUDA backend's mma.sync and wgmma products are charged at fractions of that
peak (assumptions, see MMA_SYNC_FRACTION and WGMMA_FRACTION).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from ei_kernels.ops.torch_mor import SAVED_PER_TOKEN
from ei_kernels.ops.triton_configs import launch_config
from ei_kernels.ops.triton_mor import bwd_row_cost, fwd_z_cost
from ei_kernels.ops.triton_schedule import (program_durations, launch_order,
                                            list_schedule_efficiency)

HOPPER = (9, 0)  # the launch table the model follows: sm90's, as on an H100/H200
SMS = 132  # an H100 SXM's or H200's streaming multiprocessors
ELEM = 2  # bf16 bytes
F32 = 4
R, L = 14, 4  # total rank and router outputs per group
PAD = 16  # tl.dot's minimum width: r and L are padded to it
# (K, O, groups): attention proj, qkv, fc1, fc2 of ViT-B.
SHAPES = [(768, 768, 1), (768, 2304, 3), (768, 3072, 1), (3072, 768, 1)]


@dataclass(frozen=True)
class Cost:
    """Kernels run one after the other, each (MMA FLOPs, HBM bytes, schedule efficiency), each
    charged max(math, memory) / efficiency: kernels do not overlap. The efficiency is the
    busy share of the GPU's program slots over the kernel's run (triton_schedule); 1.0 for
    nn.Linear, whose cuBLAS tile schedule the model takes as perfect (an assumption in its
    favour). Totals for the ratio columns."""
    kernels: tuple = ()
    programs: int = 0  # of the main kernel (informational)

    @staticmethod
    def kernel(flops: float, bytes_: float, programs: int = 0, efficiency: float = 1.0,
               rate: float = 1.0, serial_us: float = 0.0, dependent: bool = False) -> "Cost":
        """rate: the share of the MMA peak this kernel's instructions reach (1: wgmma at the
        measured GEMM ceiling; the CUDA backend's mma.sync and wgmma kernels less).
        serial_us: time on top in which its tensor cores wait (a step between MMA phases).
        dependent: launched as the programmatic dependent of the kernel before it, whose
        launch is then charged DEPENDENT_LAUNCH_US (at most the plain launch's cost)."""
        return Cost(((flops, bytes_, efficiency, rate, serial_us, dependent),), programs)

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.kernels + other.kernels, self.programs or other.programs)

    @property
    def flops(self) -> float:
        return sum(kernel[0] for kernel in self.kernels)

    @property
    def bytes(self) -> float:
        return sum(kernel[1] for kernel in self.kernels)

    @property
    def launches(self) -> int:
        return len(self.kernels)

    @property
    def efficiency(self) -> float:  # of the main (first) kernel
        return self.kernels[0][2]

    def us(self, peak: float, bandwidth: float, launch_us: float) -> float:
        busy = sum(max(f / (peak * rate), b / bandwidth) / e * 1e6 + serial
                   for f, b, e, rate, serial, _ in self.kernels)
        return busy + sum(min(launch_us, DEPENDENT_LAUNCH_US) if dependent else launch_us
                          for *_, dependent in self.kernels)


def linear_fwd(n, k, o) -> Cost:
    return Cost.kernel(2 * n * k * o, ELEM * (n * k + o * k + n * o + o))


def linear_bwd(n, k, o) -> Cost:  # W frozen: dgrad only
    return Cost.kernel(2 * n * k * o, ELEM * (n * o + o * k + n * k))


def keeps_u(groups: int) -> bool:
    return groups * (R + L) <= SAVED_PER_TOKEN


def _fitted(cfg, row_blocks: int, groups: int, tiles: int, extra: float):
    """(programs, schedule efficiency, split tiles, group_m) of a launch in the order its
    launcher picks on 132 SMs (triton_schedule.launch_order), by list scheduling."""
    slots = SMS * cfg.programs_per_sm
    group_m, split = launch_order(row_blocks, groups, tiles, slots, extra, cfg.group_m)
    durations = program_durations(row_blocks, groups, tiles, group_m, split, extra)
    programs = row_blocks * groups * tiles + split
    return programs, list_schedule_efficiency(durations, slots), split, group_m


def paired_slots(blocks: int, group_m: int) -> int:
    """Row blocks whose slot is a pair's partner (m + group_m for m in an even sweep): the
    backward's slots that the slot sum does not read when pairs add in place."""
    return sum(1 for m in range(blocks) if (m // group_m) % 2 == 0 and m + group_m < blocks)


def triton_fwd(n, k, o, g) -> Cost:
    """One program per tile; each (row block, group)'s z computed once, by the group's first
    tile, and read back by its other tiles; a split tile's halves store their fp32 partials,
    the second reads the other's (both counted as HBM traffic, though mostly L2)."""
    cfg = launch_config("fwd", HOPPER, n, torch.bfloat16, "ieee")
    blocks, tiles = math.ceil(n / cfg.block_m), math.ceil(o / g / cfg.block_n)
    programs, efficiency, split, _ = _fitted(cfg, blocks, g, tiles, fwd_z_cost(cfg, R, L, True))
    shrink = 2 * n * k * (PAD + PAD) * g
    expand = 2 * n * PAD * o
    stored = n * g * L * F32 + (n * g * R * F32 if keeps_u(g) else 0)  # p (and u)
    z = 2 * n * g * PAD * ELEM  # stored once, read (once, as every shared operand) by the rest
    partials = 3 * split * cfg.block_m * cfg.block_n * F32  # both halves store, one reads
    traffic = ELEM * (n * k + o * k + g * (R + L) * k + o * R + n * o) + stored + z + partials
    return Cost.kernel(2 * n * k * o + shrink + expand, traffic, programs, efficiency)


def triton_bwd(n, k, o, g) -> Cost:
    """One program per dx tile; each row block's du | dl | z computed once, by its first tile,
    and read back by the others; split tiles as in the forward."""
    cfg = launch_config("bwd", HOPPER, n, torch.bfloat16, "ieee")
    blocks, tiles = math.ceil(n / cfg.block_m), math.ceil(k / cfg.block_n)
    programs, efficiency, split, group_m = _fitted(cfg, blocks, 1, tiles,
                                                   bwd_row_cost(cfg, R, g, k, o, keeps_u(g)))
    dgrad = 2 * n * o * k
    g_once = 2 * n * o * PAD  # g = dy B, once per row block
    u_once = 0 if keeps_u(g) else 2 * n * k * PAD * g
    db = 2 * n * o * PAD
    k_ext = 2 * n * k * (PAD + PAD) * g  # [du | dl] [A; R] into dx
    da_dr = 2 * n * k * (PAD + PAD) * g  # du^T x, dl^T x
    read = ELEM * (n * o + n * k + o * k + o * R + g * (R + L) * k) + n * g * L * F32
    read += n * g * R * F32 if keeps_u(g) else 0
    scratch = 2 * n * g * (3 * PAD) * ELEM  # du | dl | z stored, read (once) by the tiles
    partials = 3 * split * cfg.block_m * cfg.block_n * F32
    # Deterministic slots: one fp32 partial sum per row block, written by the kernel; the
    # second of each pair (row blocks one sweep apart) reads the first's and writes the pair's
    # sum in its place, so the slot-sum kernel reads the other slots only, then writes the
    # results in their dtype.
    slot = (g * (R + L) * k + o * R + g * L) * F32
    pairs = paired_slots(blocks, group_m)
    slots = (blocks + pairs) * slot  # written, + the pairs' first partials read
    summed = (blocks - pairs) * slot
    results = ELEM * (g * (R + L) * k + o * R + g * L)
    main = Cost.kernel(dgrad + g_once + u_once + db + k_ext + da_dr,
                       read + ELEM * n * k + scratch + partials + slots, programs, efficiency)
    return main + Cost.kernel(0, summed + results)


# The CUDA backend (csrc/): small kernels and thin products on the portable mma.sync GEMM,
# which on Hopper reaches only part of the wgmma peak (MMA_SYNC_FRACTION of it), and on an
# H100/H200 the two big products (forward y, backward dx) on the sm_90a TMA + wgmma kernels
# (WGMMA_FRACTION of the peak: persistent CTAs overlap the next tile's loads with the last
# one's routing and stores, but not the consumers' own epilogue with their next main loop, as
# cuBLAS's ping-pong schedule does). Both fractions are assumptions, not measurements; the
# GPU check times persistent against one-CTA-per-tile launches (fused-cuda-one-tile).
MMA_SYNC_FRACTION = 0.6
WGMMA_FRACTION = 0.8
# A launch as the programmatic dependent of the kernel before it (the backward's sum after the
# routed input gradient, and that after qkv's u GEMM, EI_KERNELS_CUDA_PDL): scheduled while
# that kernel's last tiles run,
# it pays only its start once the other ends (an assumption, not measured; "fused-cuda" against
# "fused-cuda-no-pdl" in the GPU check will say).
DEPENDENT_LAUNCH_US = 1.0
TALL_N = 32  # TallTile / WideTile width: the thin products are padded to it
BK_CUDA = 32  # portable tile depth in 16-bit types: its K-extension is padded to it
SM90_TILE = (128, 192, 64)  # the sm_90a GEMM's tile (M, N, K): the extension pads to 64
# The routed forward's step between its main loop and the extension MMA, per tile: [u | l] to
# shared memory, two barriers, one thread routing each row (about 40 shared-memory accesses
# and L exps), the 16-deep MMA and its wait: ~500 cycles at 1.75 GHz (an assumption).
ROUTE_STEP_US = 0.3
ROUTED_RANKS, ROUTED_LOGITS = 16, 8  # its shrink MMAs' widths: A_cat's and R's rows per group
# The routed forward's cluster (EI_KERNELS_CUDA_SM90_CLUSTER, default 2): that many column
# tiles of a row block share out the shrink's K steps and sum the partials through distributed
# shared memory, so the shrink's MMA work is over column tiles / CLUSTER. The exchange adds per
# tile two cluster-scope fences and the peers' 24 fp32 values per row (about 250 cycles while
# the tensor cores idle: CLUSTER_STEP_US, an assumption). The model takes every SM as holding
# a CTA of a cluster (how many clusters fit at once is the occupancy query's, on the GPU).
CLUSTER = 2
CLUSTER_STEP_US = 0.15
# The routed forward walks its tiles in runs of one row block and group (which reuse z: one
# shrink and one routing step per run) where the row blocks of x its clusters hold at once fit
# in half of an H100/H200's L2 (walks_in_runs); RUNS = False models the round-robin walk
# (EI_KERNELS_CUDA_SM90_RUNS=0), every tile a run of its own.
L2_BYTES = 50 * 2**20
RUNS = True


def _pad(n: int, to: int) -> int:
    return math.ceil(n / to) * to


def _pad8(n: int) -> int:  # the 16-bit workspaces' row strides (TMA: 16-byte rows)
    return _pad(n, 8)


def sm90_gemm(n, cols, k, k2, a2_ld, b2_rows, b2_ld) -> Cost:
    """C[n, cols] = A[n, k] B^T + A2[n, k2] B2^T on the sm_90a kernel: one CTA per 128 x 192
    tile on 132 SMs in waves (the schedule efficiency is the busy share of the last wave);
    every operand read once, C written once."""
    bm, bn, bk = SM90_TILE
    tiles = math.ceil(n / bm) * math.ceil(cols / bn)
    efficiency = tiles / (math.ceil(tiles / SMS) * SMS)
    flops = 2 * n * cols * (k + _pad(k2, bk))
    bytes_ = ELEM * (n * k + cols * k + n * a2_ld + b2_rows * b2_ld + n * cols)
    return Cost.kernel(flops, bytes_, tiles, efficiency, WGMMA_FRACTION)


def routed_cluster_size(o, g, cluster=None) -> int:
    """As csrc/sm90_routed_forward.cu's routed_cluster_size: halved until it divides a group's
    column tiles."""
    size = CLUSTER if cluster is None else cluster
    group_col_tiles = math.ceil(o // g / SM90_TILE[1])
    while group_col_tiles % size:
        size //= 2
    return size


def walks_in_runs(cluster, row_block_columns) -> bool:
    """As csrc/sm90_launch.cuh's walks_in_runs by default: where the row blocks (of x, or dy)
    that the CTAs hold at once (one per cluster) take at most half of the L2."""
    return RUNS and SMS // cluster * SM90_TILE[0] * row_block_columns * ELEM <= L2_BYTES // 2


def routed_runs(n, o, g, cluster, in_runs) -> tuple[int, int]:
    """(runs in all, most runs of one cluster) of the routed forward's walk, as
    csrc/sm90_walks.cuh's for_each_routed_tile on SMS SMs: clusters take equal shares of the
    row-major units (cluster column tiles of one row block) and a run starts at a share's first
    unit and wherever the row block or group changes; without runs every unit is one."""
    bm, bn, _ = SM90_TILE
    col_tiles, group_col_tiles = math.ceil(o / bn), math.ceil(o // g / bn)
    units = math.ceil(n / bm) * col_tiles // cluster
    clusters = min(SMS // cluster, units)
    if not in_runs:
        return units, math.ceil(units / clusters)
    counts = []
    for j in range(clusters):
        first, last = units * j // clusters, units * (j + 1) // clusters
        counts.append(sum(u == first or u * cluster % col_tiles % group_col_tiles == 0
                          for u in range(first, last)))
    return sum(counts), max(counts)


def sm90_routed(n, k, o, g) -> Cost:
    """The routed forward (routed_gemm_kernel): sm90_gemm's tiles, each run's first also
    multiplying its x tiles by its group's 16 + 8 rows of [A_cat; R] in its share of the K
    steps (a cluster of column tiles of one row block shares them out and sums the partials),
    then routing (ROUTE_STEP_US per run of the busiest cluster, tensor cores idle, and
    CLUSTER_STEP_US for the exchange when the cluster has more than one CTA), every tile one
    16-deep extension step with its run's z; x, W, A_cat, R and B read once, y, p and [u | l]
    written once."""
    bm, bn, _ = SM90_TILE
    col_tiles = math.ceil(o / bn)
    cluster = routed_cluster_size(o, g)
    tiles = math.ceil(n / bm) * col_tiles
    waves = math.ceil(tiles / SMS)
    efficiency = tiles / (waves * SMS)
    runs, most_runs = routed_runs(n, o, g, cluster, walks_in_runs(cluster, k))
    flops = (2 * n * o * (k + ROUTED_RANKS)
             + 2 * runs * bm * (ROUTED_RANKS + ROUTED_LOGITS) * k)
    bytes_ = (ELEM * (n * k + o * k + g * (R + L) * k + o * R + n * o)
              + F32 * (n * g * (R + L) + n * g * L))
    step_us = ROUTE_STEP_US + (CLUSTER_STEP_US if cluster > 1 else 0.0)
    return Cost.kernel(flops, bytes_, tiles, efficiency, WGMMA_FRACTION,
                       serial_us=most_runs * step_us)


def routed_dgrad_walks_in_runs(o, g) -> bool:
    """As csrc/sm90_routed_dgrad.cu's launch_routed_dgrad: one group, and walks_in_runs for dy."""
    return g == 1 and walks_in_runs(1, o)


def dgrad_runs(n, k, o, g) -> tuple[int, int]:
    """(tiles, most of one CTA) of the routed input gradient that start a run, computing g and
    routing (csrc's segment_launch and SegmentWalk.starts_run): every tile round-robin; in
    runs, a CTA's first tile and each of its tiles that opens a row block."""
    bm, bn, _ = SM90_TILE
    col_tiles = math.ceil(k / bn)
    tiles = math.ceil(n / bm) * col_tiles
    if not routed_dgrad_walks_in_runs(o, g):
        return tiles, math.ceil(tiles / SMS)
    per_cta = math.ceil(tiles / min(tiles, SMS))
    starts = [t % per_cta == 0 or t % col_tiles == 0 for t in range(tiles)]
    return sum(starts), max(sum(starts[t:t + per_cta]) for t in range(0, tiles, per_cta))


def dgrad_slots(n, k, o, g) -> int:
    """The routed input gradient's partial slots, as csrc/sm90_walks.cuh's segment_launch on
    SMS SMs: one per row tile, or, round-robin over more tiles than CTAs with the CTAs a
    multiple of the column tiles, one per CTA of a column tile (each CTA adds its row tiles)."""
    bm, bn, _ = SM90_TILE
    row_tiles, col_tiles = math.ceil(n / bm), math.ceil(k / bn)
    shared = (not routed_dgrad_walks_in_runs(o, g) and row_tiles * col_tiles > SMS
              and SMS % col_tiles == 0)
    return SMS // col_tiles if shared else row_tiles


def sm90_routed_dgrad(n, k, o, g=1, dependent=False) -> Cost:
    """The routed input gradient (routed_dgrad_kernel): sm90_gemm's tiles over dy and W, each
    also running g = dy B over its dy tiles (16 columns, again in every column tile, or, walked
    in runs, in a run's first tile only; B's rows bulk-copied per K step and zero-padded on
    chip, work the model does not charge). A tile's K steps run group by group; after each
    group's, routing (ROUTE_STEP_US per run of the busiest CTA and group, tensor cores idle: a
    run's later tiles keep its du and dl) and two 16-deep extension steps (du A_g, dl R_g).
    Its reducer warp group runs dB's dy^T z (16 columns) on the same dy tiles, each row tile's
    K steps shared among its column tiles, and after each group's steps d[A_cat; R]'s x^T du
    and x^T dl (16 columns each) on the tile's x, loaded then: fp32 partials, each row tile's
    written into its slot (dgrad_slots), or added to it by L2 reductions where a CTA's earlier
    row tile wrote the slot (its lines read back). dy, W, B, A_cat and R read once, x once per group, u and p read (by
    consumers and the z warp), dx written."""
    bm, bn, _ = SM90_TILE
    col_tiles = math.ceil(k / bn)
    row_tiles = math.ceil(n / bm)
    tiles = row_tiles * col_tiles
    waves = math.ceil(tiles / SMS)
    efficiency = tiles / (waves * SMS)
    runs, most_runs = dgrad_runs(n, k, o, g)
    added = row_tiles - dgrad_slots(n, k, o, g)  # row tiles added to a slot
    flops = (2 * n * k * (o + 2 * ROUTED_RANKS * g)
             + 2 * runs * bm * ROUTED_RANKS * o
             + 2 * n * o * ROUTED_RANKS + 2 * n * k * 2 * ROUTED_RANKS * g)
    bytes_ = (ELEM * (n * o + o * k + o * R + g * (R + L) * k + n * k + g * n * k)
              + F32 * g * (n * (R + L) + n * L)
              + F32 * (row_tiles + added) * (o * R + g * (R + L) * k))
    return Cost.kernel(flops, bytes_, tiles, efficiency, WGMMA_FRACTION,
                       serial_us=most_runs * g * ROUTE_STEP_US, dependent=dependent)


def cuda_fwd(n, k, o, g, hopper=True) -> Cost:
    s, gr = g * (R + L), g * R
    if hopper and R <= ROUTED_RANKS and L <= ROUTED_LOGITS and (g == 1 or o // g % 192 == 0):
        return sm90_routed(n, k, o, g)  # as sm90_routed_forward.cu's sm90_routed_accepts
    shrink = Cost.kernel(2 * n * k * _pad(s, TALL_N), ELEM * (n * k + s * k) + F32 * n * s,
                         rate=MMA_SYNC_FRACTION)
    route = Cost.kernel(0, F32 * n * s + F32 * n * g * L + ELEM * n * gr)
    if not hopper:
        return shrink + route + Cost.kernel(
            2 * n * k * o + 2 * n * _pad(R, BK_CUDA) * o,
            ELEM * (n * k + o * k + n * gr + o * R + n * o), rate=MMA_SYNC_FRACTION)
    block_diagonal = Cost.kernel(0, ELEM * (o * R + o * _pad8(gr)))  # B_cat as [O, G r]
    return (shrink + route + block_diagonal
            + sm90_gemm(n, o, k, gr, _pad8(gr), o, _pad8(gr)))


def cuda_bwd(n, k, o, g, hopper=True) -> Cost:
    s, gr = g * (R + L), g * R
    # u: the forward's [u | l] when it fits the memory contract (eager mode), else recomputed
    u = Cost() if keeps_u(g) else Cost.kernel(
        2 * n * k * _pad(gr, TALL_N), ELEM * (n * k + gr * k) + F32 * n * gr,
        rate=MMA_SYNC_FRACTION)
    gg = Cost.kernel(2 * n * o * _pad(R, TALL_N), ELEM * (n * o + o * R) + F32 * n * gr,
                     rate=MMA_SYNC_FRACTION)
    route = Cost.kernel(0, F32 * (2 * n * gr + n * g * L) + ELEM * (n * gr + n * s))
    routed = (hopper and (g == 1 or o // g % SM90_TILE[2] == 0) and R <= ROUTED_RANKS
              and L <= ROUTED_RANKS)
    if routed:
        # as sm90_routed_dgrad_accepts: g, the routing, dx and every partial in one
        # (as the u GEMM's programmatic dependent where u is recomputed)
        gg, route, dx = Cost(), Cost(), sm90_routed_dgrad(n, k, o, g, not keeps_u(g))
    elif hopper:  # [A_cat; R] stacked into one [S, K] operand, then the GEMM
        stack = Cost.kernel(0, 2 * ELEM * s * k)
        dx = stack + sm90_gemm(n, k, o, s, _pad8(s), s, k)
    else:
        dx = Cost.kernel(2 * n * o * k + 2 * n * _pad(s, BK_CUDA) * k,
                         ELEM * (n * o + o * k + n * s + s * k + n * k), rate=MMA_SYNC_FRACTION)
    # The token reductions: split-K partials in fp32 (about two waves of blocks), then one
    # launch sums them and dc's per-block partials of the routing kernel.
    # (The routed input gradient wrote all of them, one per slot, dc's per row tile: only the
    # sum is left.)
    splits = 8
    row_tiles, slots = math.ceil(n / SM90_TILE[0]), dgrad_slots(n, k, o, g)
    dw_splits, db_splits = (slots, slots) if routed else (splits, splits)
    dc_splits = row_tiles if routed else math.ceil(n * g / 128)
    dw = Cost() if routed else Cost.kernel(
        2 * _pad(s, TALL_N) * k * n, ELEM * (n * s + n * k) + F32 * splits * s * k,
        rate=MMA_SYNC_FRACTION)
    db = Cost() if routed else Cost.kernel(
        2 * o * _pad(R, TALL_N) * n, ELEM * (n * o + n * gr) + F32 * splits * o * R,
        rate=MMA_SYNC_FRACTION)
    # (after the routed input gradient, as its programmatic dependent)
    sums = Cost.kernel(0, F32 * (dw_splits * s * k + db_splits * o * R) + ELEM * (s * k + o * R)
                       + F32 * dc_splits * g * L, dependent=routed)
    return u + gg + route + dx + dw + db + sums


def cuda_table(n, peak, bandwidth, launch_us) -> str:
    rows = ["| shape | linear fwd us | cuda fwd us (ratio) | linear fwd+bwd us | cuda fwd+bwd us "
            "(ratio) | portable GEMMs only: fwd, fwd+bwd ratio | cuda fwd+bwd: MMA work / "
            "linear's, HBM bytes / linear's, launches | sm_90a GEMM wave efficiency fwd, dx |",
            "|---|---|---|---|---|---|---|---|"]
    for k, o, g in SHAPES:
        lf, floor = linear_fwd(n, k, o), linear_fwd(n, k, o) + linear_bwd(n, k, o)
        cf, cb = cuda_fwd(n, k, o, g), cuda_bwd(n, k, o, g)
        pf, pb = cuda_fwd(n, k, o, g, hopper=False), cuda_bwd(n, k, o, g, hopper=False)
        t = lambda c: c.us(peak, bandwidth, launch_us)  # noqa: E731
        ours = cf + cb
        dx_gemm = max(cb.kernels, key=lambda kernel: kernel[0])  # the most MMA work
        rows.append(
            f"| K{k}-O{o}{'-qkv' if g == 3 else ''}-N{n} | {t(lf):.1f} | {t(cf):.1f} "
            f"({t(cf) / t(lf):.2f}) | {t(floor):.1f} | {t(ours):.1f} ({t(ours) / t(floor):.2f})"
            f" | {t(pf) / t(lf):.2f}, {t(pf + pb) / t(floor):.2f} | "
            f"{ours.flops / floor.flops:.2f}x, {ours.bytes / floor.bytes:.2f}x, "
            f"{ours.launches} | {cf.kernels[-1][2]:.2f}, {dx_gemm[2]:.2f} |")
    return "\n".join(rows)


def table(n, peak, bandwidth, launch_us) -> str:
    rows = ["| shape | linear fwd us | triton fwd us | ratio | linear fwd+bwd us | "
            "triton fwd+bwd us | ratio | triton fwd+bwd: MMA work / linear's, HBM bytes / "
            "linear's, launches | programs fwd, bwd | schedule efficiency fwd, bwd |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for k, o, g in SHAPES:
        lf, lb = linear_fwd(n, k, o), linear_bwd(n, k, o)
        tf, tb = triton_fwd(n, k, o, g), triton_bwd(n, k, o, g)
        t = lambda c: c.us(peak, bandwidth, launch_us)  # noqa: E731
        ours, floor = tf + tb, lf + lb
        name = f"K{k}-O{o}{'-qkv' if g == 3 else ''}-N{n}"
        rows.append(
            f"| {name} | {t(lf):.1f} | {t(tf):.1f} | {t(tf) / t(lf):.2f} | {t(floor):.1f} | "
            f"{t(ours):.1f} | {t(ours) / t(floor):.2f} | {ours.flops / floor.flops:.2f}x, "
            f"{ours.bytes / floor.bytes:.2f}x, {ours.launches} | {tf.programs}, "
            f"{tb.programs} | {tf.efficiency:.2f}, {tb.efficiency:.2f} |")
    return "\n".join(rows)


def main() -> None:
    global MMA_SYNC_FRACTION, WGMMA_FRACTION, CLUSTER, DEPENDENT_LAUNCH_US, RUNS  # cuda_* read
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=12608)
    parser.add_argument("--tflops", type=float, default=790.0)
    parser.add_argument("--tbps", type=float, default=4.3)
    parser.add_argument("--launch-us", type=float, default=3.0)
    parser.add_argument("--mma-sync-fraction", type=float, default=MMA_SYNC_FRACTION)
    parser.add_argument("--wgmma-fraction", type=float, default=WGMMA_FRACTION)
    parser.add_argument("--cluster", type=int, choices=(1, 2, 4), default=CLUSTER,
                        help="CTAs per cluster of the routed forward")
    parser.add_argument("--dependent-launch-us", type=float, default=DEPENDENT_LAUNCH_US,
                        help="the launch cost of a programmatic dependent launch")
    parser.add_argument("--no-runs", action="store_true",
                        help="the routed forward's round-robin walk, every tile a run")
    args = parser.parse_args()
    MMA_SYNC_FRACTION, WGMMA_FRACTION = args.mma_sync_fraction, args.wgmma_fraction
    CLUSTER, DEPENDENT_LAUNCH_US = args.cluster, args.dependent_launch_us
    RUNS = not args.no_runs
    print(f"Model (not a measurement): bf16, N = {args.tokens}, {args.tflops:g} TFLOP/s, "
          f"{args.tbps:g} TB/s, {args.launch_us:g} us per launch\n")
    print(table(args.tokens, args.tflops * 1e12, args.tbps * 1e12, args.launch_us))
    print(f"\nThe CUDA backend on an H100/H200 (its sm_90a wgmma GEMMs charged at "
          f"{args.wgmma_fraction:g} of the peak, its mma.sync products at "
          f"{args.mma_sync_fraction:g}, the routed forward in clusters of {args.cluster}):\n")
    print(cuda_table(args.tokens, args.tflops * 1e12, args.tbps * 1e12, args.launch_us))


if __name__ == "__main__":
    main()
