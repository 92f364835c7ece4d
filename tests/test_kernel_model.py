"""scripts/kernel_model.py: kernels are charged one after the other, and the launch counts
follow the kernels the backends launch."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "kernel_model", Path(__file__).resolve().parents[1] / "scripts" / "kernel_model.py")
kernel_model = importlib.util.module_from_spec(_spec)
sys.modules["kernel_model"] = kernel_model  # its dataclass looks its module up there
_spec.loader.exec_module(kernel_model)
Cost = kernel_model.Cost


def test_a_memory_bound_kernel_after_a_compute_bound_one_is_not_hidden():
    math_bound = Cost.kernel(flops=2e9, bytes_=1e6)  # 2 us of math at 1 TFLOP/s
    memory_bound = Cost.kernel(flops=0, bytes_=3e6)  # 3 us at 1 TB/s
    both = math_bound + memory_bound
    assert both.launches == 2 and both.flops == 2e9 and both.bytes == 4e6
    assert both.us(1e15, 1e12, launch_us=0) == pytest.approx(5.0)
    assert both.us(1e15, 1e12, launch_us=1) == pytest.approx(7.0)


def test_a_kernel_that_leaves_part_of_the_gpu_idle_is_charged_for_it():
    half_idle = Cost.kernel(flops=2e9, bytes_=1e6, efficiency=0.5)
    assert half_idle.us(1e15, 1e12, launch_us=0) == pytest.approx(4.0)
    # nn.Linear is given a perfect schedule; the fused kernels their launcher's.
    assert kernel_model.linear_fwd(12608, 768, 768).efficiency == 1.0
    assert 0 < kernel_model.triton_fwd(12608, 768, 768, 1).efficiency <= 1


def test_launch_counts_and_tables():
    n, k, o = 12608, 768, 768
    assert kernel_model.triton_fwd(n, k, o, 1).launches == 1  # lora_b is read in place
    assert kernel_model.triton_bwd(n, k, o, 1).launches == 2  # the kernel and the slot sum
    # As csrc/mor_kernels.cu launches: the portable path (shrink, routing, GEMM), and on
    # Hopper the routed forward alone (every ViT-B shape: r = 14 <= 16, L = 4 <= 8, qkv's
    # 768 columns per group a whole number of 192-column tiles). One group keeps the
    # forward's [u | l]: no u GEMM in the backward; qkv recomputes it. Backward: (u,) g,
    # routing, dx, the two split-K products, one sum; on Hopper g, the routing, dx and every
    # token reduction's partials run as one routed launch, B's rows read in place (the sum
    # follows), qkv's too (its 768 outputs per group are whole 64-column K steps).
    assert kernel_model.cuda_fwd(n, k, o, 1, hopper=False).launches == 3
    assert kernel_model.cuda_bwd(n, k, o, 1, hopper=False).launches == 6
    assert all(kernel_model.cuda_fwd(n, k_, o_, g).launches == 1
               for k_, o_, g in kernel_model.SHAPES)
    assert kernel_model.cuda_bwd(n, k, o, 1).launches == 2
    assert kernel_model.cuda_bwd(n, k, 3 * o, 3).launches == 3
    # 40 outputs per group are not whole K steps: g, the routing and the stack run first
    assert kernel_model.cuda_bwd(n, k, 120, 3).launches == 8
    rows = kernel_model.table(n, 790e12, 4.3e12, 3.0).splitlines()
    assert len(rows) == 2 + len(kernel_model.SHAPES)
    assert len(kernel_model.cuda_table(n, 790e12, 4.3e12, 3.0).splitlines()) == len(rows)


def test_the_hopper_gemm_tiles_fill_whole_waves_at_vit_b_widths():
    """128 x 192 tiles: 99 row blocks times 4, 12 or 16 column tiles are whole multiples of
    132 SMs, and the LoRA extension costs one 64-deep K step."""
    for cols in (768, 2304, 3072):
        gemm = kernel_model.sm90_gemm(12608, cols, 768, 42, 48, cols, 48)
        assert gemm.programs == 99 * cols // 192
        assert gemm.efficiency == 1.0
        assert gemm.flops == 2 * 12608 * cols * (768 + 64)
    assert kernel_model.sm90_gemm(1576, 768, 768, 14, 16, 768, 16).efficiency == pytest.approx(
        13 * 4 / 132)


@pytest.mark.parametrize("cluster, shrinks", [(1, 4), (2, 2), (4, 1)])
def test_the_routed_forward_reads_x_once_and_shares_the_shrink_out_in_a_cluster(
        monkeypatch, cluster, shrinks):
    """Its MMA work: the main product, the 16-deep extension, and the 16 + 8 shrink columns
    once per cluster of column tiles (4 column tiles at O = 768: in all 4 without a cluster,
    twice in pairs, once in quads); its traffic: each operand once; per wave the routing step
    and, with a cluster, its exchange. (Walked round-robin: every tile a run of its own.)"""
    monkeypatch.setattr(kernel_model, "CLUSTER", cluster)
    monkeypatch.setattr(kernel_model, "RUNS", False)
    n, k, o = 12608, 768, 768
    routed = kernel_model.sm90_routed(n, k, o, 1)
    rows = 99 * 128  # the row tiles' rows: the shrink runs on whole tiles
    assert routed.flops == 2 * n * o * (k + 16) + 2 * rows * shrinks * (16 + 8) * k
    assert routed.bytes == (2 * (n * k + o * k + 18 * k + o * 14 + n * o)
                            + 4 * (n * 18 + n * 4))
    assert routed.efficiency == 1.0  # 396 tiles: 3 waves
    step = kernel_model.ROUTE_STEP_US + (kernel_model.CLUSTER_STEP_US if cluster > 1 else 0)
    assert routed.kernels[0][4] == pytest.approx(3 * step)


@pytest.mark.parametrize("o, groups, runs, most", [
    (768, 1, 132, 2),  # 3 pairs of tiles per pair of CTAs, 2 pairs per row block
    (3072, 1, 132, 2),  # 12 pairs per pair of CTAs, 8 per row block
    (2304, 3, 330, 5),  # 9 pairs per pair of CTAs, 2 per group
])
def test_the_routed_forward_walks_in_runs_that_share_z(monkeypatch, o, groups, runs, most):
    """As csrc/sm90_walks.cuh's for_each_routed_tile: each pair of CTAs takes a contiguous share
    of the 12608-token tiles and computes the shrink and the routing once per run of one row
    block and group (round-robin: once per pair of tiles); where x's row blocks in flight
    (66 pairs' worth) fit half the L2: K = 768, not K = 3072."""
    n, k = 12608, 768
    assert kernel_model.routed_runs(n, o, groups, 2, True) == (runs, most)
    units = 99 * o // 192 // 2
    assert kernel_model.routed_runs(n, o, groups, 2, False) == (units, units // 66)
    assert kernel_model.walks_in_runs(2, 768) and not kernel_model.walks_in_runs(2, 3072)
    monkeypatch.setattr(kernel_model, "CLUSTER", 2)
    in_runs = kernel_model.sm90_routed(n, k, o, groups)
    monkeypatch.setattr(kernel_model, "RUNS", False)
    round_robin = kernel_model.sm90_routed(n, k, o, groups)
    shrink = 2 * 128 * (16 + 8) * k  # one pair's shrink of a row block
    assert round_robin.flops - in_runs.flops == (units - runs) * shrink
    step = kernel_model.ROUTE_STEP_US + kernel_model.CLUSTER_STEP_US
    assert in_runs.kernels[0][4] == pytest.approx(most * step)
    assert round_robin.kernels[0][4] == pytest.approx(units // 66 * step)


def test_the_routed_forward_cluster_divides_a_group_s_column_tiles():
    # as csrc/sm90_routed_forward.cu: halved until it divides them (a cluster's tiles share a group)
    assert kernel_model.routed_cluster_size(2304, 3, 4) == 4  # 4 column tiles per group
    assert kernel_model.routed_cluster_size(1000, 1, 4) == 2  # 6 column tiles
    assert kernel_model.routed_cluster_size(576, 1, 2) == 1  # 3 column tiles
    assert kernel_model.routed_cluster_size(40, 1, 2) == 1


@pytest.mark.parametrize("runs, g_tiles, most", [(False, 99 * 16, 12), (True, 132 + 66, 2)])
def test_the_routed_dgrad_adds_g_per_column_tile_two_extension_steps_and_db_once(
        monkeypatch, runs, g_tiles, most):
    """fc2: 99 x 16 tiles. Round-robin, g in each of them; in runs (dy's 132 row blocks in
    flight take 26 MB, half the L2) 12 tiles per CTA, g where a CTA's run starts: its first
    tile and, where its 12 tiles cross a row block's start (66 of the 99 row blocks start
    inside a CTA's share, 33 on a CTA's first tile), the one that opens it; the routing step
    as often (at most twice a CTA, where it was 12 times)."""
    monkeypatch.setattr(kernel_model, "RUNS", runs)
    n, k, o = 12608, 3072, 768
    assert kernel_model.routed_dgrad_walks_in_runs(o, 1) == runs
    assert kernel_model.dgrad_runs(n, k, o, 1) == (g_tiles, most)
    dgrad = kernel_model.sm90_routed_dgrad(n, k, o)
    assert dgrad.kernels[0][4] == pytest.approx(most * kernel_model.ROUTE_STEP_US)
    # g (16 columns, over whole row tiles); dB's 16 columns once over dy (shared out);
    # d[A_cat; R]'s 16 + 16 columns once over x
    assert dgrad.flops == (2 * n * k * (o + 32) + 2 * g_tiles * 128 * 16 * o + 2 * n * o * 16
                           + 2 * n * k * 32)
    # dy read once for all three, x once; dB's and d[A_cat; R]'s fp32 partials one per row tile
    assert dgrad.bytes == (2 * (n * o + o * k + o * 14 + 18 * k + n * k + n * k)
                           + 4 * (n * 18 + n * 4 + 99 * (o * 14 + 18 * k)))
    assert dgrad.programs == 99 * 16 and dgrad.efficiency == 1.0  # 12 waves


def test_the_grouped_routed_dgrad_routes_and_extends_once_per_group():
    """qkv: the same tiles over dy and W, g and dB as for one group, but two extension steps,
    [A_cat; R]'s rows, u, p, [du | dl], a read of x for d[A_cat; R] and one routing step per
    wave for each group. Round-robin, each CTA's 3 tiles share a column tile and one partial
    slot: the 99 row tiles' partials written, 66 of them added (the slot read back)."""
    n, k, o, g = 12608, 768, 2304, 3
    dgrad = kernel_model.sm90_routed_dgrad(n, k, o, g)
    assert not kernel_model.routed_dgrad_walks_in_runs(o, g)  # several groups: round-robin
    assert dgrad.flops == (2 * n * k * (o + 32 * g) + 2 * 99 * 4 * 128 * 16 * o
                           + 2 * n * o * 16 + 2 * n * k * 32 * g)
    assert dgrad.bytes == (2 * (n * o + o * k + o * 14 + g * 18 * k + n * k + g * n * k)
                           + 4 * (g * (n * 18 + n * 4) + (99 + 66) * (o * 14 + g * 18 * k)))
    one_group = kernel_model.sm90_routed_dgrad(n, k, o)  # O = 2304: round-robin too
    assert dgrad.programs == one_group.programs == 99 * 4
    assert dgrad.us(1e30, 1e30, 0) == pytest.approx(3 * one_group.us(1e30, 1e30, 0))


@pytest.mark.parametrize("runs", [True, False])
def test_the_routed_dgrad_shares_partial_slots_round_robin_over_a_multiple_of_its_columns(
        monkeypatch, runs):
    """As csrc/sm90_walks.cuh's segment_launch on 132 SMs: 4 column tiles (K = 768) walked
    round-robin (qkv, fc1; proj without runs) give each CTA one column tile and 33 slots for
    99 row tiles, 6 (K = 1000) 22; in runs (proj), at 16 column tiles (fc2: 132 is no
    multiple) or with no more tiles than SMs, one slot per row tile. The sum after reads the slots."""
    monkeypatch.setattr(kernel_model, "RUNS", runs)
    n = 12608
    assert kernel_model.dgrad_slots(n, 768, 2304, 3) == 33
    assert kernel_model.dgrad_slots(n, 768, 3072, 1) == 33
    assert kernel_model.dgrad_slots(n, 768, 768, 1) == (99 if runs else 33)
    assert kernel_model.dgrad_slots(n, 3072, 768, 1) == 99
    assert kernel_model.dgrad_slots(1576, 768, 2304, 3) == 13  # 52 tiles
    # 24 row tiles x 6 column tiles, round-robin either way (O = 1000: dy's row blocks in
    # flight take over half the L2)
    assert kernel_model.dgrad_slots(2949, 1000, 1000, 1) == 22
    sums = kernel_model.cuda_bwd(n, 768, 3072, 1).kernels[-1]
    assert sums[1] == (4 * 33 * (18 * 768 + 3072 * 14) + 2 * (18 * 768 + 3072 * 14)
                       + 4 * 99 * 4)


def test_paired_slots_are_those_one_sweep_after_an_even_sweep():
    # Sweeps of 2 over 5 row blocks: (0, 2) and (1, 3) pair, 4 is alone.
    assert kernel_model.paired_slots(5, 2) == 2
    # ViT-B proj at N = 12608 in sweeps of 22: sweeps 0+1 and 2+3 pair, the last 11 alone.
    assert kernel_model.paired_slots(99, 22) == 44
    assert kernel_model.paired_slots(1, 8) == 0


def test_a_programmatic_dependent_launch_is_charged_its_own_launch_cost(monkeypatch):
    """The routed backward's sum launches as the routed input gradient's dependent, and that
    as the u GEMM's where u is recomputed (csrc's EI_KERNELS_CUDA_PDL): such a launch costs
    DEPENDENT_LAUNCH_US, every other launch the plain cost, and never more than that."""
    n, k, o = 12608, 768, 768
    routed, portable = kernel_model.cuda_bwd(n, k, o, 1), kernel_model.cuda_bwd(n, k, o, 1, False)
    assert [kernel[-1] for kernel in routed.kernels] == [False, True]
    assert not any(kernel[-1] for kernel in portable.kernels)
    # qkv: the u GEMM, then the routed input gradient and the sum, each the last's dependent
    qkv = kernel_model.cuda_bwd(n, k, 3 * o, 3)
    assert [kernel[-1] for kernel in qkv.kernels] == [False, True, True]
    monkeypatch.setattr(kernel_model, "DEPENDENT_LAUNCH_US", 1.0)
    at = {launch: routed.us(790e12, 4.3e12, launch) for launch in (0.0, 0.5, 3.0)}
    assert at[3.0] - at[0.0] == pytest.approx(3.0 + 1.0)
    assert at[0.5] - at[0.0] == pytest.approx(0.5 + 0.5)  # capped at the plain launch
