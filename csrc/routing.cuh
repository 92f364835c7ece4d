// The per-token routing math between the GEMMs, in fp32 registers (MOR_MATH.md), and the two
// small deterministic reductions of the backward. One thread handles one (token, group): the
// work per thread is r + L values, tiny next to the GEMMs around it.
//
// ROUTER and BYPASS are template flags so that plain LoRA and LoRAMoE-style routing compile to
// straight-line code; the branch count is a runtime value bounded by kMaxBranches, with loops
// unrolled to that bound so the per-branch values stay in registers.
#pragma once

#include <cstdint>

#include "dependent_launch.cuh"
#include "mor_kernels.h"
#include "numeric.cuh"
#include "routing_math.cuh"

namespace ei {

// p = softmax(l + c) per group; z_j = p_k(j) s_k(j) u_j. `shrink` is [u | l] = x [A_cat; R]^T.
template <typename T, bool ROUTER, bool BYPASS>
__global__ void route_forward_kernel(const MorDims d, const float* __restrict__ shrink,
                                     const T* __restrict__ router_bias, float* __restrict__ probs,
                                     T* __restrict__ z) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= d.tokens * d.groups) return;
  const int64_t t = idx / d.groups;
  const int g = int(idx % d.groups);
  const int gr = d.groups * d.rank;
  const float* const row = shrink + t * (gr + d.groups * d.logits);
  const float* const u = row + g * d.rank;

  float p[kMaxBranches + 1];
  float coef[kMaxBranches];
  if constexpr (ROUTER) {
    const float* const l = row + gr + g * d.logits;
#pragma unroll
    for (int i = 0; i < kMaxBranches + 1; ++i) {
      if (i < d.logits) {
        p[i] = l[i] + (router_bias ? to_float(router_bias[g * d.logits + i]) : 0.0f);
      }
    }
    softmax_in_place(d.logits, p);
    float* const out = probs + t * d.groups * d.logits + g * d.logits;
#pragma unroll
    for (int i = 0; i < kMaxBranches + 1; ++i) {
      if (i < d.logits) out[i] = p[i];
    }
  }
  branch_coefficients<ROUTER, BYPASS>(d, p, coef);

  T* const zr = z + t * d.rank_ld() + g * d.rank;
#pragma unroll
  for (int k = 0; k < kMaxBranches; ++k) {
    if (k < d.branches) {
      for (int j = d.start[k]; j < d.start[k + 1]; ++j) zr[j] = from_float<T>(coef[k] * u[j]);
    }
  }
}

// Threads per block of the routing kernels.
constexpr int kRouteThreads = 128;

// One (token, group) of route_backward_kernel; dl_out: its dl values in fp32 (router only).
template <typename T, bool ROUTER, bool BYPASS>
__device__ __forceinline__ void route_backward_row(const MorDims& d, int64_t idx,
                                                   const float* __restrict__ u_all,
                                                   int64_t u_ld,
                                                   const float* __restrict__ g_all,
                                                   const float* __restrict__ probs,
                                                   T* __restrict__ z, T* __restrict__ d_shrink,
                                                   float* dl_out) {
  const int64_t t = idx / d.groups;
  const int g = int(idx % d.groups);
  const int gr = d.groups * d.rank;
  const int64_t offset = t * gr + g * d.rank;
  T* const zr = z + offset + t * (d.rank_ld() - gr);  // z's rows are padded
  T* const shrink_row = d_shrink + t * d.shrink_ld();
  T* const du = shrink_row + g * d.rank;
  T* const dl = shrink_row + gr + g * d.logits;
  route_backward_values<ROUTER, BYPASS>(
      d, u_all + t * u_ld + g * d.rank, g_all + offset,
      probs + t * d.groups * d.logits + g * d.logits,
      [&](int j, float v) { zr[j] = from_float<T>(v); },
      [&](int j, float v) { du[j] = from_float<T>(v); },
      [&](int i, float v) {
        dl[i] = from_float<T>(v);
        dl_out[i] = v;
      });
}

