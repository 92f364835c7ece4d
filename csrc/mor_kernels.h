// The interface between the torch binding (binding.cpp) and the CUDA kernels (mor_kernels.cu).
//
// Plain C++ with raw pointers on purpose: the .cu file then needs no torch headers, which keeps
// the nvcc part of the build short. The binding validates every tensor and allocates every
// output and workspace before calling in here, so these functions only launch kernels.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace ei {

enum class DType { kHalf, kBFloat16, kFloat };

// Branches per group the routing kernels hold in registers (the paper uses 3).
constexpr int kMaxBranches = 16;

// Helpers of MorDims that the kernels call too (this header is also plain C++ for binding.cpp).
#if defined(__CUDACC__)
#define EI_HOST_DEVICE __host__ __device__
#else
#define EI_HOST_DEVICE
#endif

EI_HOST_DEVICE constexpr int round_up8(int n) { return (n + 7) / 8 * 8; }

// Sizes and routing configuration of one MoR layer call (MOR_MATH.md symbols).
struct MorDims {
  int64_t tokens;    // N
  int in_features;   // K
  int out_features;  // O, a multiple of groups
  int groups;        // G
  int rank;          // r = sum of the branch ranks, per group
  int branches;      // E
  int logits;        // L = E + bypass router outputs per group, 0 without a router
  bool router;
  bool bypass;
  int start[kMaxBranches + 1];  // rank columns of branch k: [start[k], start[k+1])
  float scale[kMaxBranches];    // s_k

  // S: the columns of [u | l]
  EI_HOST_DEVICE constexpr int shrink_width() const { return groups * (rank + logits); }
  // Row strides of the 16-bit workspaces z [N, G*r] and [du | dl] [N, S], rounded up to
  // 8 elements: the sm_90a GEMM loads them by TMA, which needs rows at 16-byte multiples.
  EI_HOST_DEVICE constexpr int rank_ld() const { return round_up8(groups * rank); }
  EI_HOST_DEVICE constexpr int shrink_ld() const { return round_up8(shrink_width()); }
};

// Split-K factors of the two token reductions of the backward (deterministic: fixed per shape
// and device, partial sums added in a fixed order).
struct ReductionPlan {
  int shrink_splits;  // d[A_cat; R] = [du | dl]^T x
  int lora_b_splits;  // dB_cat = dy^T z
  int dl_splits;      // dc: one partial per block of the backward routing kernel
                      // (the routed input gradient writes its own partials: the binding
                      // then sets these as sm90_gemm.h's sm90_routed_dgrad says)
};

struct MorForwardArgs {
  const void* x;              // [N, K]
  const void* weight;         // [O, K]
  const void* bias;           // [O] or null
  const void* lora_a;         // [G*r, K]
  const void* lora_b;         // [O, r]
  const void* router_weight;  // [G*L, K] or null
  const void* router_bias;    // [G*L] or null
  void* y;                    // out [N, O]
  float* probs;               // out [N, G*L]
  float* shrink;              // workspace [N, S]: [u | l] in fp32
  void* z;                    // workspace [N, G*r], row stride rank_ld(); null when the
                              // routed sm_90a forward runs (sm90_routed_accepts)
  bool sm90;                  // the binding enabled the sm_90a GEMM (sm90_gemm_enabled)
  bool sm90_routed;           // run the routed forward: sm90, sm90_routed_enabled() and
                              // sm90_routed_accepts (the binding decides, and allocates)
  void* lora_b_ext;           // workspace [O, rank_ld()] for the unrouted one, else null
};

