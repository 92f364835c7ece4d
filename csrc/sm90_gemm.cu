// The Hopper GEMM with a K-extension (interface and semantics: sm90_gemm.h), written with CuTe
// (CUTLASS 3 headers, from PyPI's nvidia-cutlass; none of CUTLASS's kernels are used).
//
// One CTA per 128 x 192 output tile, three warp groups (warp specialised):
//   producer  one elected thread of warp 0 issues the TMA loads of every K step into a
//             5-stage shared-memory ring: first the main reduction (A, B), then the extension
//             (A2, B2) through its own descriptors into the same ring, so the LoRA term costs
//             one more K step (k2 <= 64 at every MoR width; TMA fills the rest with zeros);
//   consumers two warp groups of 64 rows each run wgmma 64x192x16 on the ring, keeping one
//             batch of MMAs in flight (wait_group 1), and release each stage once the batch
//             reading it has retired.
// The epilogue adds the bias and stores pairs of columns straight from the accumulators.
//
// Why 128 x 192: at ViT-B widths (768, 2304, 3072 output columns) and N = 12608 tokens it makes
// 3, 9 and 12 full waves of 132 CTAs (H100/H200 SXM), where 128 x 128 leaves a last wave half
// empty; 40 KiB per stage keeps 5 stages in 200 KiB of shared memory.
//
// The body exists only in the sm_90a image. Other targets compile a trapping stub with the
// same signature, which the host never launches (mor_kernels.cu asks the device first): a
// 9.0 device runs the sm_90a SASS. (Forcing the driver to JIT the compute_90 PTX instead,
// CUDA_FORCE_PTX_JIT=1, would reach the stub: set EI_KERNELS_CUDA_SM90=0 with it.)
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "device_cache.h"
#include "sm90_gemm.h"

#if defined(CUTE_ARCH_MMA_SM90A_ENABLED) && defined(CUTE_ARCH_TMA_SM90_ENABLED)
#define EI_SM90_DEVICE_CODE 1
#endif

namespace ei {
namespace {

using namespace cute;

template <typename Element, bool kBNMajor>
struct Sm90Config {
  using T = Element;
  static constexpr int kBM = 128, kBN = 192, kBK = 64;  // kBK: one 128-byte swizzle atom
  using BM = Int<kBM>;
  using BN = Int<kBN>;
  using BK = Int<kBK>;
  static constexpr int kStages = 5;
  static constexpr int kConsumerThreads = 256;  // two warp groups
  static constexpr int kThreads = 128 + kConsumerThreads;
  static constexpr GMMA::Major kBMajor = kBNMajor ? GMMA::Major::MN : GMMA::Major::K;

  using SmemA = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                       Shape<BM, BK, Int<kStages>>{}));  // [BM, BK, stage]
  using SmemAtomB = std::conditional_t<kBNMajor, GMMA::Layout_MN_SW128_Atom<T>,
                                       GMMA::Layout_K_SW128_Atom<T>>;
  // An n-major atom is 64 columns by 8 k: tile along k first, as CUTLASS's own sm90 builder
  // does, so every stage is a whole number of swizzle patterns in both orders.
  using SmemB = decltype(tile_to_shape(SmemAtomB{}, Shape<BN, BK, Int<kStages>>{},
                                       std::conditional_t<kBNMajor, Step<_2, _1, _3>,
                                                          Step<_1, _2, _3>>{}));
  using Mma = decltype(make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, Shape<Int<64>, BN, BK>, GMMA::Major::K, kBMajor>(),
      Layout<Shape<_2, _1, _1>>{}));  // warp group w owns rows [64 w, 64 w + 64)

  struct Shared {
    alignas(1024) ArrayEngine<T, cosize_v<SmemA>> a;
    alignas(1024) ArrayEngine<T, cosize_v<SmemB>> b;
    alignas(8) uint64_t full[kStages];   // TMA bytes landed
    alignas(8) uint64_t empty[kStages];  // consumers done reading
  };
};

// [rows, cols] row-major with leading dimension ld, as CuTe's (row, col) tensor.
template <typename T>
auto row_major(const void* p, int rows, int cols, int64_t ld) {
  return make_tensor(make_gmem_ptr(static_cast<const T*>(p)), make_shape(rows, cols),
                     make_stride(ld, Int<1>{}));
}

