"""The "triton" backend: fused MoR forward and backward kernels (docs/MOR_MATH.md), Liger style.

Same contract as `torch_mor` (forward / backward). Two kernels:

`_mor_fwd_kernel` (one pass over x). A tile is BLOCK_M tokens x BLOCK_N output columns of
    ONE group g (tiles never straddle groups: the grid is rows x groups x tiles per group, a
    group's last tile is masked at its edge). Its K loop accumulates the base GEMM x W^T and the
    shrink of group g, u = x A_g^T and l = x R_g^T (rank and router columns padded to 16 for
    tl.dot), from the same x tile. Epilogue: fp32 softmax of l + c, p_k * s_k per rank column,
    z = u * coef, the rank-r expand z B_g^T into the same accumulator, bias, one store of y.
    The tile of a group's first columns also stores p. Every column tile recomputes the shrink
    of its rows: 2 * BLOCK_M * K * (BLOCK_R + BLOCK_L) extra MMA work per tile (12.5 % of a
    128 x 256 tile for r + L <= 32). The two-kernel form (a shrink kernel, then the GEMM with z
    as a K-extension) would save that work but reads x once more from HBM, about a third of the
    base GEMM's time at ViT-B widths where that GEMM is close to memory bound; it is not used.
`_mor_bwd_kernel` (one pass over dy; W frozen, no dW). A tile is BLOCK_M tokens x BLOCK_N
    columns of dx. Per group: u = x A_g^T as the forward stored it (fp32, when u and p fit the
    op's 32 values per token: one group; this saves every column tile a shrink over all of K,
    half the dgrad GEMM's MMA work for fc2 at K = 3072), else recomputed over all K (qkv; the x
    rows are shared by the row block's column tiles, so they come mostly from L2), and
    z = u * coef; then one loop over the group's dy columns accumulates both the dgrad GEMM
    dy W and g = dy B_g from the same dy tile. Epilogue per group: du, the fp32 softmax
    backward dl, the K-extension [du | dl] [A_g; R_g] of dx, and this tile's share of the
    weight gradients from the x tile of the same (rows, columns): dA_g = du^T x, dR_g = dl^T x;
    dB_g = dy^T z is split over the row block's column tiles (each takes every NUM_N_TILES-th
    dy tile of the group, re-read from L2), dc is summed by the first column tile. Nothing of
    size N x (r + L) goes through HBM. Each column tile redoes u and g, about
    2 * 16 / BLOCK_N extra MMA work over the dgrad GEMM, instead of a separate pass that
    would read x and dy again from HBM. Without dx (x needs no gradient) the dy W GEMM and the
    K-extension are compiled out.

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
lora_b: the launchers pass it padded to 16 (or 32) zero-filled rank columns, a small copy that
lets its tiles load asynchronously, so the loops that read it stay software-pipelined.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backends import cuda_capability
from ..spec import MoRSpec
from . import triton_interpreter_compat
from .device_constants import cached
from .triton_configs import launch_config

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
def _mor_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, rw_ptr, rb_ptr, b_ptr, col_logit_ptr, col_scale_ptr,
    y_ptr, p_ptr, u_ptr,
    N, K, OG, G, TILES_PER_GROUP,
    stride_xm, stride_xk, stride_wo, stride_wk, stride_am, stride_ak, stride_rm, stride_rk,
    stride_bo, stride_ym, stride_yo, stride_pm, stride_pl, stride_um,
    R: tl.constexpr, L: tl.constexpr,
    HAS_BIAS: tl.constexpr, ROUTER: tl.constexpr, HAS_ROUTER_BIAS: tl.constexpr,
    STORE_U: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M row blocks sweep all column tiles, so their x rows and the
    # W tiles stay in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BLOCK_M)
    num_n = G * TILES_PER_GROUP
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    g = pid_n // TILES_PER_GROUP
    tile = pid_n % TILES_PER_GROUP

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)  # N * stride can exceed 2**31
    cols_g = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # column inside group g
    col_ok = cols_g < OG
    cols = g * OG + cols_g
    cr = tl.arange(0, BLOCK_R)
    r_ok = cr < R
    cl = tl.arange(0, BLOCK_L)
    l_ok = cl < L

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc_l = tl.zeros((BLOCK_M, BLOCK_L), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        w = tl.load(w_ptr + cols[None, :] * stride_wo + ks[:, None] * stride_wk,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BK, BN]
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        a = tl.load(a_ptr + (g * R + cr)[None, :] * stride_am + ks[:, None] * stride_ak,
                    mask=k_ok[:, None] & r_ok[None, :], other=0.0)  # [BK, BR]
        acc_u = tl.dot(x, a, acc_u, input_precision=DOT_PRECISION)
        if ROUTER:
            rw = tl.load(rw_ptr + (g * L + cl)[None, :] * stride_rm + ks[:, None] * stride_rk,
                         mask=k_ok[:, None] & l_ok[None, :], other=0.0)  # [BK, BL]
            acc_l = tl.dot(x, rw, acc_l, input_precision=DOT_PRECISION)

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
        # The group's first column tile owns the probabilities of these rows.
        tl.store(p_ptr + rows64[:, None] * stride_pm + (g * L + cl)[None, :] * stride_pl, p,
                 mask=row_ok[:, None] & l_ok[None, :] & (tile == 0))
    if STORE_U:  # kept for backward, which then skips its shrink over all of K
        tl.store(u_ptr + rows64[:, None] * stride_um + (g * R + cr)[None, :], acc_u,
                 mask=row_ok[:, None] & r_ok[None, :] & (tile == 0))
    coef = _mor_branch_coef(p, col_logit, col_scale, L, ROUTER, BLOCK_M, BLOCK_R, BLOCK_L)
    z = (acc_u * coef).to(x_ptr.dtype.element_ty)  # [BM, BR], rounded like the torch backend
    # lora_b comes padded to BLOCK_R zero-filled columns (`_padded_expand`): no rank mask.
    bt = tl.load(b_ptr + cols[None, :] * stride_bo + cr[:, None],
                 mask=col_ok[None, :], other=0.0)  # [BR, BN]
    acc = tl.dot(z, bt, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_ym + cols[None, :] * stride_yo,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _mor_bwd_kernel(
    x_ptr, dy_ptr, p_ptr, u_ptr, w_ptr, a_ptr, rw_ptr, b_ptr, col_logit_ptr, col_scale_ptr,
    dx_ptr, dar_ptr, db_ptr, dc_ptr,
    N, K, OG, NUM_N_TILES, O_TILES,
    stride_xm, stride_xk, stride_dym, stride_dyo, stride_pm, stride_pl, stride_um,
    stride_wo, stride_wk,
    stride_am, stride_ak, stride_rm, stride_rk, stride_bo, stride_dxm, stride_dxk,
    stride_dar_slot, stride_db_slot, stride_dc_slot,
    G: tl.constexpr, R: tl.constexpr, L: tl.constexpr, ROUTER: tl.constexpr,
    HAS_U: tl.constexpr, COMPUTE_DX: tl.constexpr,
    USE_ATOMICS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BLOCK_M)
    width = GROUP_M * NUM_N_TILES
    first_m = (pid // width) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)  # N * stride can exceed 2**31
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # dx columns, i.e. over K
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

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Unrolled (G is 1 or 3 in practice): a runtime loop carrying acc spills more registers.
    for grp in tl.static_range(G):
        if HAS_U:  # u as the forward computed it (fp32), when it fits the memory contract
            acc_u = tl.load(u_ptr + rows64[:, None] * stride_um + (grp * R + cr)[None, :],
                            mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # [BM, BR]
        else:
            # u = x A_grp^T over all of K, recomputed; these x rows are read by all column
            # tiles of the row block at about the same time, so mostly from L2.
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

        # The group's dy columns: g = dy B_grp, and the dgrad GEMM dy W on the same tiles.
        acc_g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for t in range(0, O_TILES):
            o_loc = t * BLOCK_K + tl.arange(0, BLOCK_K)
            o_ok = o_loc < OG
            os_ = grp * OG + o_loc
            dy = tl.load(dy_ptr + rows64[:, None] * stride_dym + os_[None, :] * stride_dyo,
                         mask=row_ok[:, None] & o_ok[None, :], other=0.0)  # [BM, BK]
            # Padded, 16-byte-aligned rows (`_padded_expand`): loaded asynchronously, so the
            # loop stays pipelined (a synchronous load here made it wait for every MMA).
            b = tl.load(b_ptr + os_[:, None] * stride_bo + cr[None, :],
                        mask=o_ok[:, None], other=0.0)  # [BK, BR]
            acc_g = tl.dot(dy, b, acc_g, input_precision=DOT_PRECISION)
            if COMPUTE_DX:
                w = tl.load(w_ptr + os_[:, None] * stride_wo + cols[None, :] * stride_wk,
                            mask=o_ok[:, None] & col_ok[None, :], other=0.0)  # [BK, BN]
                acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)

        # dB_grp = dy^T z: every column tile of the row block takes every NUM_N_TILES-th dy
        # tile of the group (re-read from L2), so this block's share is computed exactly once
        # and the main loop above stays free of conditionals.
        first = (pid_n + NUM_N_TILES - (grp * O_TILES) % NUM_N_TILES) % NUM_N_TILES
        for t in range(first, O_TILES, NUM_N_TILES):
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

        # du, and the dx K-extension and dA_grp share of this tile: rounded to the input dtype
        # first, as the torch backend does.
        x_tile = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xk,
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # [BM, BN]
        du = (acc_g * coef).to(dtype)  # [BM, BR]
        if COMPUTE_DX:
            a_cols = tl.load(a_ptr + (grp * R + cr)[:, None] * stride_am
                             + cols[None, :] * stride_ak,
                             mask=r_ok[:, None] & col_ok[None, :], other=0.0)  # [BR, BN]
            acc = tl.dot(du, a_cols, acc, input_precision=DOT_PRECISION)
        da = tl.dot(tl.trans(du), x_tile, input_precision=DOT_PRECISION)  # [BR, BN] fp32
        da_ptrs = dar_ptr + slot * stride_dar_slot + (grp * R + cr)[:, None] * K + cols[None, :]
        if USE_ATOMICS:
            tl.atomic_add(da_ptrs, da, mask=r_ok[:, None] & col_ok[None, :], sem="relaxed")
        else:
            tl.store(da_ptrs, da, mask=r_ok[:, None] & col_ok[None, :])

        if ROUTER:
            # dp_k = s_k * sum_{j in branch k} g_j u_j (dp of the bypass stays 0), then the
            # softmax backward dl = p * (dp - sum_i p_i dp_i), all in fp32.
            gu = acc_g * acc_u * col_scale[None, :]  # [BM, BR]
            dp = tl.zeros((BLOCK_M, BLOCK_L), dtype=tl.float32)
            for c in tl.static_range(L):
                dp_c = tl.sum(tl.where(col_logit[None, :] == c, gu, 0.0), axis=1)  # [BM]
                dp = tl.where(cl[None, :] == c, dp_c[:, None], dp)
            dl = p * (dp - tl.sum(p * dp, axis=1)[:, None])  # [BM, BL] fp32
            # dc: the row block's sum, stored by its first column tile only.
            dc_ptrs = dc_ptr + slot * stride_dc_slot + grp * L + cl
            if USE_ATOMICS:
                tl.atomic_add(dc_ptrs, tl.sum(dl, axis=0), mask=l_ok & (pid_n == 0), sem="relaxed")
            else:
                tl.store(dc_ptrs, tl.sum(dl, axis=0), mask=l_ok & (pid_n == 0))
            dl_c = dl.to(dtype)
            if COMPUTE_DX:
                rw_cols = tl.load(rw_ptr + (grp * L + cl)[:, None] * stride_rm
                                  + cols[None, :] * stride_rk,
                                  mask=l_ok[:, None] & col_ok[None, :], other=0.0)  # [BL, BN]
                acc = tl.dot(dl_c, rw_cols, acc, input_precision=DOT_PRECISION)
            dr = tl.dot(tl.trans(dl_c), x_tile, input_precision=DOT_PRECISION)  # [BL, BN]
            dr_ptrs = (dar_ptr + slot * stride_dar_slot + (G * R + grp * L + cl)[:, None] * K
                       + cols[None, :])
            if USE_ATOMICS:
                tl.atomic_add(dr_ptrs, dr, mask=l_ok[:, None] & col_ok[None, :], sem="relaxed")
            else:
                tl.store(dr_ptrs, dr, mask=l_ok[:, None] & col_ok[None, :])

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


def _padded_expand(lora_b: Tensor, block_r: int) -> Tensor:
    """lora_b [O, r] as a contiguous [O, block_r] copy with zero columns past r. A row of
    r = 14 bf16 values is 28 bytes, which no asynchronous copy can load; padded rows are 32
    bytes, so the kernels' B tiles load asynchronously and unmasked. The copy is O * block_r
    elements (24 KB at ViT-B widths in bf16)."""
    r = lora_b.shape[1]
    if r == block_r and lora_b.stride() == (block_r, 1):
        return lora_b
    return torch.nn.functional.pad(lora_b, (0, block_r - r))  # one launch, a new contiguous tensor


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
    col_logit, col_scale = _branch_table(spec, x.device)
    rw = router_weight if router_weight is not None else lora_a  # placeholders are never read
    b = _padded_expand(lora_b, _pad(R))
    grid = (triton.cdiv(n, cfg.block_m) * G * tiles,)
    _mor_fwd_kernel[grid](
        x, weight, bias if bias is not None else x, lora_a, rw,
        router_bias if router_bias is not None else x, b, col_logit, col_scale, y, probs,
        u if keep_u else probs,
        n, k, og, G, tiles,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        lora_a.stride(0), lora_a.stride(1), rw.stride(0), rw.stride(1),
        b.stride(0), y.stride(0), y.stride(1),
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
    col_logit, col_scale = _branch_table(spec, dev)
    dx = _alloc((n, k) if compute_dx else (0, k), dtype, dev)
    n_a, n_r, n_b, n_c = G * R * k, G * L * k, o * R, G * L
    slots = _reduction_buffer(blocks, n_a + n_r + n_b + n_c, dev)
    dar_buf, db_buf, dc_buf = slots[:, : n_a + n_r], slots[:, n_a + n_r : -n_c or None], \
        slots[:, slots.shape[1] - n_c :]
    rw = router_weight if router_weight is not None else lora_a  # never read without router
    slot_stride = slots.stride(0) if DETERMINISTIC else 0
    b = _padded_expand(lora_b, _pad(R))
    _mor_bwd_kernel[(blocks * n_tiles,)](
        x, dy, probs, u if u is not None else probs, weight, lora_a, rw, b, col_logit,
        col_scale, dx if compute_dx else x, dar_buf, db_buf, dc_buf,
        n, k, og, n_tiles, triton.cdiv(og, cfg.block_k),
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), probs.stride(0), probs.stride(1),
        u.stride(0) if u is not None else 0,
        weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1),
        rw.stride(0), rw.stride(1), b.stride(0),
        dx.stride(0) if compute_dx else 0, dx.stride(1) if compute_dx else 0,
        slot_stride, slot_stride, slot_stride,
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