struct MorBackwardArgs {
  const void* dy;             // [N, O]
  const void* x;              // [N, K]
  const float* probs;         // [N, G*L]
  const void* weight;         // [O, K]
  const void* lora_a;         // [G*r, K]
  const void* lora_b;         // [O, r]
  const void* router_weight;  // [G*L, K] or null
  void* dx;                   // out [N, K], or null when not needed
  void* d_lora_a;             // out [G*r, K]
  void* d_lora_b;             // out [O, r]
  void* d_router_weight;      // out [G*L, K] (unused without a router)
  void* d_router_bias;        // out [G*L]
  const float* u;             // u = x A_cat^T in fp32, row stride u_ld: the forward's [u | l]
  int64_t u_ld;               // (u_ld = S, saved by autograd: never written), or u_workspace
  float* u_workspace;         // [N, G*r] to recompute u into (u_ld = G*r), or null when kept
  float* g;                   // workspace [N, G*r]: dy B_cat
  void* z;                    // workspace [N, G*r], row stride rank_ld(); null for the
                              // routed dx
  void* d_shrink;             // workspace [N, S]: [du | dl] in the input dtype, row stride
                              // shrink_ld(); null where the routed dx folds x in
  bool sm90;                  // the binding enabled the sm_90a GEMM (sm90_gemm_enabled)
  bool sm90_routed;           // run the routed input gradient: sm90, sm90_routed_enabled()
                              // and sm90_routed_dgrad_accepts (the binding decides; g
                              // and z are then null)
  bool sm90_folds_x;          // with sm90_routed: it writes d[A_cat; R]'s partials too
                              // (sm90_routed_folds_x; d_shrink is then null)
  bool dependent_sum;         // with sm90_folds_x: the sum of the partials starts as the
                              // routed input gradient's programmatic dependent
                              // (dependent_launch_enabled)
  bool dependent_dgrad;       // with sm90_routed and u_workspace: the routed input gradient
                              // starts as the u GEMM's programmatic dependent (the same)
  void* shrink_weight;        // workspace [S, K] for it with a router: [A_cat; R], else null
  float* shrink_partial;      // workspace [shrink_splits, S, K]
  float* lora_b_partial;      // workspace [lora_b_splits, O, r]
  float* dl_partial;          // workspace [dl_splits, G*L]: per-block fp32 sums of dl
};

// Whether this call's big GEMMs (forward y, backward dx) may take the sm_90a TMA + wgmma
// kernel: built with it, a 16-bit dtype, a compute capability 9.0 device, and the environment
// switch EI_KERNELS_CUDA_SM90 not "0". The binding then allocates the workspaces above that
// only those kernels read. Queries the device once (cached: safe under graph capture).
cudaError_t sm90_gemm_enabled(DType dtype, int device, bool* enabled);

// Whether the sm_90a kernels may include the routed ones (sm90_gemm.h: the forward, and the
// input gradient, in one launch each): unless EI_KERNELS_CUDA_SM90 is "unrouted",
// which keeps the shrink, g and the routing as launches of their own around the sm_90a GEMM
// (to measure what folding them in buys, or to rule the routed kernels out).
bool sm90_routed_enabled();

// Whether the routed input gradient also writes d[A_cat; R]'s partials from the tiles of x it
// loads: unless EI_KERNELS_CUDA_SM90 is "unfolded", which leaves that token reduction to a
// split-K launch of its own over [du | dl] (to measure what folding it in buys).
bool sm90_routed_folds_x();

// Whether the backward's sum of the partials may launch as the programmatic dependent of the
// routed input gradient, and that kernel as the dependent of the u GEMM before it where u is
// recomputed (qkv), so that each launch hides behind the last kernel's tail: unless
// EI_KERNELS_CUDA_PDL is "0" (to measure what that buys, or to rule it out).
bool dependent_launch_enabled();

// Reads the device's SM count (no stream work, so it is safe during CUDA graph capture).
cudaError_t plan_reductions(const MorDims& dims, int device, ReductionPlan* plan);

// Both return the first launch error (cudaSuccess when every kernel was queued).
cudaError_t mor_forward(DType dtype, const MorDims& dims, const MorForwardArgs& args,
                        cudaStream_t stream);
cudaError_t mor_backward(DType dtype, const MorDims& dims, const ReductionPlan& plan,
                         const MorBackwardArgs& args, cudaStream_t stream);

}  // namespace ei