// B as CuTe's (n, k) tensor: k-major is row-major [n, k]; n-major is row-major [k, n].
template <typename T, bool kBNMajor>
auto b_operand(const void* p, int n, int k, int64_t ld) {
  if constexpr (kBNMajor) {
    return make_tensor(make_gmem_ptr(static_cast<const T*>(p)), make_shape(n, k),
                       make_stride(Int<1>{}, ld));
  } else {
    return row_major<T>(p, n, k, ld);
  }
}

template <class Cfg, class TmaA, class TmaB>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    ext_gemm_kernel(CUTE_GRID_CONSTANT const TmaA tma_a, CUTE_GRID_CONSTANT const TmaA tma_a2,
                    CUTE_GRID_CONSTANT const TmaB tma_b, CUTE_GRID_CONSTANT const TmaB tma_b2,
                    int m, int n, int k, int k2, const typename Cfg::T* bias,
                    typename Cfg::T* c, int64_t ldc) {
#if defined(EI_SM90_DEVICE_CODE)
  using T = typename Cfg::T;
  using Barrier = cutlass::arch::ClusterBarrier;
  using TxBarrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kStages = Cfg::kStages;
  // What TMA writes per stage: whole boxes, also where they reach past the matrix (zeros)
  constexpr uint32_t kStageBytes = uint32_t((Cfg::kBM + Cfg::kBN) * Cfg::kBK * sizeof(T));
  extern __shared__ __align__(1024) char shared_bytes[];  // the 128-byte swizzle's period
  auto& smem = *reinterpret_cast<typename Cfg::Shared*>(shared_bytes);
  Tensor sA = make_tensor(make_smem_ptr(smem.a.begin()), typename Cfg::SmemA{});  // [BM,BK,P]
  Tensor sB = make_tensor(make_smem_ptr(smem.b.begin()), typename Cfg::SmemB{});  // [BN,BK,P]

  const auto tiler = Shape<typename Cfg::BM, typename Cfg::BN, typename Cfg::BK>{};
  const auto tile = make_coord(int(blockIdx.y), int(blockIdx.x), _);  // x walks columns: the
  // CTAs that run together share a row block of A, read once from memory
  const int k_steps = (k + Cfg::kBK - 1) / Cfg::kBK + (k2 + Cfg::kBK - 1) / Cfg::kBK;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      TxBarrier::init(&smem.full[s], 1);
      Barrier::init(&smem.empty[s], Cfg::kConsumerThreads);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (threadIdx.x < 128) {  // producer warp group: one thread issues every load
    if (threadIdx.x >= 32 || !elect_one_sync()) return;
    int stage = 0, phase = 0;
    // One pass over a reduction's K steps; a separate loop per reduction keeps every tensor in
    // registers (selecting between the two per step would put them in local memory).
    const auto load_steps = [&](const auto& tma_x, const auto& tma_w, int kx) {
      prefetch_tma_descriptor(tma_x.get_tma_descriptor());
      prefetch_tma_descriptor(tma_w.get_tma_descriptor());
      Tensor gX = local_tile(tma_x.get_tma_tensor(make_shape(m, kx)), tiler, tile,
                             Step<_1, X, _1>{});  // [BM, BK, k steps]
      Tensor gW = local_tile(tma_w.get_tma_tensor(make_shape(n, kx)), tiler, tile,
                             Step<X, _1, _1>{});  // [BN, BK, k steps]
      auto [tXg, tXs] = tma_partition(tma_x, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sA),
                                      group_modes<0, 2>(gX));
      auto [tWg, tWs] = tma_partition(tma_w, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sB),
                                      group_modes<0, 2>(gW));
      const int steps = (kx + Cfg::kBK - 1) / Cfg::kBK;
      for (int kt = 0; kt < steps; ++kt) {
        Barrier::wait(&smem.empty[stage], phase ^ 1);  // the first lap finds every stage free
        TxBarrier::arrive_and_expect_tx(&smem.full[stage], kStageBytes);
        copy(tma_x.with(smem.full[stage]), tXg(_, kt), tXs(_, stage));
        copy(tma_w.with(smem.full[stage]), tWg(_, kt), tWs(_, stage));
        if (++stage == kStages) stage = 0, phase ^= 1;
      }
    };
    load_steps(tma_a, tma_b, k);
    if (k2 > 0) load_steps(tma_a2, tma_b2, k2);
    return;
  }

  // Consumer warp groups.
  const int thread = int(threadIdx.x) - 128;
  typename Cfg::Mma mma;
  auto thr_mma = mma.get_thread_slice(thread);
  Tensor tCrA = thr_mma.make_fragment_A(thr_mma.partition_A(sA));  // smem descriptors
  Tensor tCrB = thr_mma.make_fragment_B(thr_mma.partition_B(sB));
  Tensor gC = local_tile(make_identity_tensor(make_shape(m, n)), tiler, tile,
                         Step<_1, _1, X>{});  // [BM, BN] of (row, col)
  Tensor tCcC = thr_mma.partition_C(gC);
  Tensor acc = thr_mma.partition_fragment_C(gC);  // fp32 accumulators
  clear(acc);

  int stage = 0, phase = 0, reading = -1;
  for (int step = 0; step < k_steps; ++step) {
    TxBarrier::wait(&smem.full[stage], phase);
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    gemm(mma, tCrA(_, _, _, stage), tCrB(_, _, _, stage), acc);
    warpgroup_commit_batch();
    warpgroup_wait<1>();  // the previous step's MMAs have retired: free its stage
    warpgroup_fence_operand(acc);
    if (reading >= 0) Barrier::arrive(&smem.empty[reading]);
    reading = stage;
    if (++stage == kStages) stage = 0, phase ^= 1;
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc);

  // Accumulator elements 2i and 2i+1 are neighbouring columns of one row: one 4-byte store
  // (ldc and c are 16-byte aligned, so column pairs starting at even columns are 4-byte
  // aligned).
  static_assert(size(decltype(acc){}) % 2 == 0);
  CUTE_UNROLL
  for (int i = 0; i < size(acc); i += 2) {
    const auto [row, col] = tCcC(i);
    if (row >= m || col >= n) continue;
    float v0 = acc(i), v1 = acc(i + 1);
    if (bias != nullptr) {
      v0 += float(bias[col]);
      if (col + 1 < n) v1 += float(bias[col + 1]);
    }
    T* out = c + int64_t(row) * ldc + col;
    if (col + 1 < n) {
      *reinterpret_cast<uint32_t*>(out) =
          uint32_t(T(v0).raw()) | uint32_t(T(v1).raw()) << 16;  // little-endian: v0 first
    } else {
      *out = T(v0);
    }
  }
