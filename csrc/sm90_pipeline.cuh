// What every sm_90a kernel of this backend shares (sm90_ext_gemm.cu, sm90_routed_forward.cu,
// sm90_routed_dgrad.cu; interface and semantics: sm90_gemm.h), written with CuTe (CUTLASS 3
// headers, from PyPI's nvidia-cutlass; none of CUTLASS's kernels are used): the tile
// configuration, the global views TMA descriptors are made from, the shared-memory ring
// between the TMA producer and the wgmma consumers, the tile count, the plain persistent walk
// (for_each_tile, the ext GEMM's), the epilogue's store and the routed kernels' branch bound.
//
// 128 x 192 output tiles, three warp groups per CTA (warp specialised; in the routed input
// gradient (sm90_routed_dgrad_warps.cuh) a fourth, the reducer, runs the token reductions'
// MMAs (dB's on the ring's dy tiles, d[A_cat; R]'s on x tiles loaded after each group's
// steps), and the producer warp group's warp 1 routes z for it while warps 2-3 lay out B's
// rows for g):
//   producer  one elected thread of warp 0 issues the TMA loads of every K step into a
//             shared-memory ring (5 stages; 4 in the routed kernels, whose extra tiles take
//             the room): for ext_gemm first the main reduction (A, B), then the extension (A2,
//             B2) through its own descriptors into the same ring, so the LoRA term costs one
//             more K step (k2 <= 64 at every MoR width; TMA fills the rest with zeros);
//   consumers two warp groups of 64 rows each run wgmma 64x192x16 on the ring, keeping one
//             batch of MMAs in flight (wait_group 1), and release each stage once the batch
//             reading it has retired.
// The epilogue adds the bias and stores pairs of columns straight from the accumulators.
// Persistent: one CTA per SM walks the tiles (for_each_tile here; sm90_walks.cuh has the
// routed kernels' walks), and since the ring runs on across tiles, the producer fills the
// next tile's stages while the consumers route and store the last one;
// EI_KERNELS_CUDA_SM90_PERSISTENT=0 (sm90_launch.cuh's persistent_tiles) launches one CTA per
// tile instead (the same code, each CTA's walk one tile long: to measure what persistence
// buys).
//
// Why 128 x 192: at ViT-B widths (768, 2304, 3072 output columns) and N = 12608 tokens it makes
// 3, 9 and 12 full waves of 132 tiles (H100/H200 SXM), where 128 x 128 leaves a last wave half
// empty; 40 KiB per stage keeps 5 stages in 200 KiB of shared memory.
//
// The kernels' bodies exist only in the sm_90a image (EI_SM90_DEVICE_CODE). Other targets
// compile a trapping stub with the same signature, which the host never launches
// (mor_kernels.cu asks the device first): a 9.0 device runs the sm_90a SASS. (Forcing the
// driver to JIT the compute_90 PTX instead, CUDA_FORCE_PTX_JIT=1, would reach the stub: set
// EI_KERNELS_CUDA_SM90=0 with it.)
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include <cstdint>

#if defined(CUTE_ARCH_MMA_SM90A_ENABLED) && defined(CUTE_ARCH_TMA_SM90_ENABLED)
#define EI_SM90_DEVICE_CODE 1
#endif

