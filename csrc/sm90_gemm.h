// The Hopper (sm_90a) GEMM with a K-extension, as plain C++ for mor_kernels.cu (which then
// needs no CuTe headers):
//
//   C[m, n] = sum_k A(m, k) B(n, k)  +  sum_k' A2(m, k') B2(n, k')  (+ bias[n])
//
// A and A2 are row-major [m, k] / [m, k2]. B and B2 are either row-major [n, k] / [n, k2]
// ("k-major": the forward's W and its LoRA up-projection) or row-major [k, n] / [k2, n]
// ("n-major": W and [A_cat; R] in the input gradient). Operands reach shared memory by TMA and
// are multiplied by warp-group MMA (wgmma); fp16 and bf16 only, fp32 accumulation.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "mor_kernels.h"

namespace ei {

struct ExtGemmArgs {
  int m, n, k, k2;  // k2 = 0: no extension
  bool b_n_major;   // B and B2 are [k, n] / [k2, n] rather than [n, k] / [n, k2]
  const void* a;  int64_t lda;
  const void* b;  int64_t ldb;
  const void* a2; int64_t lda2;
  const void* b2; int64_t ldb2;
  const void* bias;  // [n] or null
  void* c;        int64_t ldc;
};

// True when this build holds the sm_90a kernels (CUDA architecture "90a" and the CUTLASS
// headers were both present at build time).
bool sm90_gemm_built();

// Whether sm90_ext_gemm can run these arguments: a 16-bit dtype, TMA's alignment (every
// operand's base address 16-byte aligned, every row stride a multiple of 16 bytes), positive
// sizes and at most 2^31 - 1 output tiles. The caller uses the portable GEMM otherwise, so a
// misaligned view is slower, never wrong.
bool sm90_gemm_accepts(DType dtype, const ExtGemmArgs& args);

// Launches the kernel; call only on a compute capability 9.0 device after sm90_gemm_accepts.
cudaError_t sm90_ext_gemm(DType dtype, const ExtGemmArgs& args, cudaStream_t stream);

// The whole forward of mor_kernels.h in one launch, with the shrink and the routing folded
// into the GEMM above: y = [x | z][W | B_cat]^T + b, where every CTA also computes
// [u | l] = x [A_cat; R]^T for its group from the x tiles it already holds, routes in fp32,
// and multiplies z by B as the last K step. Column tiles of one row block run as a thread block
// cluster (2 by default; EI_KERNELS_CUDA_SM90_CLUSTER=1 or 4) and share the shrink out by K
// steps, summing [u | l] through distributed shared memory. Where x's row blocks in flight fit
// the L2 (EI_KERNELS_CUDA_SM90_RUNS), each cluster walks a contiguous share of the tiles, and
// a tile of the row block and group of the cluster's last reuses its z: the shrink and the
// routing run once per such run. p and [u | l] (what the backward keeps) are written once per
// group; z and B_cat's block-diagonal copy are never written to memory.
// Accepts r <= 16, L <= 8, at most 4 branches, O / G a multiple of the 192-column tile when
// G > 1, and the TMA alignment of x, W, A_cat and R (K and O multiples of 8); otherwise the
// caller runs the shrink, the routing and sm90_ext_gemm as separate launches.
bool sm90_routed_accepts(DType dtype, const MorDims& dims, const MorForwardArgs& args);
cudaError_t sm90_routed_gemm(DType dtype, const MorDims& dims, const MorForwardArgs& args,
                             cudaStream_t stream);

// The backward's dx in one launch, with g = dy B and the backward routing folded into the
// GEMM: dx = dy W + [du | dl] [A_cat; R], where every CTA also computes g for its rows from the
// dy tiles it already holds (B's rows bulk-copied, zero-padded on chip), routes in fp32 with
// the saved u and p, and multiplies du by A_cat and dl by R as two extra K steps, group after
// group (a tile's K steps run group by group). The first column tile writes its rows' dl sums
// (args.dl_partial, [row tiles, G*L]), and a fourth warp group writes the token reductions'
// partials in slots (one per row tile, or where each CTA's tiles share a column tile, one
// per CTA of a column tile, the CTA adding its row tiles' partials): dB's dy^T z from the same
// dy tiles (args.lora_b_partial, [slots, O, r]) and, with args.sm90_folds_x, d[A_cat; R]'s
// [du | dl]^T x from the tile's x, loaded after each group's steps (args.shrink_partial,
// [slots, S, K]; without, the first column tile writes [du | dl] to args.d_shrink for a
// launch of its own). The caller's dl_splits must be sm90_routed_dgrad_row_tiles, and its
// lora_b_splits, and shrink_splits where x is folded in, sm90_routed_dgrad_slots.
// With one group, where dy's row blocks in flight fit the L2 (EI_KERNELS_CUDA_SM90_RUNS), each
// CTA walks a contiguous share of the tiles, and a tile right after the CTA's tile to its left
// reuses that one's g, du and dl (no g MMAs, no routing). g and z are never written (nor,
// where x is folded in, [du | dl]).
// Accepts O / G a multiple of 64 when G > 1 (each group's outputs fill whole K steps),
// r <= 16, L <= 16, at most 4 branches, at most 512 row tiles of 128 tokens (65536 tokens:
// the partials' memory), the TMA alignment of dy, x, W, A_cat, R and dx (K and O multiples
// of 8) and B 16-byte aligned; otherwise the caller runs g, the routing and sm90_ext_gemm as
// separate launches.
bool sm90_routed_dgrad_accepts(DType dtype, const MorDims& dims, const MorBackwardArgs& args);
int64_t sm90_routed_dgrad_row_tiles(int64_t tokens);
// The partial slots of the routed input gradient's launch for these dims on the current device
// (device attribute queries, cached: safe during CUDA graph capture).
cudaError_t sm90_routed_dgrad_slots(const MorDims& dims, int64_t* slots);
cudaError_t sm90_routed_dgrad(DType dtype, const MorDims& dims, const MorBackwardArgs& args,
                              cudaStream_t stream);

}  // namespace ei