#else
  (void)tma_a, (void)tma_a2, (void)tma_b, (void)tma_b2, (void)m, (void)n, (void)k, (void)k2;
  (void)bias, (void)c, (void)ldc;
#if defined(__CUDA_ARCH__)
  __trap();  // only the sm_90a image holds this kernel; the host never launches it elsewhere
#endif
#endif
}

// The opt-in to more than 48 KiB of dynamic shared memory, once per device and kernel (a plain
// attribute call: no stream work, so it is also safe during CUDA graph capture).
template <class Kernel>
cudaError_t allow_shared_memory(Kernel kernel, int bytes) {
  int device = 0, done = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cached_per_device(device, &done, [&](int* out) {
    *out = 1;
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  });
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
  auto* kernel = &ext_gemm_kernel<Cfg, decltype(tma_a), decltype(tma_b)>;
  constexpr int kSmem = int(sizeof(typename Cfg::Shared));
  cudaError_t err = allow_shared_memory(kernel, kSmem);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned((int64_t(g.n) + Cfg::kBN - 1) / Cfg::kBN),
                  unsigned((int64_t(g.m) + Cfg::kBM - 1) / Cfg::kBM));
  kernel<<<grid, Cfg::kThreads, kSmem, stream>>>(
      tma_a, tma_a2, tma_b, tma_b2, g.m, g.n, g.k, g.k2, static_cast<const T*>(g.bias),
      static_cast<T*>(g.c), g.ldc);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_majors(const ExtGemmArgs& g, cudaStream_t stream) {
  return g.b_n_major ? launch<T, true>(g, stream) : launch<T, false>(g, stream);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

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
  constexpr int kBM = Sm90Config<cutlass::half_t, false>::kBM;  // the same for every config
  const bool grid_ok = (int64_t(g.m) + kBM - 1) / kBM <= 65535;  // row tiles: grid.y
  return grid_ok && ext_ok && aligned16(g.a) && aligned16(g.b) && aligned16(g.c) &&
         rows_ok(g.lda, g.k) && rows_ok(g.ldb, b_cols) && rows_ok(g.ldc, g.n);
}

cudaError_t sm90_ext_gemm(DType dtype, const ExtGemmArgs& g, cudaStream_t stream) {
  switch (dtype) {
    case DType::kHalf:
      return launch_majors<cutlass::half_t>(g, stream);
    case DType::kBFloat16:
      return launch_majors<cutlass::bfloat16_t>(g, stream);
    case DType::kFloat:
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace ei
