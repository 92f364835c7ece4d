"""The "triton" backend: fused MoR forward and backward kernels (docs/MOR_MATH.md), Liger style.

Same contract as `torch_mor` (forward / backward). Two kernels, each program computing a
CHUNK: one block of BLOCK_M tokens and up to `col_tiles` consecutive BLOCK_N-column tiles of
it (launch table). What every column tile of a row needs (the forward's shrink, the
backward's g = dy B, du and dl) is done once per chunk instead of once per tile. The launcher
picks the chunking per launch from the GPU's SM count (`triton_schedule`): the one whose
rounds of programs end soonest, since a half-empty last round costs a whole one.

`_mor_fwd_kernel` (one pass over x). Chunks never straddle groups (grid: rows x groups x
    chunks per group; a group's last tile is masked at its edge). The first tile's K loop
    accumulates the base GEMM x W^T and the shrink of group g, u = x A_g^T and l = x R_g^T
    (rank and router columns padded to 16 for tl.dot), from the same x tiles; the chunk's
    later tiles run the plain GEMM loop. Epilogue per tile: fp32 softmax of l + c (once),
    p_k * s_k per rank column, z = u * coef, the rank-r expand z B_g^T into the accumulator,
    bias, one store of y. The group's first chunk also stores p (and u, for the backward).
    Cost over x W^T: the shrink, 2 * BLOCK_M * K * 32 per chunk, 25 % of the MMA work for
    one-tile chunks of 128 columns (what 132 SMs give ViT-B proj at N = 12608), 8.3 % for
    chunks of 3 x 128 (fc1), plus the expand,
    16 / K. The two-kernel form (a shrink kernel, then the GEMM with z as a K-extension) does
    each shrink once but reads x once more from HBM and adds a launch: at N = 12608 on an H200
    that is 4.5-18 us of reads (+ 3 us of launch) against the 3.9-15.7 us of shrink that
    the chunks the launcher picks on 132 SMs redo (ViT-B proj to fc2; fewer, longer chunks
    redo less but leave the last round of programs emptier).
`_mor_bwd_kernel` (one pass over dy; W frozen, no dW). Tiles are dx columns (over K). Per
    group, in the chunk's first tile: u = x A_g^T as the forward stored it (fp32, when u and p
    fit the op's 32 values per token: one group), else recomputed over all K (qkv; these x
    rows are read by all chunks of the row block at about the same time, so mostly from L2);
    z = u * coef; one loop over the group's dy columns accumulates both the dgrad GEMM dy W and
    g = dy B_g from the same dy tiles; du = g * coef and the fp32 softmax backward dl, kept in
    a small per-chunk scratch (N x 32 values per group, read back from L2) for the chunk's
    later tiles. Per tile and group: the dgrad loop (later tiles: without g), the K-extension
    [du | dl] [A_g; R_g] of dx, and the tile's share of dA_g = du^T x, dR_g = dl^T x from the
    x tile of the same (rows, columns). dB_g = dy^T z is split over the row block's chunks
    (each takes every NUM_CHUNKS-th dy tile of the group, re-read from L2), dc is summed by
    the first chunk. Cost over dy W: g once per chunk (16 / BLOCK_N per one-tile chunk),
    dB 16 / K, the K-extension and dA, dR 32 / O each. A row-block pre-pass that reads dy once
    for g (and would leave dx a plain GEMM) costs 4.5-18 us of HBM reads at N = 12608 plus a
    launch, more than the 2-12 us of g (and qkv's u) that those chunks redo. Without dx (x needs
    no gradient) the dy W GEMM and the K-extension are compiled out. `scripts/kernel_model.py`
    prints what this plan implies at the ViT-B shapes (a model, BENCHMARKS.md).

Variants are constexpr specialisations of the same two kernels, never copies: router on/off,
router bias, base bias, groups (backward), rank r and router outputs L, dx on/off, atomics;
the output dtype follows the pointer type. The bypass needs no flag: a small per-spec table
maps each rank column to the router output weighting it (bypass + k) and its scaling s_k.

Token reductions (dB, dA_cat, dR, dc) accumulate in fp32. `DETERMINISTIC` (default True; env
EI_KERNELS_TRITON_DETERMINISTIC=0 turns it off) writes one fp32 slot per token block, a flat
row dA | dR | dB | dc, and `_mor_slot_sum_kernel` sums the slots in a fixed order and casts
each gradient, in one launch (bitwise reproducible); off, the kernels use relaxed fp32 atomics
into one zeroed slot (less memory, order-dependent rounding). Atomics are not the default
because their speed-up has not been measured.

`POISON_OUTPUTS` (env EI_KERNELS_TRITON_POISON=1) fills every buffer the kernels write with NaN
before launch, so a test sees any element a kernel forgot to write.

Launch configs come from `triton_configs` (per-architecture tables, no autotuning); launches
go on the current stream with no host synchronisation, so they are CUDA-graph capturable.
x, dy and the weights may have any strides (the kernels take strides, no copies), except
lora_b, which the kernels index as contiguous [O, r] with the constexpr row stride r (a copy
only if a caller passes a strided one): the compiler then knows its rows are 4-byte aligned,
enough for asynchronous copies, so the dgrad loop that reads it stays software-pipelined
without the padded copy (one more launch) that an unknown runtime stride needed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backends import cuda_capability, multiprocessor_count
from ..spec import MoRSpec
from . import triton_interpreter_compat
from .device_constants import cached
from .triton_configs import KernelConfig, launch_config
from .triton_schedule import column_chunks

triton_interpreter_compat.apply()  # a no-op unless the triton 3.6 interpreter meets numpy 2.4

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DETERMINISTIC = os.environ.get("EI_KERNELS_TRITON_DETERMINISTIC", "1") != "0"
POISON_OUTPUTS = os.environ.get("EI_KERNELS_TRITON_POISON", "0") == "1"


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _mor_branch_coef(
    p,  # [BLOCK_M, BLOCK_L] fp32 probabilities of one group (0 in padded columns)
    col_logit,  # [BLOCK_R] int32: router output weighting each rank column (-1: padding)
    col_scale,  # [BLOCK_R] fp32: s_k of each rank column (0: padding)
    L: tl.constexpr,
    ROUTER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """[BLOCK_M, BLOCK_R] fp32 p_k(j) * s_k(j) per rank column j (s_k(j) alone without router)."""
    if ROUTER:
        cl = tl.arange(0, BLOCK_L)
        coef = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        # A register tensor cannot be gathered along columns: broadcast p_c to the rank columns
        # of branch c, one router output at a time (L is 2..5 in practice).
        for c in tl.static_range(L):
            p_c = tl.sum(tl.where(cl[None, :] == c, p, 0.0), axis=1)  # [BLOCK_M]
            coef = tl.where(col_logit[None, :] == c, p_c[:, None], coef)
        return coef * col_scale[None, :]
    else:
        return tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32) + col_scale[None, :]


@triton.jit
def _mor_fwd_k_loop(
    acc, acc_u, acc_l,  # [BM, BN], [BM, BR], [BM, BL] fp32 accumulators
    x_ptr, w_ptr, a_ptr, rw_ptr, rows64, row_ok, cols, col_ok, g, K,
    stride_xm, stride_xk, stride_wo, stride_wk, stride_am, stride_ak, stride_rm, stride_rk,
    R: tl.constexpr, L: tl.constexpr, ROUTER: tl.constexpr, SHRINK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """The base GEMM x W^T of one tile over all of K; with SHRINK also the shrink of group g,
    u = x A_g^T and l = x R_g^T, from the same x tiles."""
    cr = tl.arange(0, BLOCK_R)
    cl = tl.arange(0, BLOCK_L)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        w = tl.load(w_ptr + cols[None, :] * stride_wo + ks[:, None] * stride_wk,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BK, BN]
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        if SHRINK:
            a = tl.load(a_ptr + (g * R + cr)[None, :] * stride_am + ks[:, None] * stride_ak,
                        mask=k_ok[:, None] & (cr < R)[None, :], other=0.0)  # [BK, BR]
            acc_u = tl.dot(x, a, acc_u, input_precision=DOT_PRECISION)
            if ROUTER:
                rw = tl.load(rw_ptr + (g * L + cl)[None, :] * stride_rm
                             + ks[:, None] * stride_rk,
                             mask=k_ok[:, None] & (cl < L)[None, :], other=0.0)  # [BK, BL]
                acc_l = tl.dot(x, rw, acc_l, input_precision=DOT_PRECISION)
    return acc, acc_u, acc_l


@triton.jit
def _mor_fwd_store_tile(
    acc,  # [BM, BN] fp32: x W^T of the tile
    z,  # [BM, BR] in the input dtype: (x A_g^T) * coef of the tile's rows
    b_ptr, bias_ptr, y_ptr, rows64, row_ok, cols, col_ok, stride_ym, stride_yo,
    R: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Epilogue of one tile: the rank-r expand z B_g^T into the accumulator, bias, one store."""
    cr = tl.arange(0, BLOCK_R)
    # lora_b is contiguous [O, R] (the launcher sees to it): its row stride is the constexpr R.
    # Loaded once per tile, outside the K loop, so its 4-byte alignment costs nothing there.
    bt = tl.load(b_ptr + cols[None, :] * R + cr[:, None],
                 mask=col_ok[None, :] & (cr < R)[:, None], other=0.0)  # [BR, BN]
    acc = tl.dot(z, bt, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_ym + cols[None, :] * stride_yo,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _mor_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, rw_ptr, rb_ptr, b_ptr, col_logit_ptr, col_scale_ptr,
    y_ptr, p_ptr, u_ptr,
    N, K, OG, G, TILES_PER_GROUP, CHUNKS_PER_GROUP, COL_TILES,
    stride_xm, stride_xk, stride_wo, stride_wk, stride_am, stride_ak, stride_rm, stride_rk,
    stride_ym, stride_yo, stride_pm, stride_pl, stride_um,
    R: tl.constexpr, L: tl.constexpr,
    HAS_BIAS: tl.constexpr, ROUTER: tl.constexpr, HAS_ROUTER_BIAS: tl.constexpr,
    STORE_U: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M row blocks sweep all column chunks together, so their x
    # rows and the W tiles stay in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BLOCK_M)
    num_n = G * CHUNKS_PER_GROUP
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    g = pid_n // CHUNKS_PER_GROUP
    first_tile = (pid_n % CHUNKS_PER_GROUP) * COL_TILES
    end_tile = min(first_tile + COL_TILES, TILES_PER_GROUP)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)  # N * stride can exceed 2**31
    cr = tl.arange(0, BLOCK_R)
    r_ok = cr < R
    cl = tl.arange(0, BLOCK_L)
    l_ok = cl < L

    # The chunk's first tile: base GEMM and the group's shrink from the same x tiles.
    cols_g = first_tile * BLOCK_N + tl.arange(0, BLOCK_N)  # column inside group g
    col_ok = cols_g < OG
    acc, acc_u, acc_l = _mor_fwd_k_loop(
        tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
        tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32),
        tl.zeros((BLOCK_M, BLOCK_L), dtype=tl.float32),
        x_ptr, w_ptr, a_ptr, rw_ptr, rows64, row_ok, g * OG + cols_g, col_ok, g, K,
        stride_xm, stride_xk, stride_wo, stride_wk, stride_am, stride_ak, stride_rm, stride_rk,
        R, L, ROUTER, True, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_L)

    col_logit = tl.load(col_logit_ptr + cr, mask=r_ok, other=-1)  # [BR]
    col_scale = tl.load(col_scale_ptr + cr, mask=r_ok, other=0.0)  # [BR]
    p = acc_l
    if ROUTER:
        logits = acc_l
        if HAS_ROUTER_BIAS:
            logits += tl.load(rb_ptr + g * L + cl, mask=l_ok, other=0.0).to(tl.float32)[None, :]
        logits = tl.where(l_ok[None, :], logits, float("-inf"))
        e = tl.exp(logits - tl.max(logits, axis=1)[:, None])  # [BM, BL], 0 in padded columns
        p = e / tl.sum(e, axis=1)[:, None]
        # The group's first chunk owns the probabilities of these rows.
        tl.store(p_ptr + rows64[:, None] * stride_pm + (g * L + cl)[None, :] * stride_pl, p,
                 mask=row_ok[:, None] & l_ok[None, :] & (first_tile == 0))
    if STORE_U:  # kept for backward, which then skips its shrink over all of K
        tl.store(u_ptr + rows64[:, None] * stride_um + (g * R + cr)[None, :], acc_u,
                 mask=row_ok[:, None] & r_ok[None, :] & (first_tile == 0))
    coef = _mor_branch_coef(p, col_logit, col_scale, L, ROUTER, BLOCK_M, BLOCK_R, BLOCK_L)
    z = (acc_u * coef).to(x_ptr.dtype.element_ty)  # [BM, BR], rounded like the torch backend
    _mor_fwd_store_tile(acc, z, b_ptr, bias_ptr, y_ptr, rows64, row_ok, g * OG + cols_g, col_ok,
                        stride_ym, stride_yo, R, HAS_BIAS, DOT_PRECISION, BLOCK_R)

    # The chunk's other tiles reuse z: the shrink is done once per chunk, not once per tile.
    for tile in range(first_tile + 1, end_tile):
        cols_g = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols_g < OG
        acc, acc_u, acc_l = _mor_fwd_k_loop(
            tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), acc_u, acc_l,
            x_ptr, w_ptr, a_ptr, rw_ptr, rows64, row_ok, g * OG + cols_g, col_ok, g, K,
            stride_xm, stride_xk, stride_wo, stride_wk, stride_am, stride_ak, stride_rm,
            stride_rk, R, L, ROUTER, False, DOT_PRECISION, BLOCK_K, BLOCK_R, BLOCK_L)
        _mor_fwd_store_tile(acc, z, b_ptr, bias_ptr, y_ptr, rows64, row_ok, g * OG + cols_g,
                            col_ok, stride_ym, stride_yo, R, HAS_BIAS, DOT_PRECISION, BLOCK_R)


