"""The "triton" backend: fused MoR forward and backward kernels (docs/MOR_MATH.md), Liger style.

Same contract as `torch_mor` (forward / backward). Both kernels run one program per tile, and
what every column tile of a row block needs (the forward's z, the backward's du | dl | z) is
computed once per row block, by its first tile, and shared with the others (below: flags).

`_mor_fwd_kernel` (one program per output tile; grid: tiles, in the grouped order of
    `triton_schedule.launch_order`). Each group's first tile of a row block computes the
    group's z = (x A_g^T) * coef for those rows (the shrink u = x A_g^T and l = x R_g^T over
    all of K, rank and router columns padded to 16 for tl.dot, fp32 softmax of l + c,
    p_k * s_k per rank column), stores p (and u, for the backward) and z, and publishes z by
    a flag (`launch_flags`), all before its own GEMM. Every tile then runs the plain x W^T
    loop and, in its epilogue, takes z: its own, or the published one (16 values per row),
    or, where the flag is not set yet, computes it with the same code (same bits). The other
    tiles of a row block launch with or after its first and look only after their GEMM,
    about three quarters of a tile after the z was published, so the fallback is for safety,
    not for speed. Epilogue: the rank-r expand z B_g^T into the accumulator, bias, one store.
    Cost over x W^T: the shrink once per row block and group, 32 / O of the MMA work (4.2 % at
    O = 768), and the expand, 16 / K; where one program per tile recomputed the shrink (25 % at
    BLOCK_N = 128) this removes a fifth of the MMA work, and where a separate shrink kernel
    would read x once more from HBM (4.5-18 us at N = 12608) and add a launch, it reads x a
    second time only from L2 (its first tile's GEMM). A last round of programs at most half
    full is split: its tiles become two programs each over the two halves of K, the second to
    finish adds the other's fp32 partial (stored, then a ticket flag) and writes the tile, so
    that round runs full and half as long. With sweeps of a round of programs (group_m, fitted
    per launch), list scheduling puts the 660 programs of ViT-B proj at N = 12608 on 132 SMs
    at 0.99 of the GPU, against 0.90 for 594 equal tiles (`scripts/kernel_model.py`).
`_mor_bwd_kernel` (one program per dx tile, over K; W frozen, no dW; the same grouped order,
    split and sharing as the forward). Each row block's first tile computes, per group, u =
    x A_g^T as the forward stored it (fp32, when u and p fit the op's 32 values per token: one
    group), else over all of K (qkv), z = u * coef, g = dy B_g over the group's dy columns,
    du = g * coef and the fp32 softmax backward dl, and dc; it stores du | dl | z (48 values
    per row and group) and publishes them, all before its own dgrad loop. Every tile then runs
    the plain dy W loop over all of O and, after it, per group: the K-extension
    [du | dl] [A_g; R_g] of dx, its share of dA_g = du^T x and dR_g = dl^T x from the x tile
    of the same (rows, columns), and of dB_g = dy^T z (every NUM_N_TILES-th dy tile of the
    group, re-read from L2), into the row block's slot. Cost over dy W: g once per row block
    (16 / K of the MMA work), dB 16 / K, the K-extension and dA, dR 32 / O each; where
    one-tile programs recomputed g (16 / BLOCK_N, 12.5 %) this removes 10 % at ViT-B proj.
    A split tile's halves take the two halves of O (dy columns). Without dx (x needs no
    gradient) the dgrad loop and the K-extension are compiled out and nothing is split.
    `scripts/kernel_model.py` prints what this plan implies at the ViT-B shapes (a model,
    BENCHMARKS.md).

Variants are constexpr specialisations of the same two kernels, never copies: router on/off,
router bias, base bias, groups (backward), rank r and router outputs L, dx on/off, atomics;
the output dtype follows the pointer type. The bypass needs no flag: a small per-spec table
maps each rank column to the router output weighting it (bypass + k) and its scaling s_k.

Programs signal each other only without waiting: a flag is read once and, if it is not set,
the reader does the work itself, so no program ever spins on another (no deadlock, whatever
the GPU runs at once) and the result does not depend on timing. Publishing stores data, a
barrier of the program's threads, then an atomic release of the flag; reading is an atomic
acquire, then loads that bypass L1 (.cg). `SHARE_Z` (env EI_KERNELS_TRITON_SHARE_Z=0 turns
it off) publishes nothing, so every tile computes what it needs itself (the cost of one-tile
programs before): for timing against, and a switch should a GPU ever show a problem with the
flags.

Token reductions (dB, dA_cat, dR, dc) accumulate in fp32. `DETERMINISTIC` (default True; env
EI_KERNELS_TRITON_DETERMINISTIC=0 turns it off) gives each token block an fp32 slot, a flat
row dA | dR | dB | dc, in pairs one sweep apart (row blocks m and m + GROUP_M, m in an even
sweep): per dx column tile, the first of the two to get there (almost always m, a round of
programs earlier) stores its partial sums in the pair's head slot, and the second adds its
own to them there (once they are published stored) or else stores them in its own slot and
marks it. `_mor_slot_sum_kernel` then sums, in a fixed order, each pair (head + marked
partner: a + b of the same two partials either way) and casts each gradient, in one launch:
bitwise reproducible, reading the slots of 55 of ViT-B proj's 99 row blocks at N = 12608
(5.4 of 9.7 MB; the pairs' second halves read 4.3 MB more inside the backward, which is
compute-bound there). Off, the kernels use relaxed fp32 atomics into one zeroed slot (less
memory, order-dependent rounding). Atomics are not the default because their speed-up has
not been measured.

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

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backends import cuda_capability, multiprocessor_count
from ..spec import MoRSpec
from . import launch_flags, triton_interpreter_compat
from .device_constants import cached
from .triton_configs import KernelConfig, launch_config
from .triton_schedule import launch_order

triton_interpreter_compat.apply()  # a no-op unless the triton 3.6 interpreter meets numpy 2.4

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DETERMINISTIC = os.environ.get("EI_KERNELS_TRITON_DETERMINISTIC", "1") != "0"
POISON_OUTPUTS = os.environ.get("EI_KERNELS_TRITON_POISON", "0") == "1"
SHARE_Z = os.environ.get("EI_KERNELS_TRITON_SHARE_Z", "1") != "0"


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
def _program_tile(num_m, num_n, GROUP_M, SPLIT_TILES, SPLIT_AT, FULL):
    """`_tile_of` this program (a seam: tests run the programs in other orders)."""
    return _tile_of(tl.program_id(0), num_m, num_n, GROUP_M, SPLIT_TILES, SPLIT_AT, FULL)


@triton.jit
def _tile_of(pid, num_m, num_n, GROUP_M, SPLIT_TILES, SPLIT_AT, FULL):
    """(tile_id, half, pid_m, pid_n, lo, hi, split) of program pid. One program per tile,
    except the last SPLIT_TILES tiles, two each: half 0 takes the reduction [0, SPLIT_AT),
    half 1 [SPLIT_AT, FULL); a tile not split (half -1) all of [0, FULL); split numbers the
    split tiles from 0. Grouped order: GROUP_M row blocks (a runtime value: the launcher fits
    it to the GPU, triton_schedule.launch_order) sweep their num_n column tiles together, so
    their rows and the weight tiles stay in L2, column tile 0 of all of them first."""
    first_split = num_m * num_n - SPLIT_TILES
    half = pid * 0 - 1
    tile_id = pid
    if pid >= first_split:
        tile_id = first_split + (pid - first_split) // 2
        half = (pid - first_split) % 2
    width = GROUP_M * num_n
    first_m = (tile_id // width) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % width) % size_m
    pid_n = (tile_id % width) // size_m
    lo = tl.where(half == 1, SPLIT_AT, 0)
    hi = tl.where(half == 0, SPLIT_AT, FULL)
    return tile_id, half, pid_m, pid_n, lo, hi, tile_id - first_split


@triton.jit
def _publish(flag_ptr, EPOCH):
    """Set a flag for this launch once all of this program's threads stored what it guards."""
    tl.debug_barrier()
    tl.atomic_xchg(flag_ptr, EPOCH, sem="release", scope="gpu")