namespace ei {
namespace sm90 {

using namespace cute;
using Barrier = cutlass::arch::ClusterBarrier;  // the ring's barriers (mbarrier)
using TxBarrier = cutlass::arch::ClusterTransactionBarrier;

template <typename Element, bool kBNMajor, int kStageCount = 5>
struct Sm90Config {
  using T = Element;
  static constexpr int kBM = 128, kBN = 192, kBK = 64;  // kBK: one 128-byte swizzle atom
  using BM = Int<kBM>;
  using BN = Int<kBN>;
  using BK = Int<kBK>;
  static constexpr int kStages = kStageCount;
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

// Branches per group the routed kernels route (the paper has 3): their per-row arrays then
// stay in the registers left beside the 96 accumulators per thread (with mor_kernels.h's 16,
// the input gradient's routing spilled).
inline constexpr int kRoutedBranches = 4;

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

// The ring's barriers: `full` counts TMA bytes and the arrivals of those that fill a stage (the
// TMA thread, and the routed input gradient's B warps), `empty` the threads that finished reading
// a stage (the consumers, and the routed input gradient's reducer).
template <class Shared, int kStages>
__device__ void init_ring(Shared& smem, int consumers, int producers = 1) {
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      TxBarrier::init(&smem.full[s], producers);
      Barrier::init(&smem.empty[s], consumers);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
}

// A TMA copy's partitions (global source, shared destination) of a CTA's tile views, each
// [rows, cols, steps or stages] (no multicast).
template <class Tma, class Smem, class Gmem>
__device__ auto tma_split(const Tma& tma, const Smem& s, const Gmem& g) {
  return tma_partition(tma, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(s), group_modes<0, 2>(g));
}

// K step kt of a tma_split pair into ring stage `stage`, counted on barrier `full`.
template <class Tma, class Parts>
__device__ void copy_step(const Tma& tma, uint64_t& full, const Parts& parts, int kt, int stage) {
  copy(tma.with(full), get<0>(parts)(_, kt), get<1>(parts)(_, stage));
}

// The producer's side of the ring: K steps first..last-1, each into the next free stage, where
// load(kt, stage, barrier) issues that step's TMA copies (stage_bytes in all) on the stage's
// barrier. stage and phase carry on from call to call (one ring, several reductions, or one
// reduction in runs of steps that load different operands).
template <int kStages, class Shared, class Load>
__device__ __forceinline__ void fill_ring(Shared& smem, int first, int last,
                                          uint32_t stage_bytes, int& stage, int& phase,
                                          Load&& load) {
  for (int kt = first; kt < last; ++kt) {
    Barrier::wait(&smem.empty[stage], phase ^ 1);  // the first lap finds every stage free
    TxBarrier::arrive_and_expect_tx(&smem.full[stage], stage_bytes);
    load(kt, stage, smem.full[stage]);
    if (++stage == kStages) stage = 0, phase ^= 1;
  }
}

// The consumers' side: per K step, wait for the stage's bytes, issue mmas(stage) as one batch
// of wgmma, keep it in flight while the previous step's batch retires, then free that step's
// stage. fence() fences every accumulator the MMAs write. `reading` is the stage of the batch
// still in flight (-1: none), so that runs of steps with different MMAs follow one another
// without draining the pipeline in between; drain_done ends the last run.
template <int kStages, class Shared, class Mmas, class Fence>
__device__ __forceinline__ void drain_steps(Shared& smem, int steps, int& stage, int& phase,
                                            int& reading, Mmas&& mmas, Fence&& fence) {
  for (int step = 0; step < steps; ++step) {
    TxBarrier::wait(&smem.full[stage], phase);
    fence();
    warpgroup_arrive();
    mmas(stage);
    warpgroup_commit_batch();
    warpgroup_wait<1>();
    fence();
    if (reading >= 0) Barrier::arrive(&smem.empty[reading]);
    reading = stage;
    if (++stage == kStages) stage = 0, phase ^= 1;
  }
}

// After the last run of steps: every batch retires and its stage is released.
template <class Shared, class Fence>
__device__ __forceinline__ void drain_done(Shared& smem, int reading, Fence&& fence) {
  warpgroup_wait<0>();
  fence();
  if (reading >= 0) Barrier::arrive(&smem.empty[reading]);
}

// One reduction of `steps` K steps, all with the same MMAs: on return every batch has retired
// and the consumers have released every stage it read; stage and phase carry on to the next
// tile.
template <int kStages, class Shared, class Mmas, class Fence>
__device__ void drain_ring(Shared& smem, int steps, int& stage, int& phase, Mmas&& mmas,
                           Fence&& fence) {
  int reading = -1;
  drain_steps<kStages>(smem, steps, stage, phase, reading, mmas, fence);
  drain_done(smem, reading, fence);
}

// Output tiles of an m x n product in every config's 128 x 192 tiles (64-bit: the host
// refuses more than 2^31 - 1).
__host__ __device__ constexpr int64_t tile_count(int64_t m, int64_t n) {
  return (m + Sm90Config<cutlass::half_t, false>::kBM - 1) /
         Sm90Config<cutlass::half_t, false>::kBM *
         ((n + Sm90Config<cutlass::half_t, false>::kBN - 1) /
          Sm90Config<cutlass::half_t, false>::kBN);
}

// The output tiles a CTA computes: t = blockIdx.x, blockIdx.x + gridDim.x, ... of the
// row-major [row tiles, col_tiles] grid, so that the CTAs running together share row blocks
// of A (read from memory once); body(row tile, column tile, i) for the CTA's i-th tile. The
// host (sm90_launch.cuh's tile_ctas) launches one CTA per SM (persistent: the producer loads
// the next tile's stages while the consumers route and store the last one) or one per tile.
template <class Body>
__device__ void for_each_tile(int tiles, int col_tiles, Body&& body) {
  int i = 0;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x, ++i) {  // 64-bit: no wrap past 2^31
    body(int(t / col_tiles), int(t % col_tiles), i);
  }
}

// The epilogue: C = acc (+ bias) for the tile's rows below m and columns below n.
// Accumulator elements 2i and 2i+1 are neighbouring columns of one row: one 4-byte store
// (ldc and c are 16-byte aligned, so column pairs starting at even columns are 4-byte
// aligned).
template <typename T, class Acc, class Coords>
__device__ void store_tile(const Acc& acc, const Coords& tCcC, int m, int n, const T* bias, T* c,
                           int64_t ldc) {
  static_assert(size(Acc{}) % 2 == 0);
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
}

}  // namespace sm90
}  // namespace ei