@triton.jit
def _mor_bwd_o_loop(
    acc, acc_g,  # [BM, BN] fp32 dx tile, [BM, BR] fp32 g = dy B_grp
    dy_ptr, w_ptr, b_ptr, rows64, row_ok, cols, col_ok, grp, OG, O_TILES,
    stride_dym, stride_dyo, stride_wo, stride_wk,
    R: tl.constexpr, WITH_G: tl.constexpr, COMPUTE_DX: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One loop over group grp's dy columns: the dgrad GEMM dy W of the tile and, WITH_G, the
    thin product g = dy B_grp, both from the same dy tiles."""
    cr = tl.arange(0, BLOCK_R)
    for t in range(0, O_TILES):
        o_loc = t * BLOCK_K + tl.arange(0, BLOCK_K)
        o_ok = o_loc < OG
        os_ = grp * OG + o_loc
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dym + os_[None, :] * stride_dyo,
                     mask=row_ok[:, None] & o_ok[None, :], other=0.0)  # [BM, BK]
        if WITH_G:
            # lora_b contiguous [O, R]: the constexpr row stride R tells the compiler its rows
            # are 4-byte aligned, enough for asynchronous copies, so the loop stays pipelined
            # without a padded copy (a runtime stride of 14 made it wait for every MMA).
            b = tl.load(b_ptr + os_[:, None] * R + cr[None, :],
                        mask=o_ok[:, None] & (cr < R)[None, :], other=0.0)  # [BK, BR]
            acc_g = tl.dot(dy, b, acc_g, input_precision=DOT_PRECISION)
        if COMPUTE_DX:
            w = tl.load(w_ptr + os_[:, None] * stride_wo + cols[None, :] * stride_wk,
                        mask=o_ok[:, None] & col_ok[None, :], other=0.0)  # [BK, BN]
            acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
    return acc, acc_g


@triton.jit
def _mor_bwd_lora_tile(
    acc,  # [BM, BN] fp32 dx tile
    du, dl_c,  # [BM, BR], [BM, BL] in the input dtype: group grp's du and dl of these rows
    x_ptr, a_ptr, rw_ptr, dar_ptr, rows64, row_ok, cols, col_ok, grp, K, slot,
    stride_xm, stride_xk, stride_am, stride_ak, stride_rm, stride_rk, stride_dar_slot,
    G: tl.constexpr, R: tl.constexpr, L: tl.constexpr, ROUTER: tl.constexpr,
    COMPUTE_DX: tl.constexpr, USE_ATOMICS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Group grp's share of one dx tile: the K-extension [du | dl] [A_grp; R_grp] into acc,
    and this tile's partial sums dA_grp = du^T x, dR_grp = dl^T x into the row block's slot."""
    cr = tl.arange(0, BLOCK_R)
    r_ok = cr < R
    cl = tl.arange(0, BLOCK_L)
    l_ok = cl < L
    x_tile = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xk,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # [BM, BN]
    if COMPUTE_DX:
        a_cols = tl.load(a_ptr + (grp * R + cr)[:, None] * stride_am + cols[None, :] * stride_ak,
                         mask=r_ok[:, None] & col_ok[None, :], other=0.0)  # [BR, BN]
        acc = tl.dot(du, a_cols, acc, input_precision=DOT_PRECISION)
    da = tl.dot(tl.trans(du), x_tile, input_precision=DOT_PRECISION)  # [BR, BN] fp32
    da_ptrs = dar_ptr + slot * stride_dar_slot + (grp * R + cr)[:, None] * K + cols[None, :]
    if USE_ATOMICS:
        tl.atomic_add(da_ptrs, da, mask=r_ok[:, None] & col_ok[None, :], sem="relaxed")
    else:
        tl.store(da_ptrs, da, mask=r_ok[:, None] & col_ok[None, :])
    if ROUTER:
        if COMPUTE_DX:
            rw_cols = tl.load(rw_ptr + (grp * L + cl)[:, None] * stride_rm
                              + cols[None, :] * stride_rk,
                              mask=l_ok[:, None] & col_ok[None, :], other=0.0)  # [BL, BN]
            acc = tl.dot(dl_c, rw_cols, acc, input_precision=DOT_PRECISION)
        dr = tl.dot(tl.trans(dl_c), x_tile, input_precision=DOT_PRECISION)  # [BL, BN] fp32
        dr_ptrs = (dar_ptr + slot * stride_dar_slot + (G * R + grp * L + cl)[:, None] * K
                   + cols[None, :])
        if USE_ATOMICS:
            tl.atomic_add(dr_ptrs, dr, mask=l_ok[:, None] & col_ok[None, :], sem="relaxed")
        else:
            tl.store(dr_ptrs, dr, mask=l_ok[:, None] & col_ok[None, :])
    return acc


@triton.jit
def _mor_bwd_kernel(
    x_ptr, dy_ptr, p_ptr, u_ptr, w_ptr, a_ptr, rw_ptr, b_ptr, col_logit_ptr, col_scale_ptr,
    dx_ptr, dar_ptr, db_ptr, dc_ptr, grad_ptr,
    N, K, OG, NUM_N_TILES, NUM_CHUNKS, COL_TILES, O_TILES,
    stride_xm, stride_xk, stride_dym, stride_dyo, stride_pm, stride_pl, stride_um,
    stride_wo, stride_wk,
    stride_am, stride_ak, stride_rm, stride_rk, stride_dxm, stride_dxk,
    stride_dar_slot, stride_db_slot, stride_dc_slot, stride_grad_chunk,
    G: tl.constexpr, R: tl.constexpr, L: tl.constexpr, ROUTER: tl.constexpr,
    HAS_U: tl.constexpr, COMPUTE_DX: tl.constexpr,
    USE_ATOMICS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BLOCK_M)
    width = GROUP_M * NUM_CHUNKS
    first_m = (pid // width) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m  # the chunk of COL_TILES dx column tiles
    first_tile = pid_n * COL_TILES
    end_tile = min(first_tile + COL_TILES, NUM_N_TILES)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)  # N * stride can exceed 2**31
    cols = first_tile * BLOCK_N + tl.arange(0, BLOCK_N)  # dx columns, i.e. over K
    col_ok = cols < K
    cr = tl.arange(0, BLOCK_R)
    r_ok = cr < R
    cl = tl.arange(0, BLOCK_L)
    l_ok = cl < L
    col_logit = tl.load(col_logit_ptr + cr, mask=r_ok, other=-1)  # [BR]
    col_scale = tl.load(col_scale_ptr + cr, mask=r_ok, other=0.0)  # [BR]
    dtype = x_ptr.dtype.element_ty
    # This row block's fp32 slot of the reduction buffers (all slots alias one in atomic mode).
    slot = pid_m.to(tl.int64)
    # The chunk's private rows of the du | dl scratch, for its later tiles.
    grad_rows = pid_n.to(tl.int64) * stride_grad_chunk + rows64 * (G * (BLOCK_R + BLOCK_L))
    keep = row_ok & (end_tile - first_tile > 1)

    # The chunk's first tile: u, z, g = dy B, du, dl once for the chunk's rows, per group.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Unrolled (G is 1 or 3 in practice): a runtime loop carrying acc spills more registers.
    for grp in tl.static_range(G):
        if HAS_U:  # u as the forward computed it (fp32), when it fits the memory contract
            acc_u = tl.load(u_ptr + rows64[:, None] * stride_um + (grp * R + cr)[None, :],
                            mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # [BM, BR]
        else:
            # u = x A_grp^T over all of K, recomputed once per chunk; these x rows are read by
            # all chunks of the row block at about the same time, so mostly from L2.
            acc_u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                x = tl.load(x_ptr + rows64[:, None] * stride_xm + ks[None, :] * stride_xk,
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
                a = tl.load(a_ptr + (grp * R + cr)[None, :] * stride_am
                            + ks[:, None] * stride_ak,
                            mask=k_ok[:, None] & r_ok[None, :], other=0.0)  # [BK, BR]
                acc_u = tl.dot(x, a, acc_u, input_precision=DOT_PRECISION)
        # Rows past N and padded columns load p = 0, so they contribute nothing below.
        p = tl.load(p_ptr + rows64[:, None] * stride_pm + (grp * L + cl)[None, :] * stride_pl,
                    mask=row_ok[:, None] & l_ok[None, :], other=0.0)  # [BM, BL] fp32
        coef = _mor_branch_coef(p, col_logit, col_scale, L, ROUTER, BLOCK_M, BLOCK_R, BLOCK_L)
        z = (acc_u * coef).to(dtype)  # the forward's z, for dB = dy^T z

        acc, acc_g = _mor_bwd_o_loop(
            acc, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), dy_ptr, w_ptr, b_ptr, rows64,
            row_ok, cols, col_ok, grp, OG, O_TILES, stride_dym, stride_dyo, stride_wo,
            stride_wk, R, True, COMPUTE_DX, DOT_PRECISION, BLOCK_K, BLOCK_R)

        # dB_grp = dy^T z: every chunk of the row block takes every NUM_CHUNKS-th dy tile of
        # the group (re-read from L2), so this block's share is computed exactly once and the
        # main loop above stays free of conditionals.
        first = (pid_n + NUM_CHUNKS - (grp * O_TILES) % NUM_CHUNKS) % NUM_CHUNKS
        for t in range(first, O_TILES, NUM_CHUNKS):
            o_loc = t * BLOCK_K + tl.arange(0, BLOCK_K)
            o_ok = o_loc < OG
            os_ = grp * OG + o_loc
            dy = tl.load(dy_ptr + rows64[:, None] * stride_dym + os_[None, :] * stride_dyo,
                         mask=row_ok[:, None] & o_ok[None, :], other=0.0)  # [BM, BK]
            db = tl.dot(tl.trans(dy), z, input_precision=DOT_PRECISION)  # [BK, BR] fp32
            db_ptrs = db_ptr + slot * stride_db_slot + os_[:, None] * R + cr[None, :]
            if USE_ATOMICS:
                tl.atomic_add(db_ptrs, db, mask=o_ok[:, None] & r_ok[None, :], sem="relaxed")
            else:
                tl.store(db_ptrs, db, mask=o_ok[:, None] & r_ok[None, :])

        # du and dl, rounded to the input dtype first, as the torch backend does.
        du = (acc_g * coef).to(dtype)  # [BM, BR]
        dl_c = tl.zeros((BLOCK_M, BLOCK_L), dtype=dtype)
        if ROUTER:
            # dp_k = s_k * sum_{j in branch k} g_j u_j (dp of the bypass stays 0), then the
            # softmax backward dl = p * (dp - sum_i p_i dp_i), all in fp32.
            gu = acc_g * acc_u * col_scale[None, :]  # [BM, BR]
            dp = tl.zeros((BLOCK_M, BLOCK_L), dtype=tl.float32)
            for c in tl.static_range(L):
                dp_c = tl.sum(tl.where(col_logit[None, :] == c, gu, 0.0), axis=1)  # [BM]
                dp = tl.where(cl[None, :] == c, dp_c[:, None], dp)
            dl = p * (dp - tl.sum(p * dp, axis=1)[:, None])  # [BM, BL] fp32
            # dc: the row block's sum, stored by its first chunk only.
            dc_ptrs = dc_ptr + slot * stride_dc_slot + grp * L + cl
            if USE_ATOMICS:
                tl.atomic_add(dc_ptrs, tl.sum(dl, axis=0), mask=l_ok & (pid_n == 0), sem="relaxed")
            else:
                tl.store(dc_ptrs, tl.sum(dl, axis=0), mask=l_ok & (pid_n == 0))
            dl_c = dl.to(dtype)
        # Kept for the chunk's later tiles (nothing is written for a one-tile chunk).
        grad_off = grp * (BLOCK_R + BLOCK_L)
        tl.store(grad_ptr + grad_rows[:, None] + grad_off + cr[None, :], du, mask=keep[:, None])
        tl.store(grad_ptr + grad_rows[:, None] + grad_off + BLOCK_R + cl[None, :], dl_c,
                 mask=keep[:, None])
        acc = _mor_bwd_lora_tile(
            acc, du, dl_c, x_ptr, a_ptr, rw_ptr, dar_ptr, rows64, row_ok, cols, col_ok, grp, K,
            slot, stride_xm, stride_xk, stride_am, stride_ak, stride_rm, stride_rk,
            stride_dar_slot, G, R, L, ROUTER, COMPUTE_DX, USE_ATOMICS, DOT_PRECISION,
            BLOCK_R, BLOCK_L)
    if COMPUTE_DX:
        tl.store(dx_ptr + rows64[:, None] * stride_dxm + cols[None, :] * stride_dxk,
                 acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    # The chunk's other tiles: the dgrad GEMM and the LoRA share, with du and dl read back
    # from the chunk's scratch rows (L2) instead of a second g = dy B over all of O. Other
    # threads of the program read what these stored: Triton orders a program's global stores
    # and loads of the same address across threads only through a barrier.
    tl.debug_barrier()
    for tile in range(first_tile + 1, end_tile):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for grp_ in range(G):  # a runtime loop: unrolled next to the first tile's, G = 3 spills
            # The LoRA share first: its x tile and du, dl are dead before the dgrad loop
            # (the other order keeps them live across it and spills on sm_90a).
            grad_off = grp_ * (BLOCK_R + BLOCK_L)
            du = tl.load(grad_ptr + grad_rows[:, None] + grad_off + cr[None, :],
                         mask=row_ok[:, None], other=0.0)  # [BM, BR]
            dl_c = tl.load(grad_ptr + grad_rows[:, None] + grad_off + BLOCK_R + cl[None, :],
                           mask=row_ok[:, None], other=0.0)  # [BM, BL]
            acc = _mor_bwd_lora_tile(
                acc, du, dl_c, x_ptr, a_ptr, rw_ptr, dar_ptr, rows64, row_ok, cols, col_ok,
                grp_, K, slot, stride_xm, stride_xk, stride_am, stride_ak, stride_rm, stride_rk,
                stride_dar_slot, G, R, L, ROUTER, COMPUTE_DX, USE_ATOMICS, DOT_PRECISION,
                BLOCK_R, BLOCK_L)
            if COMPUTE_DX:
                acc, _ = _mor_bwd_o_loop(
                    acc, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), dy_ptr, w_ptr, b_ptr,
                    rows64, row_ok, cols, col_ok, grp_, OG, O_TILES, stride_dym, stride_dyo,
                    stride_wo, stride_wk, R, False, COMPUTE_DX, DOT_PRECISION, BLOCK_K,
                    BLOCK_R)
        if COMPUTE_DX:
            tl.store(dx_ptr + rows64[:, None] * stride_dxm + cols[None, :] * stride_dxk,
                     acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _mor_slot_sum_kernel(
    buf_ptr, da_ptr, dr_ptr, db_ptr, dc_ptr,
    SLOTS, N_A, N_R, N_B, N_C, stride_slot,
    BLOCK: tl.constexpr,
):
    # The backward's fp32 slots [SLOTS, N_A + N_R + N_B + N_C] (dA | dR | dB | dc, flattened)
    # summed over slots in a fixed order (bitwise reproducible), then each gradient written in
    # its own dtype: one launch where separate sums and casts took seven.
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    total = N_A + N_R + N_B + N_C
    ok = cols < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SLOTS):
        acc += tl.load(buf_ptr + s * stride_slot + cols, mask=ok, other=0.0)
    tl.store(da_ptr + cols, acc.to(da_ptr.dtype.element_ty), mask=cols < N_A)
    c = cols - N_A
    tl.store(dr_ptr + c, acc.to(dr_ptr.dtype.element_ty), mask=(c >= 0) & (c < N_R))
    c = c - N_R
    tl.store(db_ptr + c, acc.to(db_ptr.dtype.element_ty), mask=(c >= 0) & (c < N_B))
    c = c - N_B
    tl.store(dc_ptr + c, acc.to(dc_ptr.dtype.element_ty), mask=(c >= 0) & (c < N_C))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _check_dtype(x: Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"backend='triton' supports {SUPPORTED_DTYPES}, got {x.dtype}; use backend='torch' "
            f"(or 'auto', which picks torch for float64)"
        )
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        raise TypeError("backend='triton' under TRITON_INTERPRET=1 (CPU) has no bfloat16 support")


def _config(kernel: str, x: Tensor):
    return launch_config(kernel, cuda_capability(x.device), x.shape[0], x.dtype,
                         _dot_precision(x))


def _dot_precision(x: Tensor) -> str:
    # fp32 matmuls use TF32 only when PyTorch's own matmuls would, and only where it exists
    # (sm_80 on); ignored for fp16/bf16.
    if (x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32
            and cuda_capability(x.device) >= (8, 0)):
        return "tf32"
    return "ieee"


def _branch_table(spec: MoRSpec, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per rank column j of a group: the router output weighting it, bypass + k(j) (int32), and
    its scaling s_k(j) (fp32). Built once per spec and device (device_constants)."""

    def build() -> tuple[Tensor, Tensor]:
        first = int(spec.bypass)
        logit = [torch.full((r,), first + k, dtype=torch.int32, device=device)
                 for k, r in enumerate(spec.ranks)]
        scale = [torch.full((r,), s, dtype=torch.float32, device=device)
                 for r, s in zip(spec.ranks, spec.scalings)]
        return torch.cat(logit), torch.cat(scale)

    return cached(("triton_branch_table", spec.ranks, spec.scalings, spec.bypass), device, build)


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A buffer every element of which a kernel writes (NaN-filled under POISON_OUTPUTS)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _reduction_buffer(slots: int, width: int, device: torch.device) -> Tensor:
    """fp32 per-block slots (deterministic) or one zeroed slot the kernels add into atomically,
    each slot a flat row holding dA | dR | dB | dc."""
    if DETERMINISTIC:
        return _alloc((slots, width), torch.float32, device)
    return torch.zeros((1, width), dtype=torch.float32, device=device)


def _pad(n: int) -> int:
    """Padded width of a tl.dot operand (at least 16)."""
    return max(16, triton.next_power_of_2(n))


def _slots(device: torch.device, cfg: KernelConfig) -> int | None:
    """Programs of `cfg` the GPU runs at once (None in the interpreter)."""
    sms = multiprocessor_count(device)
    return sms * cfg.programs_per_sm if sms is not None else None


def fwd_chunk_cost(cfg: KernelConfig, R: int, L: int, router: bool) -> float:
    """The forward's per-chunk work in tiles' worth: the shrink's rank (and router) columns
    over K next to a tile's BLOCK_N."""
    return (_pad(R) + (_pad(L) if router else 0)) / cfg.block_n


def bwd_chunk_cost(cfg: KernelConfig, R: int, G: int, k: int, o: int, has_u: bool) -> float:
    """The backward's per-chunk work in tiles' worth: g = dy B_g over each group's O/G columns
    (and, without the forward's u, u = x A_g^T over K per group) next to a tile's dgrad, dy W
    over O into BLOCK_N columns."""
    per_chunk = _pad(R) * o + (0 if has_u else G * _pad(R) * k)
    return per_chunk / (cfg.block_n * max(o, 1))


def forward(x, weight, bias, lora_a, lora_b, router_weight, router_bias, spec: MoRSpec,
            keep_u: bool = False):
    """-> (y, probs), or (y, probs, u) with keep_u: u [N, G*r] fp32, for `backward`."""
    _check_dtype(x)
    n, k = x.shape
    o = weight.shape[0]
    G, R, L = spec.groups, spec.rank, spec.num_logits
    y = _alloc((n, o), x.dtype, x.device)
    probs = _alloc((n, G * L), torch.float32, x.device)
    u = _alloc((n, G * R), torch.float32, x.device) if keep_u else None
    if n == 0:
        return (y, probs, u) if keep_u else (y, probs)
    og = o // G
    cfg = _config("fwd", x)
    # At least one tile per group, so that probs are written even with no output columns.
    tiles = max(1, triton.cdiv(og, cfg.block_n))
    chunks, col_tiles = column_chunks(tiles, cfg.col_tiles, triton.cdiv(n, cfg.block_m) * G,
                                      _slots(x.device, cfg), fwd_chunk_cost(cfg, R, L, spec.router))
    col_logit, col_scale = _branch_table(spec, x.device)
    rw = router_weight if router_weight is not None else lora_a  # placeholders are never read
    b = lora_b.contiguous()  # the kernels index it with row stride R (a no-op for a parameter)
    grid = (triton.cdiv(n, cfg.block_m) * G * chunks,)
    _mor_fwd_kernel[grid](
        x, weight, bias if bias is not None else x, lora_a, rw,
        router_bias if router_bias is not None else x, b, col_logit, col_scale, y, probs,
        u if keep_u else probs,
        n, k, og, G, tiles, chunks, col_tiles,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        lora_a.stride(0), lora_a.stride(1), rw.stride(0), rw.stride(1),
        y.stride(0), y.stride(1),
        probs.stride(0), probs.stride(1), u.stride(0) if keep_u else 0,
        R=R, L=L, HAS_BIAS=bias is not None, ROUTER=spec.router,
        HAS_ROUTER_BIAS=router_bias is not None, STORE_U=keep_u,
        DOT_PRECISION=_dot_precision(x),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        BLOCK_R=_pad(R), BLOCK_L=_pad(L), GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return (y, probs, u) if keep_u else (y, probs)


def backward(dy, x, probs, weight, lora_a, lora_b, router_weight, spec: MoRSpec, compute_dx,
             u: Tensor | None = None):
    """u: what `forward(..., keep_u=True)` returned, or None to recompute it from x."""
    _check_dtype(x)
    n, k = x.shape
    o = weight.shape[0]
    G, R, L = spec.groups, spec.rank, spec.num_logits
    dev, dtype = x.device, x.dtype
    if n == 0:  # no tokens: every weight gradient is an empty sum
        return (
            x.new_empty((0, k)), torch.zeros_like(lora_a), torch.zeros_like(lora_b),
            x.new_zeros((G * L, k)), x.new_zeros((G * L,)),
        )
    og = o // G
    cfg = _config("bwd", x)
    blocks = triton.cdiv(n, cfg.block_m)
    # At least one column tile, so that dB and dc are computed even when K == 0.
    n_tiles = max(1, triton.cdiv(k, cfg.block_n))
    chunks, col_tiles = column_chunks(n_tiles, cfg.col_tiles, blocks, _slots(dev, cfg),
                                      bwd_chunk_cost(cfg, R, G, k, o, u is not None))
    col_logit, col_scale = _branch_table(spec, dev)
    dx = _alloc((n, k) if compute_dx else (0, k), dtype, dev)
    n_a, n_r, n_b, n_c = G * R * k, G * L * k, o * R, G * L
    slots = _reduction_buffer(blocks, n_a + n_r + n_b + n_c, dev)
    dar_buf, db_buf, dc_buf = slots[:, : n_a + n_r], slots[:, n_a + n_r : -n_c or None], \
        slots[:, slots.shape[1] - n_c :]
    rw = router_weight if router_weight is not None else lora_a  # never read without router
    slot_stride = slots.stride(0) if DETERMINISTIC else 0
    # du | dl of each chunk's rows, per group, for the chunk's tiles after its first.
    scratch = (_alloc((chunks, n, G * (_pad(R) + _pad(L))), dtype, dev)
               if col_tiles > 1 else None)
    _mor_bwd_kernel[(blocks * chunks,)](
        x, dy, probs, u if u is not None else probs, weight, lora_a, rw, lora_b.contiguous(),
        col_logit, col_scale, dx if compute_dx else x, dar_buf, db_buf, dc_buf,
        scratch if scratch is not None else x,
        n, k, og, n_tiles, chunks, col_tiles, triton.cdiv(og, cfg.block_k),
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), probs.stride(0), probs.stride(1),
        u.stride(0) if u is not None else 0,
        weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1),
        rw.stride(0), rw.stride(1),
        dx.stride(0) if compute_dx else 0, dx.stride(1) if compute_dx else 0,
        slot_stride, slot_stride, slot_stride, scratch.stride(0) if scratch is not None else 0,
        G=G, R=R, L=L, ROUTER=spec.router, HAS_U=u is not None, COMPUTE_DX=compute_dx,
        USE_ATOMICS=not DETERMINISTIC,
        DOT_PRECISION=_dot_precision(x),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        BLOCK_R=_pad(R), BLOCK_L=_pad(L), GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )

    # Separate tensors (op outputs must not alias each other), written by one launch.
    d_lora_a = _alloc(lora_a.shape, dtype, dev)
    d_router_weight = _alloc((G * L, k), dtype, dev)
    d_lora_b = _alloc(lora_b.shape, dtype, dev)
    d_router_bias = _alloc((G * L,), dtype, dev)
    outs = [t if t.numel() else slots for t in (d_lora_a, d_router_weight, d_lora_b,
                                                 d_router_bias)]  # empty: a placeholder
    block = 1024
    _mor_slot_sum_kernel[(triton.cdiv(slots.shape[1], block),)](
        slots, *outs, slots.shape[0], n_a, n_r, n_b, n_c, slots.stride(0), BLOCK=block,
    )
    return dx, d_lora_a, d_lora_b, d_router_weight, d_router_bias
