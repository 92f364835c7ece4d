// The fused MoR op as a sequence of kernel launches on one stream (MOR_MATH.md):
//
// forward   (1) [u | l] = x [A_cat; R]^T               skinny GEMM, fp32 out
//           (2) p = softmax(l + c), z = p s u           route_forward_kernel
//           (3) y = [x | z] [W | B_cat]^T + b           GEMM with the K-extension, per group
// backward  (1) u = x A_cat^T                           the forward's, when the caller kept
//                                                       [u | l]; else recomputed from x
//           (2) g = dy B_cat                            per group
//           (3) z, du, dl, and dl's sums per block      route_backward_kernel
//           (4) dx = [dy | du dl] [W ; A_cat ; R]       GEMM with the K-extension
//           (5) d[A_cat; R] = [du | dl]^T x, dB_cat = dy^T z, dc = sum dl
//                                                       split-K partials (dc: the blocks'
//                                                       sums of (3)), then all three summed
//                                                       in a fixed order by one launch
//
// On a compute capability 9.0 device, 16-bit inputs whose rows TMA can load take the sm_90a
// kernels (sm90_gemm.h): the whole forward in one launch (routed_gemm: (1) and (2) folded
// into (3)) where the ranks fit it, else forward (3) as one launch over all groups with B_cat
// as a block-diagonal [O, G*r] matrix; backward (2)-(4) in one launch where each group's
// outputs fill whole 64-column K steps (routed_dgrad, which also writes every partial of (5):
// only the sum is left), else backward (4) with [A_cat; R] stacked into one operand.
// Everything else, and every GEMM elsewhere, runs the portable kernels of gemm.cuh.
//
// Every kernel is a template over the element type; this file instantiates each for fp16,
// bf16 and fp32 through one dtype switch.
#include <algorithm>
#include <type_traits>

#include <cstdlib>
#include <cstring>

#include "device_cache.h"
#include "gemm.cuh"
#include "mor_kernels.h"
#include "routing.cuh"
#include "sm90_gemm.h"

namespace ei {
namespace {

constexpr int kSumThreads = 256;

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kHalf:
      return f(TypeTag<__half>{});
    case DType::kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
    case DType::kFloat:
      return f(TypeTag<float>{});
  }
  return cudaErrorInvalidValue;
}

// Calls f(router, bypass) with compile-time flags; without a router there is no bypass.
template <typename F>
void dispatch_routing(const MorDims& d, F&& f) {
  if (!d.router) {
    f(std::false_type{}, std::false_type{});
  } else if (d.bypass) {
    f(std::true_type{}, std::true_type{});
  } else {
    f(std::true_type{}, std::false_type{});
  }
}

unsigned blocks_for(int64_t work, int threads) { return unsigned((work + threads - 1) / threads); }

// B_cat as one block-diagonal [O, ld] matrix: row o of group g = o / og holds lora_b[o] in
// columns [g r, g r + r) and zeros elsewhere (the sm_90a forward's extension operand).
template <typename T>
__global__ void block_diagonal_kernel(const T* __restrict__ lora_b, int out_features, int og,
                                      int rank, int ld, T* __restrict__ out) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= int64_t(out_features) * ld) return;
  const int o = int(idx / ld), j = int(idx % ld) - (o / og) * rank;
  out[idx] = j >= 0 && j < rank ? lora_b[int64_t(o) * rank + j] : from_float<T>(0.0f);
}

