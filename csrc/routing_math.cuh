// The per-(token, group) routing math of MOR_MATH.md in fp32 registers, shared by the routing
// kernels (routing.cuh) and the sm_90a forward that folds the routing into its GEMM
// (sm90_gemm.cu). Loops run to the compile-time bounds of mor_kernels.h so that the arrays
// stay in registers.
#pragma once

#include <math.h>

#include "mor_kernels.h"

namespace ei {

// p[0, L) holds l + c on entry and softmax(l + c) on return.
__device__ __forceinline__ void softmax_in_place(int logits, float (&p)[kMaxBranches + 1]) {
  float top = -INFINITY;
#pragma unroll
  for (int i = 0; i < kMaxBranches + 1; ++i) {
    if (i < logits) top = fmaxf(top, p[i]);
  }
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kMaxBranches + 1; ++i) {
    if (i < logits) {
      p[i] = expf(p[i] - top);
      sum += p[i];
    }
  }
#pragma unroll
  for (int i = 0; i < kMaxBranches + 1; ++i) {
    if (i < logits) p[i] /= sum;
  }
}

// coef[k] = p_k s_k for branch k (the bypass, p_0 with BYPASS, weighs nothing); s_k without a
// router. z_j = coef[k(j)] u_j.
template <bool ROUTER, bool BYPASS>
__device__ __forceinline__ void branch_coefficients(const MorDims& d,
                                                    const float (&p)[kMaxBranches + 1],
                                                    float (&coef)[kMaxBranches]) {
#pragma unroll
  for (int k = 0; k < kMaxBranches; ++k) {
    if (k < d.branches) coef[k] = ROUTER ? p[k + BYPASS] * d.scale[k] : d.scale[k];
  }
}

}  // namespace ei
