"""scripts/tune_triton.py check: the verdict on a main loop read from compiled TTGIR; the
launch tables, how many programs fit on an SM, and how the launchers order and split their
programs for the GPU's size."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ei_kernels.ops.triton_schedule import (launch_order, list_schedule_efficiency,
                                            program_durations, split_tiles)

_spec = importlib.util.spec_from_file_location(
    "tune_triton", Path(__file__).resolve().parents[1] / "scripts" / "tune_triton.py")
tune_triton = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tune_triton)

# The shape of triton's TTGIR for a K loop carrying a wgmma accumulator (abridged).
LOOP = """    %acc:3 = scf.for %k = %c0 to %K step %c64 iter_args(%a = %cst, %t = %c0) -> (tensor<128x128xf32, #mma>, i32) {
      %x = ttg.async_wait %tok {{num = 4 : i32}}
      {load}
      %d = ttng.warp_group_dot %x, %w, %a {{isAsync = true}} : !ttg.memdesc<128x64xbf16>
      %e:3 = ttng.warp_group_dot_wait %d, %x, %w {{pendings = {pendings} : i32}} : tensor<128x128xf32, #mma>
      scf.yield %e#0, %t : tensor<128x128xf32, #mma>, i32
    }} loc(#loc1)
    %n:2 = scf.for %i = %c0 to %N step %c1 iter_args(%u = %c0) -> (i32, i32) {{
      %s = ttng.warp_group_dot_wait %q {{pendings = 0 : i32}} : tensor<64x16xf32, #mma3>
      scf.yield %u, %u : i32, i32
    }} loc(#loc2)
"""


def _report(load="", pendings=1):
    text = LOOP.replace("{{", "{").replace("}}", "}").replace("{load}", load)
    return tune_triton.main_loop_report(text.replace("{pendings}", str(pendings)))


def test_a_pipelined_main_loop_passes_and_loops_without_accumulator_are_ignored():
    assert _report() == ["pipelined"]


def test_an_outer_loop_around_a_main_loop_is_not_judged_itself():
    inner = LOOP.split("    %n:2")[0].replace("{{", "{").replace("}}", "}").replace(
        "{load}", "").replace("{pendings}", "1")
    outer = ("    %g:2 = scf.for %i = %c0 to %c3 step %c1 iter_args(%o = %cst) -> "
             "(tensor<128x128xf32, #mma>, i32) {\n"
             "      %x_tile_9 = tt.load %p : tensor<128x128x!tt.ptr<bf16>, #blocked>\n"
             + inner + "      scf.yield %o : tensor<128x128xf32, #mma>\n    }\n")
    assert tune_triton.main_loop_report(outer) == ["pipelined"]


def test_a_wait_for_all_mmas_or_a_synchronous_tile_load_is_reported():
    (verdict,) = _report(pendings=0)
    assert verdict.startswith("NOT pipelined") and "pendings = 0" in verdict
    load = "%b_7 = tt.load %p, %m, %z : tensor<64x16x!tt.ptr<bf16>, #blocked3>"
    (verdict,) = _report(load=load)
    assert "synchronous 2-D loads: b_7" in verdict


def test_a_last_round_at_most_half_full_is_split_in_two():
    assert split_tiles(594, 132) == 66  # ViT-B proj at N = 12608: 4.5 rounds, then 5 full
    assert split_tiles(2376, 132) == 0  # fc1: 18 full rounds
    assert split_tiles(600, 132) == 0  # a last round of 72: fuller than half
    assert split_tiles(60, 132) == 60  # less than half a round: every tile
    assert split_tiles(594, None) == 0  # the interpreter


def test_list_scheduling_takes_programs_in_order_to_the_first_free_slot():
    assert list_schedule_efficiency([1.0] * 4, 2) == 1.0
    assert list_schedule_efficiency([1.0] * 3, 2) == 0.75  # the last program alone
    # 2, then 1 + 1 on the other slot: both end at 2.
    assert list_schedule_efficiency([2.0, 1.0, 1.0], 2) == 1.0


def test_programs_in_launch_order():
    # 2 row blocks, 1 group of 3 tiles, sweeps of 2 row blocks: both first tiles first.
    assert program_durations(2, 1, 3, 2, 0, 0.25) == [1.25, 1.25, 1.0, 1.0, 1.0, 1.0]
    # groups=2 of 2 tiles, one row block per sweep: the first tile of each group is longer.
    assert program_durations(1, 2, 2, 1, 0, 0.5) == [1.5, 1.0, 1.5, 1.0]
    # The last 2 tiles split: two programs of half a tile each, the first keeps the z work.
    assert program_durations(1, 1, 3, 1, 2, 0.25) == [1.25, 0.5, 0.5, 0.5, 0.5]


def test_sweeps_that_fill_a_round_spread_the_longer_programs():
    # ViT-B proj at N = 12608 on 132 SMs: sweeps of 8 row blocks leave some slots a quarter
    # tile behind at the end (list scheduling: 5 tile times for 4.69 of work); sweeps of
    # 22 row blocks (one round of 132 programs) end at 4.75.
    z_cost = 0.25
    default = list_schedule_efficiency(program_durations(99, 1, 6, 8, 66, z_cost), 132)
    group_m, split = launch_order(99, 1, 6, 132, z_cost, 8)
    chosen = list_schedule_efficiency(program_durations(99, 1, 6, group_m, split, z_cost), 132)
    assert split == 66 and default == pytest.approx(618.75 / (132 * 5.0))
    assert group_m == 22 and chosen == pytest.approx(618.75 / (132 * 4.75))
    assert launch_order(99, 1, 6, None, z_cost, 8) == (8, 0)  # the interpreter: the table's
    for blocks, groups, tiles in ((1, 1, 1), (13, 3, 6), (99, 1, 24), (400, 1, 6)):
        m, s = launch_order(blocks, groups, tiles, 132, z_cost, 8)
        assert m >= 1 and 0 <= s <= blocks * groups * tiles


def test_programs_per_sm_follow_registers_shared_memory_and_threads():
    # 8 warps at 255 registers fill the register file: one program.
    assert tune_triton.programs_per_sm("sm90", 255, 56 * 1024, 8) == 1
    # 4 warps at 128 registers: 4 by registers, 2 by 100 KiB of shared memory each.
    assert tune_triton.programs_per_sm("sm90", 128, 100 * 1024, 4) == 2
    # sm86: 1536 threads; 4 warps at 32 registers and little shared memory: 12 by threads.
    assert tune_triton.programs_per_sm("sm86", 32, 1024, 4) == 12
    # Registers are allocated per warp in units of 256: 129 registers count as 136.
    assert tune_triton.programs_per_sm("sm80", 129, 0, 4) == 3


def test_each_architecture_family_gets_its_own_launch_table():
    from ei_kernels.ops.triton_configs import TABLES, arch_name, launch_config

    assert [arch_name(c) for c in ((7, 5), (8, 0), (8, 6), (8, 9), (9, 0))] == [
        "sm75", "sm80", "sm86", "sm86", "sm90"]
    # Turing: FMA tiles (no tensor-core dots in Triton there), one stage (no async copies),
    # and no TF32 entry (it does not exist before sm_80).
    assert all(cfg.num_stages == 1 for cfg in TABLES["sm75"].values())
    assert {dtype for _, dtype, _ in TABLES["sm75"]} == {"16", "fp32"}
    assert launch_config("fwd", (7, 5), 12608, torch.float16, "ieee").block_k == 16