template <typename T>
cudaError_t forward_impl(DType dtype, const MorDims& d, const MorForwardArgs& a,
                         cudaStream_t stream) {
  const int m = int(d.tokens), K = d.in_features, O = d.out_features, G = d.groups;
  const int r = d.rank, gr = G * r, S = d.shrink_width(), og = O / G, zld = d.rank_ld();
  const T* const x = static_cast<const T*>(a.x);
  T* const z = static_cast<T*>(a.z);
  if (m == 0) return cudaSuccess;
  if (a.sm90_routed) return sm90_routed_gemm(dtype, d, a, stream);

  GemmArgs<T, float> shrink{};
  shrink.m = m, shrink.n = S, shrink.k = K, shrink.k_per_split = K;
  shrink.a = dense(x, K);
  shrink.b = stacked(static_cast<const T*>(a.lora_a), static_cast<const T*>(a.router_weight), gr,
                     K);
  shrink.c = a.shrink, shrink.ldc = S, shrink.batches = 1, shrink.splits = 1;
  launch_gemm<TallTile, true, true>(shrink, stream);

  dispatch_routing(d, [&](auto router, auto bypass) {
    route_forward_kernel<T, decltype(router)::value, decltype(bypass)::value>
        <<<blocks_for(d.tokens * G, kRouteThreads), kRouteThreads, 0, stream>>>(
            d, a.shrink, static_cast<const T*>(a.router_bias), a.probs, z);
  });

  // The sm_90a kernel when the binding enabled it and TMA can load these operands: one
  // launch over all groups.
  ExtGemmArgs ext{};
  ext.m = m, ext.n = O, ext.k = K, ext.k2 = gr, ext.b_n_major = false;
  ext.a = x, ext.lda = K, ext.b = a.weight, ext.ldb = K;
  ext.a2 = z, ext.lda2 = zld, ext.b2 = a.lora_b_ext, ext.ldb2 = zld;
  ext.bias = a.bias, ext.c = a.y, ext.ldc = O;
  if (a.sm90 && sm90_gemm_accepts(dtype, ext)) {
    block_diagonal_kernel<T><<<blocks_for(int64_t(O) * zld, kSumThreads), kSumThreads, 0,
                               stream>>>(static_cast<const T*>(a.lora_b), O, og, r, zld,
                                         static_cast<T*>(a.lora_b_ext));
    return sm90_ext_gemm(dtype, ext, stream);
  }

  // B_cat is block-diagonal: batch entry g computes output columns [g*og, (g+1)*og) from
  // W's rows of that slice and z's rank columns of group g.
  GemmArgs<T, T> y{};
  y.m = m, y.n = og, y.k = K, y.k2 = r, y.k_per_split = K;
  y.a = dense(x, K);
  y.b = dense(static_cast<const T*>(a.weight), K, int64_t(og) * K);
  y.a2 = dense<T>(z, zld, r);
  y.b2 = dense(static_cast<const T*>(a.lora_b), r, int64_t(og) * r);
  y.bias = static_cast<const T*>(a.bias), y.bias_batch_stride = og;
  y.c = static_cast<T*>(a.y), y.ldc = O, y.c_batch_stride = og;
  y.batches = G, y.splits = 1;
  launch_gemm<BigTile, true, true>(y, stream);
  return cudaSuccess;
}

// as_dependent: launched as the programmatic dependent of the kernel ahead (a 9.0+ device).
template <typename T>
cudaError_t sum_splits(const SplitSums& sums, bool as_dependent, cudaStream_t stream) {
  int64_t count = 0;
  for (int j = 0; j < sums.count; ++j) count += sums.sum[j].rows * sums.sum[j].cols;
  if (count == 0) return cudaSuccess;
  const unsigned blocks = unsigned(std::min<int64_t>((count + 31) / 32, 4096));
  if (as_dependent) {
    return launch_as_dependent(&sum_splits_kernel<T>, dim3(blocks), dim3(kSumBlockThreads), 0,
                               stream, sums);
  }
  sum_splits_kernel<T><<<blocks, kSumBlockThreads, 0, stream>>>(sums);
  return cudaSuccess;
}

// [top; bottom] as one contiguous matrix (the sm_90a input gradient's [A_cat; R] operand).
template <typename T>
__global__ void stack_rows_kernel(const T* __restrict__ top, int64_t top_count,
                                  const T* __restrict__ bottom, int64_t bottom_count,
                                  T* __restrict__ out) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
       idx < top_count + bottom_count; idx += stride) {
    out[idx] = idx < top_count ? top[idx] : bottom[idx - top_count];
  }
}

// d[A_cat; R] = [du | dl]^T x, dB_cat = dy^T z and dc from z, [du | dl] and the per-block dl
// sums that the routing wrote: split-K partials, then one deterministic sum. With `routed` the
// routed input gradient already wrote dB's (one per row tile), and d[A_cat; R]'s too where it
// folds x in: then only the sum is left.
template <typename T>
cudaError_t token_reductions(const MorDims& d, const ReductionPlan& plan,
                             const MorBackwardArgs& a, cudaStream_t stream,
                             bool routed = false) {
  const int m = int(d.tokens), K = d.in_features, O = d.out_features, r = d.rank;
  const int S = d.shrink_width(), og = O / d.groups;
  if (!routed || !a.sm90_folds_x) {
    GemmArgs<T, float> dw{};
    dw.m = S, dw.n = K, dw.k = m, dw.k_per_split = split_length<T>(m, plan.shrink_splits);
    dw.a = dense<T>(static_cast<T*>(a.d_shrink), d.shrink_ld());
    dw.b = dense(static_cast<const T*>(a.x), K);
    dw.c = a.shrink_partial, dw.ldc = K, dw.c_split_stride = int64_t(S) * K;
    dw.batches = 1, dw.splits = plan.shrink_splits;
    launch_gemm<WideTile, false, false>(dw, stream);
  }
  if (!routed) {
    GemmArgs<T, float> db{};
    db.m = og, db.n = r, db.k = m, db.k_per_split = split_length<T>(m, plan.lora_b_splits);
    db.a = dense(static_cast<const T*>(a.dy), O, og);
    db.b = dense<T>(static_cast<T*>(a.z), d.rank_ld(), r);
    db.c = a.lora_b_partial, db.ldc = r, db.c_batch_stride = int64_t(og) * r;
    db.c_split_stride = int64_t(O) * r, db.batches = d.groups, db.splits = plan.lora_b_splits;
    launch_gemm<TallTile, false, false>(db, stream);
  }

  // The partial sums in a fixed order, one launch; dc from the routing kernel's per-block
  // sums (none for no tokens: zeros). Right after the routed input gradient (which lets its
  // dependent launch from its start), as that kernel's dependent, unless switched off.
  SplitSums sums{};
  sums.sum[sums.count++] = {a.shrink_partial, plan.shrink_splits, S, K, d.groups * r, a.d_lora_a,
                            a.d_router_weight};
  sums.sum[sums.count++] = {a.lora_b_partial, plan.lora_b_splits, O, r, O, a.d_lora_b, nullptr};
  if (d.router) {
    sums.sum[sums.count++] = {a.dl_partial, plan.dl_splits, 1, d.groups * d.logits, 1,
                              a.d_router_bias, nullptr};
  }
  return sum_splits<T>(sums, routed && a.dependent_sum, stream);
}