@triton.jit
def _published(flag_ptr, EPOCH):
    """Whether a flag is set for this launch (what it guards then reads with .cg loads)."""
    return tl.atomic_add(flag_ptr, 0, sem="acquire", scope="gpu") == EPOCH


@triton.jit
def _join_halves(acc, part_ptr, ticket_ptr, split, half, EPOCH,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(acc, finish) of a split tile's half: each stores its fp32 partial [BM, BN] and takes a
    ticket; the second to arrive adds the other's partial (a + b == b + a: the same bits
    whichever it is) and finishes the tile."""
    rr = tl.arange(0, BLOCK_M)
    cc = tl.arange(0, BLOCK_N)
    part = part_ptr + split.to(tl.int64) * (2 * BLOCK_M * BLOCK_N)
    tl.store(part + half * (BLOCK_M * BLOCK_N) + rr[:, None] * BLOCK_N + cc[None, :], acc)
    tl.debug_barrier()
    finish = tl.atomic_xchg(ticket_ptr, EPOCH, sem="acq_rel", scope="gpu") == EPOCH
    if finish:
        # .cg: from L2, never a stale line of this SM's L1.
        acc += tl.load(part + (1 - half) * (BLOCK_M * BLOCK_N) + rr[:, None] * BLOCK_N
                       + cc[None, :], cache_modifier=".cg")
    return acc, finish


@triton.jit
def _mor_gemm(
    acc,  # [BM, BN] fp32 accumulator
    a_ptr, b_ptr, rows64, row_ok, cols, col_ok, lo, hi,
    stride_am, stride_ar, stride_br, stride_bn,
    DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc + A B of one tile over the reduction in [lo, hi): the forward's x W^T (A = x,
    B[k, o] = W[o, k]) or the backward's dy W (A = dy, B = W); all of it, or a split tile's
    half."""
    for r0 in range(lo, hi, BLOCK_K):
        rs = r0 + tl.arange(0, BLOCK_K)
        r_ok = rs < hi
        a = tl.load(a_ptr + rows64[:, None] * stride_am + rs[None, :] * stride_ar,
                    mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # [BM, BK]
        b = tl.load(b_ptr + rs[:, None] * stride_br + cols[None, :] * stride_bn,
                    mask=r_ok[:, None] & col_ok[None, :], other=0.0)  # [BK, BN]
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _mor_shrink(
    x_ptr, a_ptr, rw_ptr, rows64, row_ok, g, K,
    stride_xm, stride_xk, stride_am, stride_ak, stride_rm, stride_rk,
    R: tl.constexpr, L: tl.constexpr, ROUTER: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """([BM, BR], [BM, BL]) fp32: the shrink of one row block and group over all of K,
    u = x A_g^T and, with ROUTER, l = x R_g^T from the same x tiles (else zeros)."""
    cr = tl.arange(0, BLOCK_R)
    r_ok = cr < R
    cl = tl.arange(0, BLOCK_L)
    l_ok = cl < L
    acc_u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc_l = tl.zeros((BLOCK_M, BLOCK_L), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        a = tl.load(a_ptr + (g * R + cr)[None, :] * stride_am + ks[:, None] * stride_ak,
                    mask=k_ok[:, None] & r_ok[None, :], other=0.0)  # [BK, BR]
        acc_u = tl.dot(x, a, acc_u, input_precision=DOT_PRECISION)
        if ROUTER:
            rw = tl.load(rw_ptr + (g * L + cl)[None, :] * stride_rm + ks[:, None] * stride_rk,
                         mask=k_ok[:, None] & l_ok[None, :], other=0.0)  # [BK, BL]
            acc_l = tl.dot(x, rw, acc_l, input_precision=DOT_PRECISION)

    return acc_u, acc_l


@triton.jit
def _mor_fwd_z(
    x_ptr, a_ptr, rw_ptr, rb_ptr, col_logit_ptr, col_scale_ptr, p_ptr, u_ptr, z_ptr,
    rows64, row_ok, g, K,
    stride_xm, stride_xk, stride_am, stride_ak, stride_rm, stride_rk, stride_pm, stride_pl,
    stride_um, stride_zm,
    R: tl.constexpr, L: tl.constexpr, ROUTER: tl.constexpr, HAS_ROUTER_BIAS: tl.constexpr,
    STORE: tl.constexpr, STORE_U: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """z = (x A_g^T) * coef of one row block and group, [BM, BR] in the input dtype: the shrink
    u = x A_g^T and l = x R_g^T over all of K, the fp32 softmax of l + c, p_k * s_k per rank
    column. STORE: also store p (u with STORE_U, for the backward) and z (for the other
    tiles of these rows)."""
    cr = tl.arange(0, BLOCK_R)
    r_ok = cr < R
    cl = tl.arange(0, BLOCK_L)
    l_ok = cl < L
    acc_u, acc_l = _mor_shrink(x_ptr, a_ptr, rw_ptr, rows64, row_ok, g, K, stride_xm, stride_xk,
                               stride_am, stride_ak, stride_rm, stride_rk, R, L, ROUTER,
                               DOT_PRECISION, BLOCK_M, BLOCK_K, BLOCK_R, BLOCK_L)
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
        if STORE:
            tl.store(p_ptr + rows64[:, None] * stride_pm + (g * L + cl)[None, :] * stride_pl,
                     p, mask=row_ok[:, None] & l_ok[None, :])
    if STORE_U:  # kept for backward, which then skips its shrink over all of K
        tl.store(u_ptr + rows64[:, None] * stride_um + (g * R + cr)[None, :], acc_u,
                 mask=row_ok[:, None] & r_ok[None, :])
    coef = _mor_branch_coef(p, col_logit, col_scale, L, ROUTER, BLOCK_M, BLOCK_R, BLOCK_L)
    z = (acc_u * coef).to(x_ptr.dtype.element_ty)  # [BM, BR], rounded like the torch backend
    if STORE:
        tl.store(z_ptr + rows64[:, None] * stride_zm + (g * BLOCK_R + cr)[None, :], z,
                 mask=row_ok[:, None])
    return z


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


# EPOCH changes every launch: not specialised (a value of 1, or one divisible by 16, would
# otherwise compile a variant of its own on first sight, mid-run).
@triton.jit(do_not_specialize=["EPOCH"])
def _mor_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, rw_ptr, rb_ptr, b_ptr, col_logit_ptr, col_scale_ptr,
    y_ptr, p_ptr, u_ptr, z_ptr, part_ptr, flag_ptr,
    N, K, OG, G, TILES_PER_GROUP, GROUP_M, SPLIT_TILES, K_SPLIT, EPOCH,
    stride_xm, stride_xk, stride_wo, stride_wk, stride_am, stride_ak, stride_rm, stride_rk,
    stride_ym, stride_yo, stride_pm, stride_pl, stride_um, stride_zm,
    R: tl.constexpr, L: tl.constexpr,
    HAS_BIAS: tl.constexpr, ROUTER: tl.constexpr, HAS_ROUTER_BIAS: tl.constexpr,
    STORE_U: tl.constexpr, SHARE_Z: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    num_m = tl.cdiv(N, BLOCK_M)
    tile_id, half, pid_m, pid_n, k_lo, k_hi, split = _program_tile(
        num_m, G * TILES_PER_GROUP, GROUP_M, SPLIT_TILES, K_SPLIT, K)
    g = pid_n // TILES_PER_GROUP
    tile = pid_n % TILES_PER_GROUP

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)  # N * stride can exceed 2**31
    cols_g = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # column inside group g
    col_ok = cols_g < OG
    cols = g * OG + cols_g
    cr = tl.arange(0, BLOCK_R)
    unit = pid_m * G + g  # the (row block, group) whose z this tile needs

    # The group's first tile computes z for all the group's tiles of these rows and publishes
    # it before its own GEMM, so that the other tiles, launched with or after it, find it done
    # when they need it, after theirs.
    publisher = (tile == 0) & (half != 1)
    z = tl.zeros((BLOCK_M, BLOCK_R), dtype=x_ptr.dtype.element_ty)
    if publisher:
        z = _mor_fwd_z(
            x_ptr, a_ptr, rw_ptr, rb_ptr, col_logit_ptr, col_scale_ptr, p_ptr, u_ptr, z_ptr,
            rows64, row_ok, g, K, stride_xm, stride_xk, stride_am, stride_ak, stride_rm,
            stride_rk, stride_pm, stride_pl, stride_um, stride_zm,
            R, L, ROUTER, HAS_ROUTER_BIAS, True, STORE_U, DOT_PRECISION,
            BLOCK_M, BLOCK_K, BLOCK_R, BLOCK_L)
        if SHARE_Z:
            _publish(flag_ptr + unit, EPOCH)

    acc = _mor_gemm(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), x_ptr, w_ptr, rows64,
                    row_ok, cols, col_ok, k_lo, k_hi, stride_xm, stride_xk, stride_wk,
                    stride_wo, DOT_PRECISION, BLOCK_K)
    finish = tile_id >= 0
    if half >= 0:
        acc, finish = _join_halves(acc, part_ptr, flag_ptr + num_m * G + split, split, half,
                                   EPOCH, BLOCK_M, BLOCK_N)
    if finish:
        if not publisher:
            done = tile_id < 0
            if SHARE_Z:
                done = _published(flag_ptr + unit, EPOCH)
            if done:
                z = tl.load(z_ptr + rows64[:, None] * stride_zm + (g * BLOCK_R + cr)[None, :],
                            mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
            else:  # not published yet: the same computation here, so the same bits
                z = _mor_fwd_z(
                    x_ptr, a_ptr, rw_ptr, rb_ptr, col_logit_ptr, col_scale_ptr, p_ptr, u_ptr,
                    z_ptr, rows64, row_ok, g, K, stride_xm, stride_xk, stride_am, stride_ak,
                    stride_rm, stride_rk, stride_pm, stride_pl, stride_um, stride_zm,
                    R, L, ROUTER, HAS_ROUTER_BIAS, False, False, DOT_PRECISION,
                    BLOCK_M, BLOCK_K, BLOCK_R, BLOCK_L)
        _mor_fwd_store_tile(acc, z, b_ptr, bias_ptr, y_ptr, rows64, row_ok, cols, col_ok,
                            stride_ym, stride_yo, R, HAS_BIAS, DOT_PRECISION, BLOCK_R)


@triton.jit
def _mor_bwd_row_grads(
    x_ptr, dy_ptr, p_ptr, u_ptr, a_ptr, b_ptr, col_logit_ptr, col_scale_ptr, dc_ptr, grad_ptr,
    rows64, row_ok, K, OG, O_TILES, slot,
    stride_xm, stride_xk, stride_dym, stride_dyo, stride_pm, stride_pl, stride_um,
    stride_am, stride_ak, stride_dc_slot,
    G: tl.constexpr, R: tl.constexpr, L: tl.constexpr, ROUTER: tl.constexpr,
    HAS_U: tl.constexpr, STORE_DC: tl.constexpr, USE_ATOMICS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """What every dx tile of a row block needs, per group, stored in the row block's rows of
    the scratch (du | dl | z, in the input dtype): u = x A_g^T (the forward's, or over all of
    K), z = u * coef, g = dy B_g over the group's dy columns, du = g * coef and the fp32
    softmax backward dl; with STORE_DC also the row block's dc = sum of dl into its slot."""
    cr = tl.arange(0, BLOCK_R)
    r_ok = cr < R
    cl = tl.arange(0, BLOCK_L)
    l_ok = cl < L
    col_logit = tl.load(col_logit_ptr + cr, mask=r_ok, other=-1)  # [BR]
    col_scale = tl.load(col_scale_ptr + cr, mask=r_ok, other=0.0)  # [BR]
    dtype = x_ptr.dtype.element_ty
    grad_rows = rows64 * (G * (2 * BLOCK_R + BLOCK_L))
    # Unrolled (G is 1 or 3 in practice); nothing else is live here, so it costs no spills.
    for grp in tl.static_range(G):
        if HAS_U:  # u as the forward computed it (fp32), when it fits the memory contract
            acc_u = tl.load(u_ptr + rows64[:, None] * stride_um + (grp * R + cr)[None, :],
                            mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # [BM, BR]
        else:  # over all of K, as the forward's shrink (without the router's columns)
            acc_u, _ = _mor_shrink(x_ptr, a_ptr, a_ptr, rows64, row_ok, grp, K, stride_xm,
                                   stride_xk, stride_am, stride_ak, 0, 0, R, L, False,
                                   DOT_PRECISION, BLOCK_M, BLOCK_K, BLOCK_R, BLOCK_L)
        # Rows past N and padded columns load p = 0, so they contribute nothing below.
        p = tl.load(p_ptr + rows64[:, None] * stride_pm + (grp * L + cl)[None, :] * stride_pl,
                    mask=row_ok[:, None] & l_ok[None, :], other=0.0)  # [BM, BL] fp32
        coef = _mor_branch_coef(p, col_logit, col_scale, L, ROUTER, BLOCK_M, BLOCK_R, BLOCK_L)
        acc_g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for t in range(0, O_TILES):
            o_loc = t * BLOCK_K + tl.arange(0, BLOCK_K)
            o_ok = o_loc < OG
            os_ = grp * OG + o_loc
            dy = tl.load(dy_ptr + rows64[:, None] * stride_dym + os_[None, :] * stride_dyo,
                         mask=row_ok[:, None] & o_ok[None, :], other=0.0)  # [BM, BK]
            # lora_b contiguous [O, R]: the constexpr row stride R tells the compiler its
            # rows are 4-byte aligned, enough for asynchronous copies (pipelined loop).
            b = tl.load(b_ptr + os_[:, None] * R + cr[None, :],
                        mask=o_ok[:, None] & r_ok[None, :], other=0.0)  # [BK, BR]
            acc_g = tl.dot(dy, b, acc_g, input_precision=DOT_PRECISION)
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
            if STORE_DC:
                dc_ptrs = dc_ptr + slot * stride_dc_slot + grp * L + cl
                if USE_ATOMICS:
                    tl.atomic_add(dc_ptrs, tl.sum(dl, axis=0), mask=l_ok, sem="relaxed")
                else:
                    tl.store(dc_ptrs, tl.sum(dl, axis=0), mask=l_ok)
            dl_c = dl.to(dtype)
        z = (acc_u * coef).to(dtype)  # the forward's z, for dB = dy^T z
        row = grad_ptr + grad_rows[:, None] + grp * (2 * BLOCK_R + BLOCK_L)
        tl.store(row + cr[None, :], du, mask=row_ok[:, None])
        tl.store(row + BLOCK_R + cl[None, :], dl_c, mask=row_ok[:, None])
        tl.store(row + BLOCK_R + BLOCK_L + cr[None, :], z, mask=row_ok[:, None])


@triton.jit
def _slot_out(ptrs, val, mask, partner_step, mode, USE_ATOMICS: tl.constexpr):
    """Write a tile's fp32 partial sums into its row-block pair's head slot (mode 0), add them
    to what the pair's other row block stored there (mode 1), or store them in the partner's
    own slot, `partner_step` further (mode 2: the other one's were not stored yet); atomic
    mode adds into the one slot."""
    if USE_ATOMICS:
        tl.atomic_add(ptrs, val, mask=mask, sem="relaxed")
    else:
        if mode == 1:
            # A separate fp32 add of the finished partial, inside this branch: written without
            # the branch, the compiler may fold it into the dot's accumulator, which rounds
            # differently, and mode 1 would no longer give mode 2's bits.
            val += tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(ptrs + (mode == 2).to(tl.int64) * partner_step, val, mask=mask)


@triton.jit
def _mor_bwd_lora_tile(
    acc,  # [BM, BN] fp32 dx tile
    du, dl_c,  # [BM, BR], [BM, BL] in the input dtype: group grp's du and dl of these rows
    x_ptr, a_ptr, rw_ptr, dar_ptr, rows64, row_ok, cols, col_ok, grp, K, slot, mode,
    partner_step,
    stride_xm, stride_xk, stride_am, stride_ak, stride_rm, stride_rk, stride_dar_slot,
    G: tl.constexpr, R: tl.constexpr, L: tl.constexpr, ROUTER: tl.constexpr,
    COMPUTE_DX: tl.constexpr, USE_ATOMICS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Group grp's share of one dx tile: the K-extension [du | dl] [A_grp; R_grp] into acc,
    and this tile's partial sums dA_grp = du^T x, dR_grp = dl^T x into slot `slot` as `mode`
    says (`_slot_out`)."""
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
    _slot_out(da_ptrs, da, r_ok[:, None] & col_ok[None, :], partner_step, mode, USE_ATOMICS)
    if ROUTER:
        if COMPUTE_DX:
            rw_cols = tl.load(rw_ptr + (grp * L + cl)[:, None] * stride_rm
                              + cols[None, :] * stride_rk,
                              mask=l_ok[:, None] & col_ok[None, :], other=0.0)  # [BL, BN]
            acc = tl.dot(dl_c, rw_cols, acc, input_precision=DOT_PRECISION)
        dr = tl.dot(tl.trans(dl_c), x_tile, input_precision=DOT_PRECISION)  # [BL, BN] fp32
        dr_ptrs = (dar_ptr + slot * stride_dar_slot + (G * R + grp * L + cl)[:, None] * K
                   + cols[None, :])
        _slot_out(dr_ptrs, dr, l_ok[:, None] & col_ok[None, :], partner_step, mode,
                  USE_ATOMICS)
    return acc


# EPOCH changes every launch: not specialised (a value of 1, or one divisible by 16, would
# otherwise compile a variant of its own on first sight, mid-run).
@triton.jit(do_not_specialize=["EPOCH"])
def _mor_bwd_kernel(
    x_ptr, dy_ptr, p_ptr, u_ptr, w_ptr, a_ptr, rw_ptr, b_ptr, col_logit_ptr, col_scale_ptr,
    dx_ptr, dar_ptr, db_ptr, dc_ptr, grad_ptr, part_ptr, flag_ptr,
    N, K, O, OG, NUM_N_TILES, O_TILES, GROUP_M, SPLIT_TILES, O_SPLIT, EPOCH,
    stride_xm, stride_xk, stride_dym, stride_dyo, stride_pm, stride_pl, stride_um,
    stride_wo, stride_wk,
    stride_am, stride_ak, stride_rm, stride_rk, stride_dxm, stride_dxk,
    stride_dar_slot, stride_db_slot, stride_dc_slot,
    G: tl.constexpr, R: tl.constexpr, L: tl.constexpr, ROUTER: tl.constexpr,
    HAS_U: tl.constexpr, COMPUTE_DX: tl.constexpr,
    USE_ATOMICS: tl.constexpr, SHARE_Z: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    num_m = tl.cdiv(N, BLOCK_M)
    tile_id, half, pid_m, pid_n, o_lo, o_hi, split = _program_tile(
        num_m, NUM_N_TILES, GROUP_M, SPLIT_TILES, O_SPLIT, O)  # pid_n: the dx column tile

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)  # N * stride can exceed 2**31
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # dx columns, i.e. over K
    col_ok = cols < K
    cr = tl.arange(0, BLOCK_R)
    r_ok = cr < R
    cl = tl.arange(0, BLOCK_L)
    dtype = x_ptr.dtype.element_ty
    # This row block's fp32 slot of the reduction buffers (all slots alias one in atomic mode),
    # and its pair's head (row blocks m and m + GROUP_M, m in an even sweep): see below.
    slot = pid_m.to(tl.int64)
    partner = tl.where((pid_m // GROUP_M) % 2 == 0, pid_m + GROUP_M, pid_m - GROUP_M)
    paired = (partner < num_m) & (not USE_ATOMICS)
    head = tl.where(paired, tl.minimum(pid_m, partner), pid_m).to(tl.int64)
    grad_rows = rows64 * (G * (2 * BLOCK_R + BLOCK_L))

    # The row block's first tile computes du | dl | z of every group for all its tiles and
    # publishes them before its own dgrad loop (as the forward's z); the others look after
    # theirs.
    publisher = (pid_n == 0) & (half != 1)
    if publisher:
        _mor_bwd_row_grads(
            x_ptr, dy_ptr, p_ptr, u_ptr, a_ptr, b_ptr, col_logit_ptr, col_scale_ptr, dc_ptr,
            grad_ptr, rows64, row_ok, K, OG, O_TILES, slot, stride_xm, stride_xk, stride_dym,
            stride_dyo, stride_pm, stride_pl, stride_um, stride_am, stride_ak, stride_dc_slot,
            G, R, L, ROUTER, HAS_U, True, USE_ATOMICS, DOT_PRECISION, BLOCK_M, BLOCK_K,
            BLOCK_R, BLOCK_L)
        if SHARE_Z:
            _publish(flag_ptr + pid_m, EPOCH)
        else:
            tl.debug_barrier()  # its own stores, read below by its other threads

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if COMPUTE_DX:
        acc = _mor_gemm(acc, dy_ptr, w_ptr, rows64, row_ok, cols, col_ok, o_lo, o_hi,
                        stride_dym, stride_dyo, stride_wo, stride_wk, DOT_PRECISION, BLOCK_K)
    finish = tile_id >= 0
    if half >= 0:
        acc, finish = _join_halves(acc, part_ptr, flag_ptr + num_m + split, split, half, EPOCH,
                                   BLOCK_M, BLOCK_N)
    if finish:
        if not publisher:
            seen = tile_id < 0
            if SHARE_Z:
                seen = _published(flag_ptr + pid_m, EPOCH)
            if not seen:
                # Not published yet: the same computation (same bits) into the same rows, a
                # harmless second write of what the first tile stores.
                _mor_bwd_row_grads(
                    x_ptr, dy_ptr, p_ptr, u_ptr, a_ptr, b_ptr, col_logit_ptr, col_scale_ptr,
                    dc_ptr, grad_ptr, rows64, row_ok, K, OG, O_TILES, slot, stride_xm,
                    stride_xk, stride_dym, stride_dyo, stride_pm, stride_pl, stride_um,
                    stride_am, stride_ak, stride_dc_slot, G, R, L, ROUTER, HAS_U, False,
                    USE_ATOMICS, DOT_PRECISION, BLOCK_M, BLOCK_K, BLOCK_R, BLOCK_L)
                tl.debug_barrier()  # this program's own stores, read by its other threads
        # Row blocks one sweep apart share a slot (deterministic mode): for each column tile,
        # the first to get here stores its partial sums in the head slot; the second adds its
        # own to them there if they are stored already (mode 1), else stores its own in its
        # slot (mode 2) and marks it, and the slot sum adds head + partner. Either way the
        # pair's sum is a + b of the same two partials: the same bits, half the slots to sum.
        # A sweep apart, the second comes about a round of programs after the first.
        mode = tile_id * 0
        pair_flags = flag_ptr + num_m + SPLIT_TILES + 3 * (head * NUM_N_TILES + pid_n)
        if paired:
            if tl.atomic_xchg(pair_flags, EPOCH, sem="acq_rel", scope="gpu") == EPOCH:
                mode = 2
                if SHARE_Z:
                    if _published(pair_flags + 1, EPOCH):
                        mode = 1
        for grp in range(G):  # a runtime loop: unrolled next to the dgrad acc, G = 3 spills
            row = grad_ptr + grad_rows[:, None] + grp * (2 * BLOCK_R + BLOCK_L)
            du = tl.load(row + cr[None, :], mask=row_ok[:, None], other=0.0,
                         cache_modifier=".cg")  # [BM, BR]
            dl_c = tl.load(row + BLOCK_R + cl[None, :], mask=row_ok[:, None], other=0.0,
                           cache_modifier=".cg")  # [BM, BL]
            acc = _mor_bwd_lora_tile(
                acc, du, dl_c, x_ptr, a_ptr, rw_ptr, dar_ptr, rows64, row_ok, cols, col_ok,
                grp, K, head, mode, GROUP_M * stride_dar_slot, stride_xm, stride_xk, stride_am,
                stride_ak, stride_rm, stride_rk, stride_dar_slot, G, R, L, ROUTER, COMPUTE_DX,
                USE_ATOMICS, DOT_PRECISION, BLOCK_R, BLOCK_L)
            # dB_grp = dy^T z: every dx tile of the row block takes every NUM_N_TILES-th dy
            # tile of the group (re-read from L2), so this block's share is computed once.
            z = tl.load(row + BLOCK_R + BLOCK_L + cr[None, :], mask=row_ok[:, None],
                        other=0.0, cache_modifier=".cg")  # [BM, BR]
            first = (pid_n + NUM_N_TILES - (grp * O_TILES) % NUM_N_TILES) % NUM_N_TILES
            for t in range(first, O_TILES, NUM_N_TILES):
                o_loc = t * BLOCK_K + tl.arange(0, BLOCK_K)
                o_ok = o_loc < OG
                os_ = grp * OG + o_loc
                dy = tl.load(dy_ptr + rows64[:, None] * stride_dym + os_[None, :] * stride_dyo,
                             mask=row_ok[:, None] & o_ok[None, :], other=0.0)  # [BM, BK]
                db = tl.dot(tl.trans(dy), z, input_precision=DOT_PRECISION)  # [BK, BR] fp32
                db_ptrs = db_ptr + head * stride_db_slot + os_[:, None] * R + cr[None, :]
                _slot_out(db_ptrs, db, o_ok[:, None] & r_ok[None, :], GROUP_M * stride_db_slot,
                          mode, USE_ATOMICS)
        if paired:
            if mode == 0:
                if SHARE_Z:
                    _publish(pair_flags + 1, EPOCH)  # stored: the second may add to them
            if mode == 2:
                _publish(pair_flags + 2, EPOCH)  # the slot sum adds the partner's slot
        if COMPUTE_DX:
            tl.store(dx_ptr + rows64[:, None] * stride_dxm + cols[None, :] * stride_dxk,
                     acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["EPOCH"])
def _mor_slot_sum_kernel(
    buf_ptr, da_ptr, dr_ptr, db_ptr, dc_ptr, mark_ptr,
    SLOTS, N_A, N_R, N_B, N_C, stride_slot, K, OG, O_TILES, NUM_N_TILES, GROUP_M, EPOCH,
    R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr,
):
    # The backward's fp32 slots [SLOTS, N_A + N_R + N_B + N_C] (dA | dR | dB | dc, flattened)
    # summed in a fixed order (bitwise reproducible), then each gradient written in its own
    # dtype: one launch where separate sums and casts took seven. Slots come in row-block
    # pairs one sweep apart: the head holds the pair's sum, or its first partial where the
    # column tile's mark says the second is in the partner's slot (always for dc, which the
    # pairing leaves alone).
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    total = N_A + N_R + N_B + N_C
    ok = cols < total
    # The dx column tile each column's partial sums came from (its mark's index in a pair).
    is_dar = cols < N_A + N_R
    is_dc = cols >= N_A + N_R + N_B
    o = (cols - N_A - N_R) // R
    dy_tile = (o // tl.maximum(OG, 1)) * O_TILES + (o % tl.maximum(OG, 1)) // BLOCK_K
    tile = tl.where(is_dar, (cols % tl.maximum(K, 1)) // BLOCK_N, dy_tile % NUM_N_TILES)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for first in range(0, SLOTS, 2 * GROUP_M):  # the even sweeps' first row blocks
        for pos in range(0, GROUP_M):
            head = first + pos
            partner_ok = ok & (head + GROUP_M < SLOTS)
            pair = tl.load(buf_ptr + head * stride_slot + cols, mask=ok & (head < SLOTS),
                           other=0.0)
            mark = tl.load(mark_ptr + 3 * (head * NUM_N_TILES + tile),
                           mask=partner_ok & ~is_dc, other=0)
            pair += tl.load(buf_ptr + (head + GROUP_M) * stride_slot + cols,
                            mask=partner_ok & (is_dc | (mark == EPOCH)), other=0.0)
            acc += pair
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


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _half_point(size: int, block: int) -> int | None:
    """Where a split tile's halves divide a reduction of `size` in steps of `block`: after half
    its steps (so strictly inside it), or None where it has fewer than two steps to divide."""
    steps = triton.cdiv(size, block)
    return triton.cdiv(steps, 2) * block if steps >= 2 else None


def _slots(device: torch.device, cfg: KernelConfig) -> int | None:
    """Programs of `cfg` the GPU runs at once (None in the interpreter)."""
    sms = multiprocessor_count(device)
    return sms * cfg.programs_per_sm if sms is not None else None


def fwd_z_cost(cfg: KernelConfig, R: int, L: int, router: bool) -> float:
    """What computing z adds to a forward program, in tiles' worth: the shrink's rank (and
    router) columns over K next to a tile's BLOCK_N."""
    return (_pad(R) + (_pad(L) if router else 0)) / cfg.block_n


def bwd_row_cost(cfg: KernelConfig, R: int, G: int, k: int, o: int, has_u: bool) -> float:
    """What computing a row block's du | dl | z adds to a backward program, in tiles' worth:
    g = dy B_g over each group's O/G columns (and, without the forward's u, u = x A_g^T over
    K per group) next to a tile's dgrad, dy W over O into BLOCK_N columns."""
    per_row = _pad(R) * o + (0 if has_u else G * _pad(R) * k)
    return per_row / (cfg.block_n * max(o, 1))


def forward(x, weight, bias, lora_a, lora_b, router_weight, router_bias, spec: MoRSpec,
            keep_u: bool = False):
    """-> (y, probs), or (y, probs, u) with keep_u: u [N, G*r] fp32, for `backward`."""
    _check_dtype(x)
    n, k = x.shape
    o = weight.shape[0]
    G, R, L = spec.groups, spec.rank, spec.num_logits
    dev = x.device
    y = _alloc((n, o), x.dtype, dev)
    probs = _alloc((n, G * L), torch.float32, dev)
    u = _alloc((n, G * R), torch.float32, dev) if keep_u else None
    if n == 0:
        return (y, probs, u) if keep_u else (y, probs)
    og = o // G
    cfg = _config("fwd", x)
    # At least one tile per group, so that probs are written even with no output columns.
    tiles = max(1, triton.cdiv(og, cfg.block_n))
    units = triton.cdiv(n, cfg.block_m) * G  # (row block, group) pairs, each with one z
    k_split = _half_point(k, cfg.block_k)
    group_m, split = launch_order(triton.cdiv(n, cfg.block_m), G, tiles,
                                  _slots(dev, cfg) if k_split else None,
                                  fwd_z_cost(cfg, R, L, spec.router), cfg.group_m)
    z = _alloc((n, G * _pad(R)), x.dtype, dev)  # each unit's z, for its group's other tiles
    partials = _alloc((max(1, split), 2, cfg.block_m, cfg.block_n), torch.float32, dev)
    col_logit, col_scale = _branch_table(spec, dev)
    rw = router_weight if router_weight is not None else lora_a  # placeholders are never read
    b = lora_b.contiguous()  # the kernels index it with row stride R (a no-op for a parameter)
    # Triton launches on the current device's stream: make it x's (the flags follow it too).
    with _device_guard(dev), launch_flags.reserved(dev, units + split) as (flag_buf, epoch):
        _mor_fwd_kernel[(units * tiles + split,)](
            x, weight, bias if bias is not None else x, lora_a, rw,
            router_bias if router_bias is not None else x, b, col_logit, col_scale, y, probs,
            u if keep_u else probs, z, partials, flag_buf,
            n, k, og, G, tiles, group_m, split, k_split or 0, epoch,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            lora_a.stride(0), lora_a.stride(1), rw.stride(0), rw.stride(1),
            y.stride(0), y.stride(1),
            probs.stride(0), probs.stride(1), u.stride(0) if keep_u else 0, z.stride(0),
            R=R, L=L, HAS_BIAS=bias is not None, ROUTER=spec.router,
            HAS_ROUTER_BIAS=router_bias is not None, STORE_U=keep_u, SHARE_Z=SHARE_Z,
            DOT_PRECISION=_dot_precision(x),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            BLOCK_R=_pad(R), BLOCK_L=_pad(L),
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
    # The tiles' dgrad is what a split halves: without dx there is nothing to split.
    o_split = _half_point(o, cfg.block_k) if compute_dx else None
    group_m, split = launch_order(blocks, 1, n_tiles, _slots(dev, cfg) if o_split else None,
                                  bwd_row_cost(cfg, R, G, k, o, u is not None), cfg.group_m)
    col_logit, col_scale = _branch_table(spec, dev)
    dx = _alloc((n, k) if compute_dx else (0, k), dtype, dev)
    n_a, n_r, n_b, n_c = G * R * k, G * L * k, o * R, G * L
    slots = _reduction_buffer(blocks, n_a + n_r + n_b + n_c, dev)
    dar_buf, db_buf, dc_buf = slots[:, : n_a + n_r], slots[:, n_a + n_r : -n_c or None], \
        slots[:, slots.shape[1] - n_c :]
    rw = router_weight if router_weight is not None else lora_a  # never read without router
    slot_stride = slots.stride(0) if DETERMINISTIC else 0
    # du | dl | z of each row, per group, for the row block's other tiles.
    scratch = _alloc((n, G * (2 * _pad(R) + _pad(L))), dtype, dev)
    partials = _alloc((max(1, split), 2, cfg.block_m, cfg.block_n), torch.float32, dev)
    # Separate tensors (op outputs must not alias each other), written by one launch.
    d_lora_a = _alloc(lora_a.shape, dtype, dev)
    d_router_weight = _alloc((G * L, k), dtype, dev)
    d_lora_b = _alloc(lora_b.shape, dtype, dev)
    d_router_bias = _alloc((G * L,), dtype, dev)
    outs = [t if t.numel() else slots for t in (d_lora_a, d_router_weight, d_lora_b,
                                                 d_router_bias)]  # empty: a placeholder
    # Flags: the row blocks', the split tiles' tickets, then per pair head (indexed by row
    # block) and dx column tile a ticket, a "stored" and a mark (deterministic mode).
    pairs = blocks * n_tiles if DETERMINISTIC else 0
    # Triton launches on the current device's stream: make it x's (the flags follow it too).
    with _device_guard(dev), launch_flags.reserved(dev, blocks + split + 3 * pairs) as (
            flag_buf, epoch):
        _mor_bwd_kernel[(blocks * n_tiles + split,)](
            x, dy, probs, u if u is not None else probs, weight, lora_a, rw, lora_b.contiguous(),
            col_logit, col_scale, dx if compute_dx else x, dar_buf, db_buf, dc_buf, scratch,
            partials, flag_buf,
            n, k, o, og, n_tiles, triton.cdiv(og, cfg.block_k), group_m, split, o_split or 0,
            epoch,
            x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), probs.stride(0), probs.stride(1),
            u.stride(0) if u is not None else 0,
            weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1),
            rw.stride(0), rw.stride(1),
            dx.stride(0) if compute_dx else 0, dx.stride(1) if compute_dx else 0,
            slot_stride, slot_stride, slot_stride,
            G=G, R=R, L=L, ROUTER=spec.router, HAS_U=u is not None, COMPUTE_DX=compute_dx,
            USE_ATOMICS=not DETERMINISTIC, SHARE_Z=SHARE_Z,
            DOT_PRECISION=_dot_precision(x),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            BLOCK_R=_pad(R), BLOCK_L=_pad(L),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        # The slot sum reads the kernel's marks: the flags stay reserved until it is enqueued.
        # Narrow programs: the sum reads 5.4 MB of slots at ViT-B proj, N = 12608, which 24
        # programs of 1024 columns would pull through 24 SMs; 256 columns make 97 there.
        block = 256
        _mor_slot_sum_kernel[(triton.cdiv(slots.shape[1], block),)](
            slots, *outs, flag_buf[blocks + split + 2:], slots.shape[0], n_a, n_r, n_b, n_c,
            slots.stride(0), k, og, triton.cdiv(og, cfg.block_k), n_tiles, group_m, epoch,
            R=max(R, 1), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK=block, num_warps=2,
        )
    return dx, d_lora_a, d_lora_b, d_router_weight, d_router_bias
