// The sm_90a GEMM with a K-extension (sm90_gemm.h): C = A B^T + A2 B2^T (+ bias), B k-major
// (the forward's W) or n-major (the input gradient's W), the extension as the last K steps
// through the same ring (sm90_pipeline.cuh); and sm90_gemm_built(), which the routed kernels'
// accepts functions call too.
#include "sm90_gemm.h"
#include "sm90_launch.cuh"
#include "sm90_pipeline.cuh"

namespace ei {
namespace sm90 {
namespace {

template <class Cfg, class TmaA, class TmaB>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    ext_gemm_kernel(CUTE_GRID_CONSTANT const TmaA tma_a, CUTE_GRID_CONSTANT const TmaA tma_a2,
                    CUTE_GRID_CONSTANT const TmaB tma_b, CUTE_GRID_CONSTANT const TmaB tma_b2,
                    int m, int n, int k, int k2, const typename Cfg::T* bias,
                    typename Cfg::T* c, int64_t ldc) {
#if defined(EI_SM90_DEVICE_CODE)
  using T = typename Cfg::T;
  constexpr int kStages = Cfg::kStages;
  // What TMA writes per stage: whole boxes, also where they reach past the matrix (zeros)
  constexpr uint32_t kStageBytes = uint32_t((Cfg::kBM + Cfg::kBN) * Cfg::kBK * sizeof(T));
  extern __shared__ __align__(1024) char shared_bytes[];  // the 128-byte swizzle's period
  auto& smem = *reinterpret_cast<typename Cfg::Shared*>(shared_bytes);
  Tensor sA = make_tensor(make_smem_ptr(smem.a.begin()), typename Cfg::SmemA{});  // [BM,BK,P]
  Tensor sB = make_tensor(make_smem_ptr(smem.b.begin()), typename Cfg::SmemB{});  // [BN,BK,P]

  const auto tiler = Shape<typename Cfg::BM, typename Cfg::BN, typename Cfg::BK>{};
  const int col_tiles = (n + Cfg::kBN - 1) / Cfg::kBN;
  const int tiles = int(tile_count(m, n));  // at most 2^31 - 1: the host checks
  const int k_steps = (k + Cfg::kBK - 1) / Cfg::kBK + (k2 + Cfg::kBK - 1) / Cfg::kBK;

  init_ring<typename Cfg::Shared, kStages>(smem, Cfg::kConsumerThreads);

  if (threadIdx.x < 128) {  // producer warp group: one thread issues every load
    if (threadIdx.x >= 32 || !elect_one_sync()) return;
    prefetch_tma_descriptor(tma_a.get_tma_descriptor());
    prefetch_tma_descriptor(tma_b.get_tma_descriptor());
    if (k2 > 0) {
      prefetch_tma_descriptor(tma_a2.get_tma_descriptor());
      prefetch_tma_descriptor(tma_b2.get_tma_descriptor());
    }
    int stage = 0, phase = 0;
    // One pass over a reduction's K steps; a separate loop per reduction keeps every tensor in
    // registers (selecting between the two per step would put them in local memory).
    const auto load_steps = [&](const auto& tma_x, const auto& tma_w, int kx, const auto& tile) {
      Tensor gX = local_tile(tma_x.get_tma_tensor(make_shape(m, kx)), tiler, tile,
                             Step<_1, X, _1>{});  // [BM, BK, k steps]
      Tensor gW = local_tile(tma_w.get_tma_tensor(make_shape(n, kx)), tiler, tile,
                             Step<X, _1, _1>{});  // [BN, BK, k steps]
      auto tX = tma_split(tma_x, sA, gX);
      auto tW = tma_split(tma_w, sB, gW);
      fill_ring<kStages>(smem, 0, (kx + Cfg::kBK - 1) / Cfg::kBK, kStageBytes, stage, phase,
                         [&](int kt, int at, uint64_t& full) {
                           copy_step(tma_x, full, tX, kt, at);
                           copy_step(tma_w, full, tW, kt, at);
                         });
    };
    for_each_tile(tiles, col_tiles, [&](int row, int col, int) {
      const auto tile = make_coord(row, col, _);
      load_steps(tma_a, tma_b, k, tile);
      if (k2 > 0) load_steps(tma_a2, tma_b2, k2, tile);
    });
    return;
  }

  // Consumer warp groups.
  const int thread = int(threadIdx.x) - 128;
  typename Cfg::Mma mma;
  auto thr_mma = mma.get_thread_slice(thread);
  Tensor tCrA = thr_mma.make_fragment_A(thr_mma.partition_A(sA));  // smem descriptors
  Tensor tCrB = thr_mma.make_fragment_B(thr_mma.partition_B(sB));
  Tensor acc = thr_mma.partition_fragment_C(
      make_identity_tensor(Shape<typename Cfg::BM, typename Cfg::BN>{}));  // fp32 accumulators
  int stage = 0, phase = 0;
  for_each_tile(tiles, col_tiles, [&](int row, int col, int) {
    Tensor gC = local_tile(make_identity_tensor(make_shape(m, n)), tiler,
                           make_coord(row, col, _), Step<_1, _1, X>{});  // [BM, BN]: (row, col)
    clear(acc);
    drain_ring<kStages>(
        smem, k_steps, stage, phase,
        [&](int at) { gemm(mma, tCrA(_, _, _, at), tCrB(_, _, _, at), acc); },
        [&] { warpgroup_fence_operand(acc); });
    store_tile(acc, thr_mma.partition_C(gC), m, n, bias, c, ldc);
  });
#else
  (void)tma_a, (void)tma_a2, (void)tma_b, (void)tma_b2, (void)m, (void)n, (void)k, (void)k2;
  (void)bias, (void)c, (void)ldc;
#if defined(__CUDA_ARCH__)
  __trap();  // only the sm_90a image holds this kernel; the host never launches it elsewhere
#endif
#endif
}

template <typename T, bool kBNMajor>
cudaError_t launch(const ExtGemmArgs& g, cudaStream_t stream) {
  using Cfg = Sm90Config<T, kBNMajor>;
  const auto smem_a = typename Cfg::SmemA{}(_, _, Int<0>{});
  const auto smem_b = typename Cfg::SmemB{}(_, _, Int<0>{});
  const auto box_a = make_shape(typename Cfg::BM{}, typename Cfg::BK{});
  const auto box_b = make_shape(typename Cfg::BN{}, typename Cfg::BK{});
  // Without an extension its descriptors point at the main operands and are never used.
  const bool ext = g.k2 > 0;
  auto tma_a = make_tma_atom(SM90_TMA_LOAD{}, row_major<T>(g.a, g.m, g.k, g.lda), smem_a, box_a);
  auto tma_a2 = make_tma_atom(SM90_TMA_LOAD{},
                              ext ? row_major<T>(g.a2, g.m, g.k2, g.lda2)
                                  : row_major<T>(g.a, g.m, g.k, g.lda),
                              smem_a, box_a);
  auto tma_b = make_tma_atom(SM90_TMA_LOAD{}, b_operand<T, kBNMajor>(g.b, g.n, g.k, g.ldb),
                             smem_b, box_b);
  auto tma_b2 = make_tma_atom(SM90_TMA_LOAD{},
                              ext ? b_operand<T, kBNMajor>(g.b2, g.n, g.k2, g.ldb2)
                                  : b_operand<T, kBNMajor>(g.b, g.n, g.k, g.ldb),
                              smem_b, box_b);
  constexpr auto kernel = &ext_gemm_kernel<Cfg, decltype(tma_a), decltype(tma_b)>;
  return launch_on_tiles<kernel, int(sizeof(typename Cfg::Shared)), Cfg::kThreads>(
      tile_count(g.m, g.n), stream, tma_a, tma_a2, tma_b, tma_b2, g.m, g.n, g.k, g.k2,
      static_cast<const T*>(g.bias), static_cast<T*>(g.c), g.ldc);
}

template <typename T>
cudaError_t launch_majors(const ExtGemmArgs& g, cudaStream_t stream) {
  return g.b_n_major ? launch<T, true>(g, stream) : launch<T, false>(g, stream);
}

}  // namespace
}  // namespace sm90

using namespace sm90;

bool sm90_gemm_built() {
#if defined(EI_KERNELS_SM90A)
  return true;
#else
  return false;
#endif
}

// Everything CuTe's TMA descriptor encoding asserts on the host (an assert there would end
// the process), checked first so that the caller falls back instead.
bool sm90_gemm_accepts(DType dtype, const ExtGemmArgs& g) {
  if (!sm90_gemm_built() || dtype == DType::kFloat) return false;
  if (g.m <= 0 || g.n <= 0 || g.k <= 0 || g.k2 < 0) return false;
  // Rows of 16-bit values at 16-byte multiples, each at least as long as the row it holds.
  const auto rows_ok = [](int64_t ld, int64_t cols) { return ld % 8 == 0 && ld >= cols; };
  const int64_t b_cols = g.b_n_major ? g.n : g.k, b2_cols = g.b_n_major ? g.n : g.k2;
  const bool ext_ok = g.k2 == 0 || (aligned16(g.a2) && aligned16(g.b2) &&
                                    rows_ok(g.lda2, g.k2) && rows_ok(g.ldb2, b2_cols));
  return tile_count(g.m, g.n) <= INT32_MAX && ext_ok && aligned16(g.a) && aligned16(g.b) &&
         aligned16(g.c) && rows_ok(g.lda, g.k) && rows_ok(g.ldb, b_cols) &&
         rows_ok(g.ldc, g.n);
}

cudaError_t sm90_ext_gemm(DType dtype, const ExtGemmArgs& g, cudaStream_t stream) {
  return with_16bit_type(dtype, [&](auto type) {
    return launch_majors<decltype(type)>(g, stream);
  });
}

}  // namespace ei