template <typename T>
cudaError_t backward_impl(DType dtype, const MorDims& d, const ReductionPlan& plan,
                          const MorBackwardArgs& a, cudaStream_t stream) {
  const int m = int(d.tokens), K = d.in_features, O = d.out_features, G = d.groups;
  const int r = d.rank, gr = G * r, S = d.shrink_width(), og = O / G;
  const int zld = d.rank_ld(), sld = d.shrink_ld();
  const T* const x = static_cast<const T*>(a.x);
  const T* const dy = static_cast<const T*>(a.dy);
  const T* const lora_a = static_cast<const T*>(a.lora_a);
  const T* const lora_b = static_cast<const T*>(a.lora_b);
  const T* const router_weight = static_cast<const T*>(a.router_weight);
  T* const z = static_cast<T*>(a.z);
  T* const d_shrink = static_cast<T*>(a.d_shrink);

  if (m > 0) {
    if (a.u_workspace != nullptr) {
      GemmArgs<T, float> u{};
      u.m = m, u.n = gr, u.k = K, u.k_per_split = K;
      u.a = dense(x, K), u.b = dense(lora_a, K);
      u.c = a.u_workspace, u.ldc = a.u_ld, u.batches = 1, u.splits = 1;
      launch_gemm<TallTile, true, true>(u, stream);
    }

    if (a.sm90_routed) {
      // dx with g, the routing and the partials of dB, dc and (folded) d[A_cat; R] inside
      const cudaError_t err = sm90_routed_dgrad(dtype, d, a, stream);
      if (err != cudaSuccess) return err;
      return token_reductions<T>(d, plan, a, stream, /*routed=*/true);
    }

    // Batch entry g: g[:, group g's rank columns] = dy[:, output slice g] lora_b[slice g].
    GemmArgs<T, float> g{};
    g.m = m, g.n = r, g.k = og, g.k_per_split = og;
    g.a = dense(dy, O, og), g.b = dense(lora_b, r, int64_t(og) * r);
    g.c = a.g, g.ldc = gr, g.c_batch_stride = r, g.batches = G, g.splits = 1;
    launch_gemm<TallTile, true, false>(g, stream);

    dispatch_routing(d, [&](auto router, auto bypass) {
      route_backward_kernel<T, decltype(router)::value, decltype(bypass)::value>
          <<<blocks_for(d.tokens * G, kRouteThreads), kRouteThreads, 0, stream>>>(
              d, a.u, a.u_ld, a.g, a.probs, z, d_shrink, a.dl_partial);
    });

    if (a.dx) {
      ExtGemmArgs ext{};
      ext.m = m, ext.n = K, ext.k = O, ext.k2 = S, ext.b_n_major = true;
      ext.a = dy, ext.lda = O, ext.b = a.weight, ext.ldb = K;
      // [A_cat; R] as one [S, K] operand: lora_a itself without a router, else a copy
      ext.a2 = d_shrink, ext.lda2 = sld, ext.b2 = d.router ? a.shrink_weight : a.lora_a;
      ext.ldb2 = K, ext.c = a.dx, ext.ldc = K;
      if (a.sm90 && sm90_gemm_accepts(dtype, ext)) {
        if (d.router) {
          const int64_t count = int64_t(S) * K;
          stack_rows_kernel<T><<<unsigned(std::min<int64_t>(blocks_for(count, kSumThreads), 1024)),
                                 kSumThreads, 0, stream>>>(
              lora_a, int64_t(gr) * K, router_weight, int64_t(S - gr) * K,
              static_cast<T*>(a.shrink_weight));
        }
        const cudaError_t err = sm90_ext_gemm(dtype, ext, stream);
        if (err != cudaSuccess) return err;
      } else {
        GemmArgs<T, T> dx{};
        dx.m = m, dx.n = K, dx.k = O, dx.k2 = S, dx.k_per_split = O;
        dx.a = dense(dy, O), dx.b = dense(static_cast<const T*>(a.weight), K);
        dx.a2 = dense<T>(d_shrink, sld), dx.b2 = stacked(lora_a, router_weight, gr, K);
        dx.c = static_cast<T*>(a.dx), dx.ldc = K, dx.batches = 1, dx.splits = 1;
        launch_gemm<BigTile, true, false>(dx, stream);
      }
    }
  }

  // Token reductions (they also run for zero tokens: the gradients are then zeros).
  return token_reductions<T>(d, plan, a, stream);
}

