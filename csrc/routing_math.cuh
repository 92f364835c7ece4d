// The per-(token, group) routing math of MOR_MATH.md in fp32 registers, shared by the routing
// kernels (routing.cuh) and the sm_90a kernels that fold the routing into their GEMMs
// (sm90_routed_forward.cu, sm90_routed_dgrad*). Loops run to a compile-time branch
// bound (kBranches: mor_kernels.h's kMaxBranches, or less where the caller's registers are
// scarce) so that the arrays stay in registers.
#pragma once

#include <math.h>

#include "mor_kernels.h"

namespace ei {

// p[0, L) holds l + c on entry and softmax(l + c) on return.
template <int kLogits>
__device__ __forceinline__ void softmax_in_place(int logits, float (&p)[kLogits]) {
  float top = -INFINITY;
#pragma unroll
  for (int i = 0; i < kLogits; ++i) {
    if (i < logits) top = fmaxf(top, p[i]);
  }
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kLogits; ++i) {
    if (i < logits) {
      p[i] = expf(p[i] - top);
      sum += p[i];
    }
  }
#pragma unroll
  for (int i = 0; i < kLogits; ++i) {
    if (i < logits) p[i] /= sum;
  }
}

// coef[k] = p_k s_k for branch k (the bypass, p_0 with BYPASS, weighs nothing); s_k without a
// router. z_j = coef[k(j)] u_j.
template <bool ROUTER, bool BYPASS, int kBranches>
__device__ __forceinline__ void branch_coefficients(const MorDims& d,
                                                    const float (&p)[kBranches + 1],
                                                    float (&coef)[kBranches]) {
#pragma unroll
  for (int k = 0; k < kBranches; ++k) {
    if (k < d.branches) coef[k] = ROUTER ? p[k + BYPASS] * d.scale[k] : d.scale[k];
  }
}

// The backward of one (token, group) from u, g = dy B (r values each) and the saved p:
//   z_j = c_j u_j,  du_j = c_j g_j  with c_j = p_k(j) s_k(j)
//   dp_k = s_k sum_{j in k} g_j u_j,  dp_bypass = 0,  dl = p (dp - sum_i p_i dp_i)
// handed to store_z(j, z_j), store_du(j, du_j) and (router only) store_dl(i, dl_i). The
// caller guarantees d.branches <= kBranches.
template <bool ROUTER, bool BYPASS, int kBranches = kMaxBranches, class StoreZ, class StoreDu,
          class StoreDl>
__device__ __forceinline__ void route_backward_values(const MorDims& d, const float* u,
                                                      const float* gy, const float* probs,
                                                      StoreZ&& store_z, StoreDu&& store_du,
                                                      StoreDl&& store_dl) {
  float p[kBranches + 1];
  float coef[kBranches];
  if constexpr (ROUTER) {
#pragma unroll
    for (int i = 0; i < kBranches + 1; ++i) {
      if (i < d.logits) p[i] = probs[i];
    }
  }
  branch_coefficients<ROUTER, BYPASS>(d, p, coef);

  float dp[kBranches];
#pragma unroll
  for (int k = 0; k < kBranches; ++k) {
    if (k < d.branches) {
      float gu = 0.0f;
      for (int j = d.start[k]; j < d.start[k + 1]; ++j) {
        store_z(j, coef[k] * u[j]);
        store_du(j, coef[k] * gy[j]);
        gu = fmaf(gy[j], u[j], gu);
      }
      dp[k] = gu * d.scale[k];
    }
  }

  if constexpr (ROUTER) {
    float dot = 0.0f;
#pragma unroll
    for (int k = 0; k < kBranches; ++k) {
      if (k < d.branches) dot = fmaf(p[k + BYPASS], dp[k], dot);
    }
    if constexpr (BYPASS) store_dl(0, -p[0] * dot);
#pragma unroll
    for (int k = 0; k < kBranches; ++k) {
      if (k < d.branches) store_dl(k + BYPASS, p[k + BYPASS] * (dp[k] - dot));
    }
  }
}

}  // namespace ei