// From u = x A_cat^T (row stride u_ld) and g = dy B_cat (fp32) and the saved p:
//   z_j = c_j u_j,  du_j = c_j g_j  with c_j = p_k(j) s_k(j)
//   dp_k = s_k sum_{j in k} g_j u_j,  dp_bypass = 0,  dl = p (dp - sum_i p_i dp_i)
// writes z and [du | dl] in the input dtype (operands of the GEMMs that follow), and this
// block's fp32 column sums of dl, dl_partial[block, G*L], added in thread order (dc is their
// sum over blocks, in block order: the same on every run). One thread per (token, group).
// The launch bounds name 4 blocks per SM (a budget of 128 registers): with the thread count
// alone ptxas sometimes aimed at 64 registers for the fp32 variants and spilled.
template <typename T, bool ROUTER, bool BYPASS>
__global__ void __launch_bounds__(kRouteThreads, 4)
    route_backward_kernel(const MorDims d, const float* __restrict__ u_all, int64_t u_ld,
                          const float* __restrict__ g_all, const float* __restrict__ probs,
                          T* __restrict__ z, T* __restrict__ d_shrink,
                          float* __restrict__ dl_partial) {
  constexpr int kLogits = kMaxBranches + 1;
  __shared__ float block_dl[ROUTER ? kRouteThreads * kLogits : 1];
  const int64_t idx = int64_t(blockIdx.x) * kRouteThreads + threadIdx.x;
  if (idx < d.tokens * d.groups) route_backward_row<T, ROUTER, BYPASS>(
      d, idx, u_all, u_ld, g_all, probs, z, d_shrink,
      block_dl + (ROUTER ? threadIdx.x * kLogits : 0));
  if constexpr (ROUTER) {
    __syncthreads();
    const int cols = d.groups * d.logits;
    for (int c = threadIdx.x; c < cols; c += kRouteThreads) {
      const int g = c / d.logits, j = c % d.logits;
      float total = 0.0f;
      for (int i = 0; i < kRouteThreads; ++i) {
        const int64_t id = int64_t(blockIdx.x) * kRouteThreads + i;
        if (id < d.tokens * d.groups && int(id % d.groups) == g) total += block_dl[i * kLogits + j];
      }
      dl_partial[int64_t(blockIdx.x) * cols + c] = total;
    }
  }
}

// One deterministic reduction of split-K partials: out = sum over splits of partial[s]
// ([rows, cols] fp32 each), in a fixed order (sum_splits_kernel); stored rows below row_split
// go to `lo`, the rest to `hi` (d[A_cat; R] -> d_lora_a and d_router_weight, which must not
// share storage).
struct SplitSum {
  const float* partial;  // [splits, rows, cols]
  int splits;
  int64_t rows;
  int cols;
  int64_t row_split;
  void* lo;
  void* hi;
};

// The backward's three reductions (d[A_cat; R], dB_cat, dc) in one launch.
constexpr int kMaxSplitSums = 3;
struct SplitSums {
  SplitSum sum[kMaxSplitSums];
  int count;
};

// Calls f(job, output within the job) for the job that holds output idx of all the jobs'
// outputs in a row (none past the last); unrolled, so that the parameters are read in place.
template <class F>
__device__ __forceinline__ void with_job(const SplitSums& sums, int64_t idx, F&& f) {
  int64_t start = 0;
#pragma unroll
  for (int j = 0; j < kMaxSplitSums; ++j) {
    const SplitSum& job = sums.sum[j];
    const int64_t count = j < sums.count ? job.rows * job.cols : 0;
    if (idx >= start && idx < start + count) f(job, idx - start);
    start += count;
  }
}

// Each block (kSumBlockThreads threads: every warp_sums row is written) sums 32 consecutive
// outputs (of all the jobs' outputs in a row) at a time: warp w of the block's kSumWarps adds
// splits w, w + kSumWarps, ... in order, its lanes reading consecutive outputs of one split
// (coalesced), then the warps' sums are added in warp order. A fixed order, so the same bits
// every run; and an eighth of the loads one after another per output where one thread walked
// all of an output's splits (99 for dB's row tiles at 12608 tokens). After the routed input
// gradient it runs as that kernel's programmatic dependent, so it waits for it first.
constexpr int kSumWarps = 8;
constexpr int kSumBlockThreads = 32 * kSumWarps;

template <typename T>
__global__ void __launch_bounds__(kSumBlockThreads) sum_splits_kernel(const SplitSums sums) {
  __shared__ float warp_sums[kSumWarps][32];
  wait_for_prerequisite();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int64_t total = 0;
#pragma unroll
  for (int j = 0; j < kMaxSplitSums; ++j) {
    if (j < sums.count) total += sums.sum[j].rows * sums.sum[j].cols;
  }
  for (int64_t first = int64_t(blockIdx.x) * 32; first < total;
       first += int64_t(gridDim.x) * 32) {
    const int64_t idx = first + lane;
    float acc = 0.0f;
    with_job(sums, idx, [&](const SplitSum& job, int64_t at) {
      const int64_t count = job.rows * job.cols;
      for (int s = warp; s < job.splits; s += kSumWarps) acc += job.partial[s * count + at];
    });
    warp_sums[warp][lane] = acc;
    __syncthreads();
    if (warp == 0) {
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kSumWarps; ++w) sum += warp_sums[w][lane];
      with_job(sums, idx, [&](const SplitSum& job, int64_t at) {
        const int64_t r = at / job.cols;
        const int c = int(at % job.cols);
        T* const dst = r < job.row_split
                           ? static_cast<T*>(job.lo) + r * job.cols
                           : static_cast<T*>(job.hi) + (r - job.row_split) * job.cols;
        dst[c] = from_float<T>(sum);
      });
    }
    __syncthreads();  // warp_sums is rewritten by the next outputs
  }
}

}  // namespace ei