// Two waves of blocks on the device, but at least 256 tokens per split so that the partial
// sums stay a small fraction of the work.
int splits_for(int64_t tiles, int64_t tokens, int sms) {
  const int64_t want = (2 * int64_t(sms) + tiles - 1) / tiles;
  const int64_t cap = std::max<int64_t>(1, tokens / 256);
  return int(std::clamp<int64_t>(std::min(want, cap), 1, 64));
}

// 10 * major + minor, e.g. 90 for H100/H200.
cudaError_t compute_capability(int device, int* capability) {
  return cached_per_device(device, capability, [&](int* out) {
    int major = 0, minor = 0;
    cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (err == cudaSuccess) {
      err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    }
    *out = 10 * major + minor;
    return err;
  });
}

}  // namespace

cudaError_t plan_reductions(const MorDims& d, int device, ReductionPlan* plan) {
  int sms = 0;
  const cudaError_t err = multiprocessor_count(device, &sms);
  if (err != cudaSuccess) return err;
  const auto tiles = [](int64_t rows, int64_t cols, int bm, int bn) {
    return std::max<int64_t>(1, ((rows + bm - 1) / bm) * ((cols + bn - 1) / bn));
  };
  const int og = d.out_features / d.groups;
  plan->shrink_splits = splits_for(
      tiles(d.shrink_width(), d.in_features, WideTile::BM, WideTile::BN), d.tokens, sms);
  plan->lora_b_splits = splits_for(
      d.groups * tiles(og, d.rank, TallTile::BM, TallTile::BN), d.tokens, sms);
  plan->dl_splits = int(blocks_for(d.tokens * d.groups, kRouteThreads));
  return cudaSuccess;
}

bool sm90_routed_enabled() {
  const char* const switch_value = std::getenv("EI_KERNELS_CUDA_SM90");
  return switch_value == nullptr || std::strcmp(switch_value, "unrouted") != 0;
}

bool dependent_launch_enabled() {
  const char* const switch_value = std::getenv("EI_KERNELS_CUDA_PDL");
  return switch_value == nullptr || std::strcmp(switch_value, "0") != 0;
}

bool sm90_routed_folds_x() {
  const char* const switch_value = std::getenv("EI_KERNELS_CUDA_SM90");
  return switch_value == nullptr || std::strcmp(switch_value, "unfolded") != 0;
}

cudaError_t sm90_gemm_enabled(DType dtype, int device, bool* enabled) {
  *enabled = false;
  const char* const switch_value = std::getenv("EI_KERNELS_CUDA_SM90");
  if (!sm90_gemm_built() || dtype == DType::kFloat ||
      (switch_value != nullptr && std::strcmp(switch_value, "0") == 0)) {
    return cudaSuccess;
  }
  int capability = 0;
  const cudaError_t err = compute_capability(device, &capability);
  *enabled = err == cudaSuccess && capability == 90;  // sm_90a code runs on 9.0 only
  return err;
}

cudaError_t mor_forward(DType dtype, const MorDims& dims, const MorForwardArgs& args,
                        cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    const cudaError_t err = forward_impl<typename decltype(tag)::type>(dtype, dims, args, stream);
    return err != cudaSuccess ? err : cudaGetLastError();
  });
}

cudaError_t mor_backward(DType dtype, const MorDims& dims, const ReductionPlan& plan,
                         const MorBackwardArgs& args, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    const cudaError_t err =
        backward_impl<typename decltype(tag)::type>(dtype, dims, plan, args, stream);
    return err != cudaSuccess ? err : cudaGetLastError();
  });
}

}  // namespace ei
