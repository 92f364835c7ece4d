// The Hopper GEMM with a K-extension and the routed kernels built on it (interface and
// semantics: sm90_gemm.h), written with CuTe (CUTLASS 3 headers, from PyPI's nvidia-cutlass;
// none of CUTLASS's kernels are used).
//
// 128 x 192 output tiles, three warp groups per CTA (warp specialised; in the routed input
// gradient a fourth, the reducer, runs the token reductions' MMAs (dB's on the ring's dy
// tiles, d[A_cat; R]'s on x tiles loaded after each group's steps), and the producer warp
// group's warp 1 routes z for it while warps 2-3 lay out B's rows for g):
//   producer  one elected thread of warp 0 issues the TMA loads of every K step into a
//             shared-memory ring (5 stages; 4 in the routed kernels, whose extra tiles take
//             the room): for ext_gemm first the main reduction (A, B), then the extension (A2,
//             B2) through its own descriptors into the same ring, so the LoRA term costs one
//             more K step (k2 <= 64 at every MoR width; TMA fills the rest with zeros);
//   consumers two warp groups of 64 rows each run wgmma 64x192x16 on the ring, keeping one
//             batch of MMAs in flight (wait_group 1), and release each stage once the batch
//             reading it has retired.
// The epilogue adds the bias and stores pairs of columns straight from the accumulators.
// The routed forward runs in thread block clusters of column tiles of one row block, which
// share out its shrink and sum the partials through distributed shared memory; it walks its
// tiles in runs of one row block and group where x's row blocks in flight fit the L2, and a
// run's later tiles reuse its first tile's z (for_each_routed_tile).
// Persistent: one CTA per SM walks the tiles (for_each_tile; for_each_segment in the routed
// input gradient, which walks each tile group by group), and since the ring runs on
// across tiles, the producer fills the next tile's stages while the consumers route and
// store the last one; EI_KERNELS_CUDA_SM90_PERSISTENT=0 launches one CTA per tile instead
// (the same code, each CTA's walk one tile long: to measure what persistence buys).
//
// Why 128 x 192: at ViT-B widths (768, 2304, 3072 output columns) and N = 12608 tokens it makes
// 3, 9 and 12 full waves of 132 tiles (H100/H200 SXM), where 128 x 128 leaves a last wave half
// empty; 40 KiB per stage keeps 5 stages in 200 KiB of shared memory.
//
// The body exists only in the sm_90a image. Other targets compile a trapping stub with the
// same signature, which the host never launches (mor_kernels.cu asks the device first): a
// 9.0 device runs the sm_90a SASS. (Forcing the driver to JIT the compute_90 PTX instead,
// CUDA_FORCE_PTX_JIT=1, would reach the stub: set EI_KERNELS_CUDA_SM90=0 with it.)
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "dependent_launch.cuh"
#include "device_cache.h"
#include "routing_math.cuh"
#include "sm90_gemm.h"

#if defined(CUTE_ARCH_MMA_SM90A_ENABLED) && defined(CUTE_ARCH_TMA_SM90_ENABLED)
#define EI_SM90_DEVICE_CODE 1
#endif

namespace ei {
namespace {

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

// The most row tiles for which the routed input gradient writes the token reductions' partials
// per row tile (sm90_routed_dgrad_accepts).
constexpr int64_t kMaxRowTilePartials = 512;

// Branches per group the routed kernels route (the paper has 3): their per-row arrays then
// stay in the registers left beside the 96 accumulators per thread (with mor_kernels.h's 16,
// the input gradient's routing spilled).
constexpr int kRoutedBranches = 4;

// The routed forward (routed_gemm_kernel): the same tiles with one stage fewer, which makes
// room for the shrink's operands and the routing's tiles (208 KiB in all).
template <typename Element>
struct RoutedConfig : Sm90Config<Element, false, 4> {
  using Base = Sm90Config<Element, false, 4>;
  using T = Element;
  using typename Base::BM;
  using typename Base::BN;
  using typename Base::BK;
  using typename Base::SmemA;
  using typename Base::SmemB;
  static constexpr int kStages = Base::kStages;
  // Rows of A_cat and R one group reads per K step, and the rank columns of z: the shrink's
  // MMAs are 64x16 and 64x8, so r <= 16 and L <= 8 (the paper's 2/4/8 ranks: r = 14, L = 4).
  static constexpr int kRanks = 16, kLogits = 8;
  using Ranks = Int<kRanks>;
  using Logits = Int<kLogits>;
  static constexpr int kStagingLd = kRanks + kLogits + 1;  // +1: rows start in other banks
  // Registers per thread after the warp groups' setmaxnreg: 384 threads start at 168 each, and
  // the producer gives back what the consumers take (the routing and the cluster's exchange
  // after the main loop spilled at 168).
  static constexpr int kProducerRegisters = 40, kConsumerRegisters = 232;
  static_assert(kProducerRegisters + 2 * kConsumerRegisters <=
                3 * (65536 / Base::kThreads / 8 * 8));  // setmaxnreg counts in 8s

  using SmemU = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                       Shape<Ranks, BK, Int<kStages>>{}));  // [16, BK, stage]
  using SmemL = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                       Shape<Logits, BK, Int<kStages>>{}));  // [8, BK, stage]
  // The extension step's operands, k-major with 16 values (32 bytes) per row.
  using SmemZ = decltype(tile_to_shape(GMMA::Layout_K_SW32_Atom<T>{}, Shape<BM, Ranks>{}));
  using SmemLoraB = decltype(tile_to_shape(GMMA::Layout_K_SW32_Atom<T>{}, Shape<BN, Ranks>{}));
  template <int kN>
  using NarrowMma = decltype(make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, Shape<Int<64>, Int<kN>, BK>, GMMA::Major::K,
                           GMMA::Major::K>(),
      Layout<Shape<_2, _1, _1>>{}));
  using MmaU = NarrowMma<kRanks>;
  using MmaL = NarrowMma<kLogits>;

  struct Shared {
    alignas(1024) ArrayEngine<T, cosize_v<SmemA>> a;
    alignas(1024) ArrayEngine<T, cosize_v<SmemB>> b;
    alignas(1024) ArrayEngine<T, cosize_v<SmemU>> u;
    alignas(1024) ArrayEngine<T, cosize_v<SmemL>> l;
    alignas(1024) ArrayEngine<T, cosize_v<SmemZ>> z;
    alignas(1024) ArrayEngine<T, cosize_v<SmemLoraB>> lora_b;
    float staging[Base::kBM][kStagingLd];  // this CTA's partial [u | l] of the tile's rows
    float summed[Base::kBM][kStagingLd];   // the cluster's sum of them: [u | l] in fp32
    alignas(8) uint64_t full[kStages];
    alignas(8) uint64_t empty[kStages];
    alignas(8) uint64_t partials_ready;  // every CTA of the cluster staged its partials
    alignas(8) uint64_t partials_read;   // every CTA of the cluster summed this one's
  };
};

// The routed input gradient (routed_dgrad_kernel): the n-major tiles with one stage fewer,
// and a fourth warp group, the reducer, for dB.
template <typename Element>
struct RoutedDgradConfig : Sm90Config<Element, true, 4> {
  using Base = Sm90Config<Element, true, 4>;
  using T = Element;
  using typename Base::BM;
  using typename Base::BN;
  using typename Base::BK;
  using typename Base::SmemA;
  using typename Base::SmemB;
  static constexpr int kStages = Base::kStages;
  static constexpr int kReducerThreads = 128;  // one warp group: dB's 64x16 MMAs
  static constexpr int kThreads = Base::kThreads + kReducerThreads;
  static constexpr int kZThreads = 32;      // the producer warp group's warp 1
  static constexpr int kLoraBThreads = 64;  // its warps 2-3: B's rows into g's operand
  static_assert(32 + kZThreads + kLoraBThreads == 128,
                "the TMA warp, the z warp and the B warps make one warp group");
  // Registers per thread after the warp groups' setmaxnreg: 512 threads start at 128 each,
  // and the producer and the reducer give back what the consumers take (40 + 2 * 208 + 56 =
  // 4 * 128; at 200 ptxas spills the consumers).
  static constexpr int kProducerRegisters = 40, kConsumerRegisters = 208;
  static constexpr int kReducerRegisters = 56;
  static_assert(kProducerRegisters + 2 * kConsumerRegisters + kReducerRegisters <=
                4 * (65536 / kThreads));
  // r and L, each padded to one 16-deep K step of the extension (and g's MMA width).
  static constexpr int kRanks = 16;
  using Ranks = Int<kRanks>;
  static constexpr int kStagingLd = kRanks + 1;

  // The reducer's operands of dB's row-tile partial dy^T z: each ring stage's dy tile read
  // transposed (m = output column, k = tile row; the k-major 128-byte swizzle read the other
  // way is the m-major one: the same bytes), and z of the tile's rows (n = rank, k = row) in
  // two buffers, so that the z warp routes the next tile's while the reducer reads one.
  using SmemDyT = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{},
                                         Shape<BK, BM, Int<kStages>>{}));  // [BK, BM, stage]
  using SmemZ =
      decltype(tile_to_shape(GMMA::Layout_MN_SW32_Atom<T>{}, Shape<Ranks, BM, _2>{}));
  using MmaDb = decltype(make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, Shape<Int<64>, Ranks, Int<16>>, GMMA::Major::MN,
                           GMMA::Major::MN>()));

  // lora_b's rows of each K step as g's B operand: (n = rank, k = output), k-major, so that
  // the B warps' stores of consecutive outputs' values of one rank column are consecutive.
  // Each stage first holds the step's rows as copied (expand_lora_b).
  using SmemLoraB = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<T>{},
                                           Shape<Ranks, BK, Int<kStages>>{}));
  // The extension's B tiles, A_cat's and R's (n = input column, k = rank), n-major, in two
  // buffers: a persistent CTA's producer loads the next tile's while the consumers read these.
  using SmemExtB = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<T>{},
                                          Shape<BN, Ranks, _2>{}, Step<_2, _1, _3>{}));
  // du and dl of the tile's rows, the extension's A tiles, k-major.
  using SmemExtA = decltype(tile_to_shape(GMMA::Layout_K_SW32_Atom<T>{}, Shape<BM, Ranks>{}));
  // The same du and dl read transposed (n = rank, k = row: m-major), the reducer's B operand
  // of d[A_cat; R]'s row-tile partial x^T [du | dl]; its A operand is the x tile, which comes
  // through the ring's dy slots in kXChunks stages of BK columns, read transposed as dy^T is.
  using SmemExtAT =
      decltype(tile_to_shape(GMMA::Layout_MN_SW32_Atom<T>{}, Shape<Ranks, BM>{}));
  static constexpr int kXChunks = Base::kBN / Base::kBK;
  static_assert(kXChunks * Base::kBK == Base::kBN, "x's tile in whole stages");
  using MmaG = decltype(make_tiled_mma(
      GMMA::ss_op_selector<T, T, float, Shape<Int<64>, Ranks, BK>, GMMA::Major::K,
                           GMMA::Major::K>(),
      Layout<Shape<_2, _1, _1>>{}));

  struct Shared {
    alignas(1024) ArrayEngine<T, cosize_v<SmemA>> a;
    alignas(1024) ArrayEngine<T, cosize_v<SmemB>> b;
    alignas(1024) ArrayEngine<T, cosize_v<SmemLoraB>> lora_b;
    alignas(1024) ArrayEngine<T, cosize_v<SmemExtB>> lora_a;
    alignas(1024) ArrayEngine<T, cosize_v<SmemExtB>> router;
    alignas(1024) ArrayEngine<T, cosize_v<SmemExtA>> du;
    alignas(1024) ArrayEngine<T, cosize_v<SmemExtA>> dl;
    alignas(1024) ArrayEngine<T, cosize_v<SmemZ>> z;  // by the z warp, for the reducer
    float staging[Base::kBM][kStagingLd];  // g of the tile's rows in fp32
    float dl_rows[Base::kBM][kStagingLd];  // dl in fp32, for dc's per-block sums
    alignas(8) uint64_t full[kStages];
    alignas(8) uint64_t empty[kStages];
    alignas(8) uint64_t lora_b_copied[kStages];  // a step's rows of B landed, as copied
    alignas(8) uint64_t ext_full[2];   // the extension's B tiles landed
    alignas(8) uint64_t ext_empty[2];  // the consumers' extension MMAs read them
    alignas(8) uint64_t z_full[2];     // the z warp wrote a tile's z
    alignas(8) uint64_t z_empty[2];    // the reducer's MMAs read it
    alignas(8) uint64_t du_ready;      // the consumers routed a segment: du and dl are in place
    alignas(8) uint64_t du_free;       // the reducer's x^T [du | dl] MMAs read them
  };
};

// The reducer's m-major view of the ring's k-major dy tiles is the same swizzle over the same
// offsets with the first two modes swapped: the same bytes, read transposed.
template <class Cfg>
constexpr bool dy_view_is_transposed() {
  using A = typename Cfg::SmemA;
  using DyT = typename Cfg::SmemDyT;
  return std::is_same_v<decltype(A{}.layout_a()), decltype(DyT{}.layout_a())> &&
         std::is_same_v<decltype(A{}.offset()), decltype(DyT{}.offset())> &&
         std::is_same_v<decltype(select<1, 0, 2>(A{}.layout_b())), decltype(DyT{}.layout_b())>;
}
static_assert(dy_view_is_transposed<RoutedDgradConfig<cutlass::half_t>>());
static_assert(dy_view_is_transposed<RoutedDgradConfig<cutlass::bfloat16_t>>());

// The reducer's m-major view of du and dl reaches every (row, rank) at the bytes where the
// consumers' k-major extension operand holds it (both swizzles act on byte addresses; the
// buffers start at 1024-byte boundaries, beyond their period).
template <class Cfg>
constexpr bool du_view_is_transposed() {
  constexpr auto ext = typename Cfg::SmemExtA{};
  constexpr auto view = typename Cfg::SmemExtAT{};
  constexpr int kBytes = int(sizeof(typename Cfg::T));
  for (int row = 0; row < Cfg::kBM; ++row) {
    for (int j = 0; j < Cfg::kRanks; ++j) {
      if (ext.layout_a()(kBytes * int(ext.layout_b()(row, j))) !=
          view.layout_a()(kBytes * int(view.layout_b()(j, row)))) {
        return false;
      }
    }
  }
  return cosize_v<typename Cfg::SmemExtA> == cosize_v<typename Cfg::SmemExtAT>;
}
static_assert(du_view_is_transposed<RoutedDgradConfig<cutlass::half_t>>());
static_assert(du_view_is_transposed<RoutedDgradConfig<cutlass::bfloat16_t>>());

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
// host launches one CTA per SM (persistent: the producer loads the next tile's stages while
// the consumers route and store the last one) or one per tile.
template <class Body>
__device__ void for_each_tile(int tiles, int col_tiles, Body&& body) {
  int i = 0;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x, ++i) {  // 64-bit: no wrap past 2^31
    body(int(t / col_tiles), int(t % col_tiles), i);
  }
}

// The routed forward's walk over units of cs = cluster-size column tiles of one row block
// (rank r computes each unit's r-th tile). In runs (in_runs) the launch's clusters take equal
// shares (to a unit) of the row-major units, so that a CTA's next tile mostly lies in the row
// block and group of its last and reuses its z (no shrink, no routing); otherwise the units
// round-robin, for_each_tile's order, every tile a run of its own. A run starts at the CTA's
// first tile and wherever the row block or group changes (so the group's first column tile
// always starts one), the same for every CTA of a cluster (routed_walk_is_sound checks all
// this at compile time). 32-bit: the producer has 40 registers; tiles < 2^30, the host checks.
struct RoutedWalk {
  bool in_runs;
  int first, last, stride;  // the cluster's units
  __host__ __device__ constexpr RoutedWalk(int units, int clusters, int cluster, bool runs)
      : in_runs(runs),
        first(runs ? int(int64_t(units) * cluster / clusters) : cluster),
        last(runs ? int(int64_t(units) * (cluster + 1) / clusters) : units),
        stride(runs ? 1 : clusters) {}
  // Whether `unit`, whose tile for `rank` lies in column tile col, starts a run.
  __host__ __device__ constexpr bool starts_run(int unit, int col, int rank,
                                                int group_col_tiles) const {
    return !in_runs || unit == first || (col - rank) % group_col_tiles == 0;
  }
};

// body(row tile, column tile, i, starts_run) for the CTA's i-th tile of the walk. One loop for
// both orders: a second copy of the consumers' body (its MMAs) made ptxas serialise them and
// spill.
template <class Body>
__device__ void for_each_routed_tile(int tiles, int col_tiles, int group_col_tiles, bool in_runs,
                                     Body&& body) {
  const int cs = int(cute::cluster_shape().x), rank = int(cute::block_rank_in_cluster());
  const RoutedWalk walk(tiles / cs, int(gridDim.x) / cs, int(blockIdx.x) / cs, in_runs);
  int i = 0;
  for (int unit = walk.first; unit < walk.last; unit += walk.stride, ++i) {
    const int tile = unit * cs + rank, col = tile % col_tiles;
    body(tile / col_tiles, col, i, walk.starts_run(unit, col, rank, group_col_tiles));
  }
}

// The walk of every CTA of a launch of `ctas` (a multiple of cs) over row_tiles x col_tiles
// tiles (a multiple of cs; groups of group_col_tiles column tiles, which cs divides): every
// tile exactly once, every CTA of a cluster as many tiles and runs starting at the same
// steps, and the group's first column tile of every row block a run's start (where p and
// [u | l] are written).
constexpr bool routed_walk_is_sound(int row_tiles, int col_tiles, int group_col_tiles, int cs,
                                    int ctas, bool in_runs) {
  constexpr int kMaxTiles = 2048;
  int seen[kMaxTiles] = {};
  const int tiles = row_tiles * col_tiles;
  if (tiles > kMaxTiles || tiles % cs != 0 || ctas % cs != 0 || group_col_tiles % cs != 0) {
    return false;
  }
  for (int cluster = 0; cluster < ctas / cs; ++cluster) {
    const RoutedWalk walk(tiles / cs, ctas / cs, cluster, in_runs);
    for (int unit = walk.first; unit < walk.last; unit += walk.stride) {
      for (int rank = 0; rank < cs; ++rank) {
        const int tile = unit * cs + rank, col = tile % col_tiles;
        const bool starts = walk.starts_run(unit, col, rank, group_col_tiles);
        if (starts != walk.starts_run(unit, unit * cs % col_tiles, 0, group_col_tiles)) {
          return false;
        }
        if (col % group_col_tiles == 0 && !starts) return false;
        ++seen[tile];
      }
    }
  }
  for (int t = 0; t < tiles; ++t) {
    if (seen[t] != 1) return false;
  }
  return true;
}
// 12608 tokens (99 row tiles) at proj (4 column tiles), fc1 (16), qkv (3 groups of 4) on 132
// SMs in pairs or quads, or where fewer clusters fit (128 CTAs, 62 pairs); 4100 tokens at
// O = 1000 (6 column tiles); 333 tokens at O = 40 (3 tiles, fewer than SMs); one CTA per tile.
static_assert(routed_walk_is_sound(99, 4, 4, 2, 132, true));
static_assert(routed_walk_is_sound(99, 4, 4, 4, 128, true));
static_assert(routed_walk_is_sound(99, 16, 16, 2, 132, true));
static_assert(routed_walk_is_sound(99, 16, 16, 1, 132, true));
static_assert(routed_walk_is_sound(99, 12, 4, 2, 124, true));
static_assert(routed_walk_is_sound(99, 12, 4, 4, 132, true));
static_assert(routed_walk_is_sound(33, 6, 6, 2, 132, true));
static_assert(routed_walk_is_sound(3, 1, 1, 1, 3, true));
static_assert(routed_walk_is_sound(99, 12, 4, 2, 132, false));
static_assert(routed_walk_is_sound(99, 4, 4, 2, 396, true));

// The CTAs of a cluster (the routed forward's column tiles of one row block, which share
// out the shrink's K steps) exchange partial sums through distributed shared memory, with a
// pair of mbarriers per CTA that every CTA of the cluster arrives on once per run (per tile
// when walked round-robin). A fence before the arrivals releases, and the waits acquire, at
// cluster scope: one CTA's shared-memory writes or reads before its arrival are ordered
// before another's accesses after its wait. (sm_90a PTX: only that image compiles them.)
#if defined(EI_SM90_DEVICE_CODE)
__device__ void arrive_on_cluster(uint64_t* barrier, int cluster_size) {
  const uint32_t local = cute::cast_smem_ptr_to_uint(barrier);
  // One fence for all the arrivals (each releasing arrival would fence on its own).
  asm volatile("fence.acq_rel.cluster;" ::: "memory");
#pragma unroll 1  // at most 4 CTAs
  for (int rank = 0; rank < cluster_size; ++rank) {
    asm volatile(
        "{\n\t.reg .b32 remote;\n\t"
        "mapa.shared::cluster.u32 remote, %0, %1;\n\t"
        "mbarrier.arrive.relaxed.cluster.shared::cluster.b64 _, [remote];\n\t}"
        :
        : "r"(local), "r"(rank)
        : "memory");
  }
}

__device__ void wait_cluster(uint64_t* barrier, int parity) {
  const uint32_t local = cute::cast_smem_ptr_to_uint(barrier);
  asm volatile(
      "{\n\t.reg .pred done;\n\t"
      "WAIT:\n\t"
      "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 done, [%0], %1;\n\t"
      "@!done bra WAIT;\n\t}"
      :
      : "r"(local), "r"(parity)
      : "memory");
}

// The address of `local` (this CTA's shared memory) in the cluster's CTA `rank`, as a generic
// pointer (distributed shared memory).
__device__ const float* in_cluster_rank(const float* local, int rank) {
  uint64_t remote;
  asm volatile("mapa.u64 %0, %1, %2;" : "=l"(remote) : "l"(local), "r"(rank));
  return reinterpret_cast<const float*>(remote);
}

// kValues floats at `local` summed over the cluster's CTAs in rank order into `sum` (both in
// this CTA's shared memory), so that every CTA of the cluster gets the same bits. (Summed in
// place: the accumulators are live around it, and registers for the row would spill them.)
template <int kValues>
__device__ void sum_over_cluster(const float* local, float* sum, int cluster_size) {
  for (int rank = 0; rank < cluster_size; ++rank) {
    const float* const peer = in_cluster_rank(local, rank);
    CUTE_UNROLL
    for (int j = 0; j < kValues; ++j) sum[j] = rank == 0 ? peer[j] : sum[j] + peer[j];
  }
}
#endif  // EI_SM90_DEVICE_CODE

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

// What the routed forward reads and writes besides its TMA operands.
template <typename T>
struct RoutedPointers {
  const T* bias;         // [O] or null
  const T* lora_b;       // [O, r], read by plain loads (its rows are 2 r bytes: no TMA)
  const T* router_bias;  // [G*L] or null
  T* y;                  // [N, O]
  float* probs;          // [N, G*L]
  float* shrink;         // [N, S]: [u | l], kept for the backward
};

// One (row, group) of the routed forward: p and the coefficients from the fp32 [u | l] row of
// the staging tile, z's row into the extension operand (zeros past r), and, from the group's
// first column tile only, p and [u | l] to memory. Rows past the last token hold zeros (TMA
// filled x with them) and are not stored.
template <class Cfg, bool ROUTER, bool BYPASS, class SZ>
__device__ void route_row(const MorDims& d, int group, int row, int64_t token, bool keeps,
                          const RoutedPointers<typename Cfg::T>& ptr, const float* staged,
                          SZ& sZ) {
  using T = typename Cfg::T;
  const int logits = ROUTER ? d.logits : 0;
  static_assert(Cfg::kLogits >= kRoutedBranches + 1, "the logits tile holds every output");
  float p[kRoutedBranches + 1];
  float coef[kRoutedBranches];
#pragma unroll
  for (int i = 0; i < kRoutedBranches + 1; ++i) {
    if (i < logits) {
      p[i] = staged[Cfg::kRanks + i] +
             (ptr.router_bias ? float(ptr.router_bias[group * logits + i]) : 0.0f);
    }
  }
  if constexpr (ROUTER) softmax_in_place(logits, p);
  branch_coefficients<ROUTER, BYPASS>(d, p, coef);
  if (keeps && token < d.tokens) {
    const int gr = d.groups * d.rank;
    float* const kept = ptr.shrink + token * d.shrink_width();
    for (int j = 0; j < d.rank; ++j) kept[group * d.rank + j] = staged[j];
    float* const probs = ptr.probs + token * d.groups * logits + group * logits;
#pragma unroll
    for (int i = 0; i < kRoutedBranches + 1; ++i) {
      if (i < logits) {
        kept[gr + group * logits + i] = staged[Cfg::kRanks + i];
        probs[i] = p[i];
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kRoutedBranches; ++k) {
    if (k < d.branches) {
      for (int j = d.start[k]; j < d.start[k + 1]; ++j) sZ(row, j) = T(coef[k] * staged[j]);
    }
  }
  for (int j = d.rank; j < Cfg::kRanks; ++j) sZ(row, j) = T(0.0f);
}

// The forward with the shrink and the routing folded in (sm90_gemm.h). In a run's first tile
// each K step of the CTA's share also brings the group's 16 rows of A_cat and 8 rows of R into
// the ring, and the consumers run u = x A_cat^T and l = x R^T (64x16 and 64x8 MMAs) beside the
// main 64x192 one: no second read of x. After the main loop each consumer thread routes one
// row in fp32 and writes z into shared memory; the run's later tiles find it there. In every
// tile z B^T is the last K step. A tile's columns lie in one group (the host checks
// O / G % 192 == 0 when G > 1).
template <class Cfg, class TmaA, class TmaB, class TmaU, class TmaL>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    routed_gemm_kernel(CUTE_GRID_CONSTANT const TmaA tma_x, CUTE_GRID_CONSTANT const TmaB tma_w,
                       CUTE_GRID_CONSTANT const TmaU tma_lora_a,
                       CUTE_GRID_CONSTANT const TmaL tma_router, const MorDims d,
                       const RoutedPointers<typename Cfg::T> ptr, const bool in_runs) {
#if defined(EI_SM90_DEVICE_CODE)
  using T = typename Cfg::T;
  constexpr int kStages = Cfg::kStages;
  const int m = int(d.tokens), n = d.out_features, k = d.in_features, og = n / d.groups;
  const int col_tiles = (n + Cfg::kBN - 1) / Cfg::kBN;
  const int group_col_tiles = (og + Cfg::kBN - 1) / Cfg::kBN;
  const int tiles = int(tile_count(m, n));  // under 2^30: the host checks
  const int k_steps = (k + Cfg::kBK - 1) / Cfg::kBK;
  // The cluster's CTAs hold column tiles of one row block (the host sizes the cluster so) and
  // share out the shrink: this one multiplies its x tiles by [A_cat; R] in K steps
  // [shrink_first, shrink_last) only, and the partial sums meet in distributed shared memory.
  // Each CTA walks its K steps from shrink_first on (wrapping around), so that the steps with
  // the shrink come first.
  const int cluster_size = int(cute::cluster_shape().x);
  const int rank = int(cute::block_rank_in_cluster());
  const int shrink_first = k_steps * rank / cluster_size;
  const int shrink_last = k_steps * (rank + 1) / cluster_size;
  constexpr uint32_t kMainBytes = uint32_t((Cfg::kBM + Cfg::kBN) * Cfg::kBK * sizeof(T));
  constexpr uint32_t kShrinkBytes =
      uint32_t((Cfg::kRanks + Cfg::kLogits) * Cfg::kBK * sizeof(T));
  extern __shared__ __align__(1024) char shared_bytes[];
  auto& smem = *reinterpret_cast<typename Cfg::Shared*>(shared_bytes);
  Tensor sA = make_tensor(make_smem_ptr(smem.a.begin()), typename Cfg::SmemA{});  // [BM,BK,P]
  Tensor sB = make_tensor(make_smem_ptr(smem.b.begin()), typename Cfg::SmemB{});  // [BN,BK,P]
  Tensor sU = make_tensor(make_smem_ptr(smem.u.begin()), typename Cfg::SmemU{});  // [16,BK,P]
  Tensor sL = make_tensor(make_smem_ptr(smem.l.begin()), typename Cfg::SmemL{});  // [8,BK,P]
  Tensor sZ = make_tensor(make_smem_ptr(smem.z.begin()), typename Cfg::SmemZ{});  // [BM, 16]
  Tensor sLoraB = make_tensor(make_smem_ptr(smem.lora_b.begin()),
                              typename Cfg::SmemLoraB{});  // [BN, 16]

  const auto tiler = Shape<typename Cfg::BM, typename Cfg::BN, typename Cfg::BK>{};
  init_ring<typename Cfg::Shared, kStages>(smem, Cfg::kConsumerThreads);
  if (threadIdx.x == 0) {  // one arrival per CTA of the cluster and run
    // (CuTe's initialize_barrier: cutlass's Barrier::init asserts on a count it cannot see)
    initialize_barrier(smem.partials_ready, cluster_size);
    initialize_barrier(smem.partials_read, cluster_size);
    cutlass::arch::fence_barrier_init();
  }
  cute::cluster_sync();  // every CTA's barriers are set before any peer arrives on them

  if (threadIdx.x < 128) {  // producer warp group: one thread issues every load
    cutlass::arch::warpgroup_reg_dealloc<Cfg::kProducerRegisters>();
    if (threadIdx.x >= 32 || !elect_one_sync()) return;
    prefetch_tma_descriptor(tma_x.get_tma_descriptor());
    prefetch_tma_descriptor(tma_w.get_tma_descriptor());
    prefetch_tma_descriptor(tma_lora_a.get_tma_descriptor());
    prefetch_tma_descriptor(tma_router.get_tma_descriptor());
    // Without a router the last descriptor reads lora_a's first rows, and the logits it
    // yields are never used: the l MMA then runs on defined values with no branch in the main
    // loop (a branch around a wgmma makes ptxas close the batch and wait for it every step).
    const int router_rows = d.router ? d.groups * d.logits : d.groups * d.rank;
    int stage = 0, phase = 0;
    for_each_routed_tile(tiles, col_tiles, group_col_tiles, in_runs, [&](int row, int col, int,
                                                                        bool starts_run) {
      const auto tile = make_coord(row, col, _);
      const int group = col * Cfg::kBN / og;
      Tensor gX = local_tile(tma_x.get_tma_tensor(make_shape(m, k)), tiler, tile,
                             Step<_1, X, _1>{});  // [BM, BK, k steps]
      Tensor gW = local_tile(tma_w.get_tma_tensor(make_shape(n, k)), tiler, tile,
                             Step<X, _1, _1>{});  // [BN, BK, k steps]
      // The group's rows: from row g r of A_cat and g L of R (TMA fills past the end with 0)
      Tensor gU = local_tile(
          domain_offset(make_coord(group * d.rank, 0),
                        tma_lora_a.get_tma_tensor(make_shape(d.groups * d.rank, k))),
          Shape<typename Cfg::Ranks, typename Cfg::BK>{}, make_coord(0, _));  // [16, BK, k]
      Tensor gL = local_tile(
          domain_offset(make_coord(d.router ? group * d.logits : 0, 0),
                        tma_router.get_tma_tensor(make_shape(router_rows, k))),
          Shape<typename Cfg::Logits, typename Cfg::BK>{}, make_coord(0, _));  // [8, BK, k]
      auto tX = tma_split(tma_x, sA, gX);
      auto tW = tma_split(tma_w, sB, gW);
      auto tU = tma_split(tma_lora_a, sU, gU);
      auto tL = tma_split(tma_router, sL, gL);
      // K steps from shrink_first on, wrapping around (a run's later tiles too: every tile
      // then sums its K steps in the same order, whichever tile starts a run)
      const auto load_main = [&](int kt, int at, uint64_t& full) {
        if (kt >= k_steps) kt -= k_steps;
        copy_step(tma_x, full, tX, kt, at);
        copy_step(tma_w, full, tW, kt, at);
      };
      const int main_first = starts_run ? shrink_last : shrink_first;
      if (starts_run) {
        fill_ring<kStages>(smem, shrink_first, shrink_last, kMainBytes + kShrinkBytes, stage,
                           phase, [&](int kt, int at, uint64_t& full) {
                             load_main(kt, at, full);
                             copy_step(tma_lora_a, full, tU, kt, at);
                             copy_step(tma_router, full, tL, kt, at);
                           });
      }
      fill_ring<kStages>(smem, main_first, shrink_first + k_steps, kMainBytes, stage, phase,
                         load_main);
    });
    return;
  }

  // Consumer warp groups.
  cutlass::arch::warpgroup_reg_alloc<Cfg::kConsumerRegisters>();
  const int thread = int(threadIdx.x) - 128;
  typename Cfg::Mma mma;
  typename Cfg::MmaU mma_u;
  typename Cfg::MmaL mma_l;
  auto thr_mma = mma.get_thread_slice(thread);
  auto thr_u = mma_u.get_thread_slice(thread);
  auto thr_l = mma_l.get_thread_slice(thread);
  Tensor tCrA = thr_mma.make_fragment_A(thr_mma.partition_A(sA));  // smem descriptors
  Tensor tCrB = thr_mma.make_fragment_B(thr_mma.partition_B(sB));
  Tensor tUrA = thr_u.make_fragment_A(thr_u.partition_A(sA));
  Tensor tUrB = thr_u.make_fragment_B(thr_u.partition_B(sU));
  Tensor tLrA = thr_l.make_fragment_A(thr_l.partition_A(sA));
  Tensor tLrB = thr_l.make_fragment_B(thr_l.partition_B(sL));
  Tensor tZrA = thr_mma.make_fragment_A(thr_mma.partition_A(sZ));
  Tensor tZrB = thr_mma.make_fragment_B(thr_mma.partition_B(sLoraB));
  Tensor acc = thr_mma.partition_fragment_C(
      make_identity_tensor(Shape<typename Cfg::BM, typename Cfg::BN>{}));  // fp32 accumulators
  const auto tile_u = make_identity_tensor(Shape<typename Cfg::BM, typename Cfg::Ranks>{});
  const auto tile_l = make_identity_tensor(Shape<typename Cfg::BM, typename Cfg::Logits>{});
  Tensor acc_u = thr_u.partition_fragment_C(tile_u);  // [u] of the tile's rows
  Tensor acc_l = thr_l.partition_fragment_C(tile_l);  // [l]
  const Tensor tUc = thr_u.partition_C(tile_u);
  const Tensor tLc = thr_l.partition_C(tile_l);

  int stage = 0, phase = 0;
  int exchanges = 0;  // the cluster's exchanges of [u | l] so far: one per run
  for_each_routed_tile(tiles, col_tiles, group_col_tiles, in_runs, [&](int row_tile, int col,
                                                                      int i, bool starts_run) {
    const int n0 = col * Cfg::kBN, group = n0 / og;
    // The tile's rows of lora_b, zero-padded to 16 columns: all loads first, two values to a
    // register (so that they are in flight together without spilling), stored once both warp
    // groups' last extension MMA has read the previous tile's.
    constexpr int kPairs = Cfg::kBN * Cfg::kRanks / 2 / Cfg::kConsumerThreads;  // 6
    static_assert(kPairs * 2 * Cfg::kConsumerThreads == Cfg::kBN * Cfg::kRanks);
    const auto lora_b_at = [&](int o, int j) {
      return o < n && j < d.rank ? ptr.lora_b[int64_t(o) * d.rank + j].raw() : uint16_t(0);
    };
    uint32_t pairs[kPairs];
    CUTE_UNROLL
    for (int v = 0; v < kPairs; ++v) {
      const int idx = 2 * (thread + v * Cfg::kConsumerThreads);
      const int o = n0 + idx / Cfg::kRanks, j = idx % Cfg::kRanks;
      pairs[v] = uint32_t(lora_b_at(o, j)) | uint32_t(lora_b_at(o, j + 1)) << 16;
    }
    clear(acc);
    clear(acc_u);
    clear(acc_l);
    if (i > 0) cutlass::arch::NamedBarrier::sync(Cfg::kConsumerThreads, 1);
    CUTE_UNROLL
    for (int v = 0; v < kPairs; ++v) {
      const int idx = 2 * (thread + v * Cfg::kConsumerThreads);
      const int r = idx / Cfg::kRanks, j = idx % Cfg::kRanks;
      sLoraB(r, j) = T::bitcast(uint16_t(pairs[v] & 0xffffu));
      sLoraB(r, j + 1) = T::bitcast(uint16_t(pairs[v] >> 16));
    }
    // The main loop in two runs of K steps: this CTA's share, where the shrink's MMAs join
    // the batches, then the rest (a branch around them inside one loop would split every
    // batch; with the share in the middle, ptxas serialised the batches: C7515).
    const auto main_mma = [&](int at) { gemm(mma, tCrA(_, _, _, at), tCrB(_, _, _, at), acc); };
    const auto fence = [&] {
      warpgroup_fence_operand(acc);
      warpgroup_fence_operand(acc_u);
      warpgroup_fence_operand(acc_l);
    };
    int reading = -1;
    const int shrink_steps = starts_run ? shrink_last - shrink_first : 0;  // none: z is there
    drain_steps<kStages>(
        smem, shrink_steps, stage, phase, reading,
        [&](int at) {
          main_mma(at);
          gemm(mma_u, tUrA(_, _, _, at), tUrB(_, _, _, at), acc_u);
          gemm(mma_l, tLrA(_, _, _, at), tLrB(_, _, _, at), acc_l);
        },
        fence);
    drain_steps<kStages>(smem, k_steps - shrink_steps, stage, phase, reading, main_mma, fence);
    drain_done(smem, reading, fence);

    // A run's first tile: this CTA's partial [u | l] to the staging tile (in a cluster, once
    // every peer has summed the last run's); then one thread per row sums the cluster's
    // partials and routes the row into z, which the run's later tiles use as they find it.
    const bool clustered = cluster_size > 1;  // alone, a CTA routes its own staging directly
    if (starts_run) {
      if (clustered && exchanges > 0) wait_cluster(&smem.partials_read, (exchanges - 1) & 1);
      CUTE_UNROLL
      for (int v = 0; v < size(acc_u); ++v) {
        const auto [r, c] = tUc(v);
        smem.staging[r][c] = acc_u(v);
      }
      CUTE_UNROLL
      for (int v = 0; v < size(acc_l); ++v) {
        const auto [r, c] = tLc(v);
        smem.staging[r][Cfg::kRanks + c] = acc_l(v);
      }
      // The consumers' own barrier (user id 1: hardware barrier 9; barrier 0 is __syncthreads).
      cutlass::arch::NamedBarrier::sync(Cfg::kConsumerThreads, 1);
      if (clustered && thread == 0) arrive_on_cluster(&smem.partials_ready, cluster_size);
      if (thread < Cfg::kBM) {
        const int64_t token = int64_t(row_tile) * Cfg::kBM + thread;
        const bool keeps = n0 % og == 0;  // the group's first column tile
        const float* staged = smem.staging[thread];
        if (clustered) {
          wait_cluster(&smem.partials_ready, exchanges & 1);
          sum_over_cluster<Cfg::kRanks + Cfg::kLogits>(staged, smem.summed[thread], cluster_size);
          staged = smem.summed[thread];
          // The routing warp group's own barrier (user id 2): every row is summed, so the peers
          // may overwrite their staging. Said before the routing's global stores, which the
          // release fence would otherwise wait for.
          cutlass::arch::NamedBarrier::sync(Cfg::kBM, 2);
          if (thread == 0) arrive_on_cluster(&smem.partials_read, cluster_size);
        }
        if (!d.router) {
          route_row<Cfg, false, false>(d, group, thread, token, keeps, ptr, staged, sZ);
        } else if (d.bypass) {
          route_row<Cfg, true, true>(d, group, thread, token, keeps, ptr, staged, sZ);
        } else {
          route_row<Cfg, true, false>(d, group, thread, token, keeps, ptr, staged, sZ);
        }
      }
      ++exchanges;
    }
    // z and lora_b: written by threads, read by wgmma
    cutlass::arch::fence_view_async_shared();
    cutlass::arch::NamedBarrier::sync(Cfg::kConsumerThreads, 1);

    // The extension: acc += z B^T, one 64x192x16 MMA per warp group.
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    gemm(mma, tZrA, tZrB, acc);
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc);
    Tensor gC = local_tile(make_identity_tensor(make_shape(m, n)), tiler,
                           make_coord(row_tile, col, _), Step<_1, _1, X>{});  // [BM, BN]
    store_tile(acc, thr_mma.partition_C(gC), m, n, ptr.bias, ptr.y, int64_t(n));
  });
  // A CTA's shared memory ends with it: stay until every peer has read the last partials.
  if (cluster_size > 1 && exchanges > 0) wait_cluster(&smem.partials_read, (exchanges - 1) & 1);
#else
  (void)tma_x, (void)tma_w, (void)tma_lora_a, (void)tma_router, (void)d, (void)ptr, (void)in_runs;
#if defined(__CUDA_ARCH__)
  __trap();
#endif
#endif
}

// What the routed input gradient reads and writes besides its TMA operands.
template <typename T>
struct RoutedDgradPointers {
  const T* lora_b;     // [O, r], by bulk copies of each K step's rows (expand_lora_b)
  const float* u;      // [N, u_ld]: u = x A_cat^T in fp32 (the forward's [u | l], or recomputed)
  int64_t u_ld;
  const float* probs;  // [N, G*L]
  T* dx;               // [N, K]
  // Where x is folded in: [row tiles, S, K], each row tile's [du | dl]^T x for d[A_cat; R],
  // and d_shrink null; else null, and d_shrink [N, shrink_ld()] gets [du | dl] for a split-K
  // launch of its own.
  float* shrink_partial;
  T* d_shrink;
  float* dl_partial;   // [row tiles, G*L]: each tile's fp32 sums of dl, for dc
  float* lora_b_partial;  // [row tiles, O, r]: each row tile's dy^T z, for dB
};

// One (row, group) of the routed input gradient: du and dl from u, p and the fp32 g of the
// staging tile, into the extension's A tiles (zeros past r and L, and for rows past the last
// token) and dl to dl_row in fp32; into `kept` too (the row's [du | dl] in d_shrink) unless
// null.
template <class Cfg, bool ROUTER, bool BYPASS, class SA>
__device__ void route_dgrad_row(const MorDims& d, int group, int row, int64_t token,
                                typename Cfg::T* kept,
                                const RoutedDgradPointers<typename Cfg::T>& ptr,
                                const float* staged, float* dl_row, SA& sDu, SA& sDl) {
  using T = typename Cfg::T;
  const int logits = ROUTER ? d.logits : 0;
  for (int j = 0; j < Cfg::kRanks; ++j) {
    sDu(row, j) = T(0.0f);
    sDl(row, j) = T(0.0f);
    dl_row[j] = 0.0f;
  }
  if (token >= d.tokens) return;
  route_backward_values<ROUTER, BYPASS, kRoutedBranches>(
      d, ptr.u + token * ptr.u_ld + group * d.rank, staged,
      ptr.probs + (token * d.groups + group) * logits,
      [](int, float) {},  // z: route_z's (the z warp), from u and p alone
      [&](int j, float v) {
        sDu(row, j) = T(v);
        if (kept) kept[group * d.rank + j] = T(v);
      },
      [&](int i, float v) {
        sDl(row, i) = T(v);
        dl_row[i] = v;
        if (kept) kept[d.groups * d.rank + group * logits + i] = T(v);
      });
}

// The K steps of a tile's group (segment) `group`: each group's outputs fill whole steps when
// G > 1 (the host checks O / G % 64 == 0), so group g owns steps [g s, (g + 1) s).
struct GroupSteps {
  int first, last;
  __device__ GroupSteps(int group, int groups, int k_steps) {
    const int per_group = k_steps / groups;
    first = group * per_group;
    last = first + per_group;
  }
};

// The routed input gradient's walk: CTA b's s-th tile is b * per_cta + s * stride, for
// s < steps and below `tiles`: round-robin (for_each_tile's order: per_cta 1, stride the
// grid) or in runs (one group only: per_cta = steps = the tiles per CTA, stride 1), where a
// CTA's next tile mostly lies in its last one's row block and its g, du and dl are the last
// one's. Kernel parameters: read from the constant bank, they take no registers.
struct SegmentWalk {
  int per_cta, stride, steps;
  int tiles;  // all of the launch's
  // Whether the CTA's tile of step `step`, in column tile col, computes its g and routes:
  // everywhere but where the CTA's last tile, just before, lay in the same row block (one
  // group).
  __host__ __device__ constexpr bool starts_run(int step, int col, int groups) const {
    return stride != 1 || groups > 1 || step == 0 || col == 0;
  }
};

// The walk and the CTAs of a launch over `tiles` tiles on at most `ctas` CTAs, round-robin
// or in runs (as many CTAs as runs of tiles / ctas, rounded up, take).
struct SegmentLaunch {
  SegmentWalk walk;
  int ctas;
};
__host__ __device__ constexpr SegmentLaunch segment_launch(int tiles, int ctas, bool runs) {
  if (!runs) return SegmentLaunch{SegmentWalk{1, ctas, INT32_MAX, tiles}, ctas};
  const int per_cta = (tiles + ctas - 1) / ctas;
  return SegmentLaunch{SegmentWalk{per_cta, 1, per_cta, tiles}, (tiles + per_cta - 1) / per_cta};
}

// body(row tile, column tile, group, segment, starts_run) for each of the CTA's tiles, group
// by group, where segment counts the CTA's (tile, group) pairs (its double buffers alternate
// per segment). The segment is the loop's only register state, in 32 bits (the host checks
// tiles < 2^30): the z warp has 40 registers, and with more loop state (for_each_tile's 64-bit
// loop around a group loop, a bound of its own, or a tile and a group) it spilled (4 bytes
// with the tile count in a register).
template <class Body>
__device__ void for_each_segment(int col_tiles, int groups, const SegmentWalk walk,
                                 Body&& body) {
  for (int segment = 0;; ++segment) {
    const int step = segment / groups;
    const int tile = int(blockIdx.x) * walk.per_cta + step * walk.stride;
    if (step >= walk.steps || tile >= walk.tiles) return;
    const int col = tile % col_tiles;
    body(tile / col_tiles, col, segment % groups, segment, walk.starts_run(step, col, groups));
  }
}

// The walk of every CTA of segment_launch(row_tiles x col_tiles, ctas, runs) with one group:
// every tile exactly once, and a tile that does not compute its g right after the same CTA's
// tile to its left (the same row block).
constexpr bool segment_walk_is_sound(int row_tiles, int col_tiles, int ctas, bool runs) {
  constexpr int kMaxTiles = 2048;
  int seen[kMaxTiles] = {};
  const int tiles = row_tiles * col_tiles;
  if (tiles > kMaxTiles) return false;
  const SegmentLaunch launch = segment_launch(tiles, ctas, runs);
  for (int cta = 0; cta < launch.ctas; ++cta) {
    int last = -1;
    for (int step = 0; step < launch.walk.steps; ++step) {
      const int tile = cta * launch.walk.per_cta + step * launch.walk.stride;
      if (tile >= tiles) break;
      const int col = tile % col_tiles;
      if (!launch.walk.starts_run(step, col, 1) && (last != tile - 1 || col == 0)) return false;
      ++seen[tile];
      last = tile;
    }
  }
  for (int t = 0; t < tiles; ++t) {
    if (seen[t] != 1) return false;
  }
  return true;
}
// 12608 tokens (99 row tiles) at proj's and fc1's 4 column tiles and fc2's 16, on 132 SMs and
// 114 (an H100 PCIe's); odd sizes; one CTA per tile; round-robin.
static_assert(segment_walk_is_sound(99, 4, 132, true));
static_assert(segment_walk_is_sound(99, 16, 132, true));
static_assert(segment_walk_is_sound(99, 16, 114, true));
static_assert(segment_walk_is_sound(99, 4, 114, true));
static_assert(segment_walk_is_sound(3, 1, 132, true));
static_assert(segment_walk_is_sound(33, 6, 132, true));
static_assert(segment_walk_is_sound(99, 4, 396, true));
static_assert(segment_walk_is_sound(99, 16, 132, false));
static_assert(segment_walk_is_sound(7, 3, 1, false));

// The producer warp group's warp 1 (the z warp) routes z for the reducer, one segment (a
// tile's group) ahead in two buffers: z = (p S) u of each tile row and the group, from the
// saved u and p (zeros past r and the last token, and where the column tile has no K step of
// the group to share). Its global loads thus delay nobody; it first asks L1 for the lines of
// all its rows (their first values: prefetching more spilled), so that their latencies overlap
// (a thread routes 4 rows one after the other).
template <class Cfg, bool ROUTER, bool BYPASS, class Shared>
__device__ void route_z(Shared& smem, const MorDims& d,
                        const RoutedDgradPointers<typename Cfg::T>& ptr, int col_tiles,
                        int k_steps, const SegmentWalk walk) {
  using T = typename Cfg::T;
  const int thread = int(threadIdx.x) - 32;
  const int logits = ROUTER ? d.logits : 0;
  Tensor sZ = make_tensor(make_smem_ptr(smem.z.begin()), typename Cfg::SmemZ{});  // [16,BM,2]
  const auto prefetch = [](const float* p) {
    asm volatile("prefetch.global.L1 [%0];" ::"l"(p));
  };
  for_each_segment(col_tiles, d.groups, walk, [&](int row_tile, int col, int group,
                                                            int segment, bool) {
    const int buffer = segment & 1;
    // The tile's rows that hold a token (32 bits: the host admits at most 65536 tokens), none
    // where the column tile has no share of the group's steps (kt % col_tiles == col: the
    // reducer's split of dB's work)
    const GroupSteps steps(group, d.groups, k_steps);
    const bool shares = steps.first + (col - steps.first % col_tiles + col_tiles) % col_tiles <
                        steps.last;
    const int rows = shares ? min(Cfg::kBM, int(d.tokens) - row_tile * Cfg::kBM) : 0;
    // Row `row`'s u (the group's r columns) and p (its L)
    const auto u_of = [&](int row) {
      return ptr.u + int64_t(row_tile * Cfg::kBM + row) * ptr.u_ld + group * d.rank;
    };
    const auto p_of = [&](int row) {
      return ptr.probs + (int64_t(row_tile * Cfg::kBM + row) * d.groups + group) * logits;
    };
    for (int row = thread; row < rows; row += Cfg::kZThreads) {  // each row's first values
      prefetch(u_of(row));
      if (ROUTER) prefetch(p_of(row));
    }
    Barrier::wait(&smem.z_empty[buffer], ((segment >> 1) & 1) ^ 1);  // at first: free
    for (int row = thread; row < Cfg::kBM; row += Cfg::kZThreads) {
      const bool real = row < rows;
      float p[kRoutedBranches + 1];
      if constexpr (ROUTER) {
        CUTE_UNROLL
        for (int e = 0; e < kRoutedBranches + 1; ++e) {
          if (e < logits) p[e] = real ? p_of(row)[e] : 0.0f;
        }
      }
      float coef[kRoutedBranches];
      branch_coefficients<ROUTER, BYPASS>(d, p, coef);
#pragma unroll 4  // fully unrolled, the warps spill (the row's later loads hit L1)
      for (int j = 0; j < Cfg::kRanks; ++j) {
        float c = 0.0f;  // coef of rank column j's branch (zero past r)
        CUTE_UNROLL
        for (int k = 0; k < kRoutedBranches; ++k) {
          if (k < d.branches && j >= d.start[k] && j < d.start[k + 1]) c = coef[k];
        }
        const float v = real && j < d.rank ? u_of(row)[j] : 0.0f;
        sZ(j, row, buffer) = T(c * v);
      }
    }
    cutlass::arch::fence_view_async_shared();  // z: written by threads, read by wgmma
    Barrier::arrive(&smem.z_full[buffer]);
  });
}

// Where g's B operand (SmemLoraB: n = rank, k = output, k-major, 128-byte swizzle) holds rank
// column j's value of the stage's output row o: 64 outputs per column, their 16-byte chunks
// permuted by j % 8. Checked below against CuTe's layout, whose swizzle acts on the byte
// address (the stages start at 1024-byte boundaries, its period).
__host__ __device__ constexpr int lora_b_offset(int j, int o) {
  return 64 * j + 8 * ((o / 8) ^ (j % 8)) + o % 8;
}

template <class Cfg>
constexpr bool lora_b_offsets_match() {
  constexpr auto layout = typename Cfg::SmemLoraB{};
  constexpr int kBytes = int(sizeof(typename Cfg::T));
  for (int s = 0; s < Cfg::kStages; ++s) {
    for (int o = 0; o < Cfg::kBK; ++o) {
      for (int j = 0; j < Cfg::kRanks; ++j) {
        const int byte = int(layout.layout_a()(kBytes * int(layout.layout_b()(j, o, s))));
        if (byte != kBytes * (s * Cfg::kRanks * Cfg::kBK + lora_b_offset(j, o))) return false;
      }
    }
  }
  return true;
}
static_assert(lora_b_offsets_match<RoutedDgradConfig<cutlass::half_t>>());
static_assert(lora_b_offsets_match<RoutedDgradConfig<cutlass::bfloat16_t>>());

// The producer warp group's warps 2-3 (the B warps) put each K step's rows of B into g's
// operand, zero-padded to 16 columns and past the last output. B's rows are 2 r bytes (28 for
// the paper's ranks), which TMA's tensor copies cannot load (they take rows of 16-byte
// multiples), and a padded copy would cost a launch of its own. But a step's rows are one
// contiguous run of 128 r bytes: the TMA thread copies them as they are into the stage (a bulk
// copy, counted on lora_b_copied), and these warps rearrange them in place. Thread t reads
// row t (rows r values apart: no bank conflicts for the paper's r = 14, eight-way for r = 16)
// and, once all have read, stores them (two threads to a word: no conflicts); one lane per warp
// then arrives on the stage's `full` barrier, which counts these arrivals besides the TMA
// thread's. (One warp with two rows a thread spilled at this warp group's 40 registers.)
template <class Cfg, class Shared>
__device__ void expand_lora_b(Shared& smem, const MorDims& d, int col_tiles, int k_steps,
                              bool folds, const SegmentWalk walk) {
  using T = typename Cfg::T;
  constexpr int kStages = Cfg::kStages, kStageValues = Cfg::kRanks * Cfg::kBK;
  constexpr int kBarrier = 2;  // named barrier id (1: the consumers')
  static_assert(Cfg::kLoraBThreads == Cfg::kBK, "one row of each step per thread");
  const int o = int(threadIdx.x) % Cfg::kLoraBThreads;  // the thread's row of each step
  // The ring's stage, and per stage the parity of lora_b_copied's next phase: that barrier
  // completes a phase only where a K step copies B, not in the stages of x's tile, so its
  // phases and the ring's laps part ways.
  int stage = 0;
  uint32_t copied = 0;
  for_each_segment(col_tiles, d.groups, walk, [&](int, int, int group, int, bool) {
    const GroupSteps steps(group, d.groups, k_steps);
    for (int kt = steps.first; kt < steps.last; ++kt) {
      const int rows = min(Cfg::kBK, d.out_features - kt * Cfg::kBK);  // those copied
      T* const values = smem.lora_b.begin() + stage * kStageValues;
      const uint16_t* const row = reinterpret_cast<const uint16_t*>(values) + o * d.rank;
      TxBarrier::wait(&smem.lora_b_copied[stage], int(copied >> stage & 1u));
      copied ^= 1u << stage;
      uint32_t pairs[Cfg::kRanks / 2];  // columns 2i and 2i + 1 (zeros past r and the rows)
      CUTE_UNROLL
      for (int i = 0; i < Cfg::kRanks / 2; ++i) {
        const uint32_t lo = 2 * i < d.rank && o < rows ? row[2 * i] : 0u;
        const uint32_t hi = 2 * i + 1 < d.rank && o < rows ? row[2 * i + 1] : 0u;
        pairs[i] = lo | hi << 16;
      }
      // every thread has read the copied rows before any overwrites them
      cutlass::arch::NamedBarrier::sync(Cfg::kLoraBThreads, kBarrier);
      CUTE_UNROLL
      for (int i = 0; i < Cfg::kRanks / 2; ++i) {
        values[lora_b_offset(2 * i, o)] = T::bitcast(uint16_t(pairs[i] & 0xffffu));
        values[lora_b_offset(2 * i + 1, o)] = T::bitcast(uint16_t(pairs[i] >> 16));
      }
      // Written by threads, read by wgmma: every lane fences its stores, then one lane per
      // warp arrives (as CUTLASS's epilogues fence, synchronise, then let one thread issue)
      cutlass::arch::fence_view_async_shared();
      __syncwarp();
      if (threadIdx.x % 32 == 0) Barrier::arrive(&smem.full[stage]);
      if (++stage == kStages) stage = 0;
    }
    if (folds) stage = (stage + Cfg::kXChunks) % kStages;  // the group's x stages: not for B
  });
}

// The reducer warp group of the routed input gradient: dB's partial of each row tile,
// dy^T z over its 128 rows, from the dy tiles already in the ring (dy is read once for dx, g
// and dB). K step kt (64 output columns) is column tile kt % col_tiles's share, so a row
// tile's column tiles split the work and every partial element is written once, by plain
// stores (the sum launch adds the row tiles in a fixed order). z of the step's group comes from
// the z warp, one buffer per segment (a tile's group). It waits for every stage and frees it
// with the consumers and waits for its own MMAs only: it never waits for the consumers, and can
// delay them only through the ring (a stage it holds is one the producer cannot refill).
template <class Cfg, class Shared>
__device__ void reduce_lora_b(Shared& smem, const MorDims& d,
                              const RoutedDgradPointers<typename Cfg::T>& ptr, int col_tiles,
                              int k_steps, const SegmentWalk walk) {
  constexpr int kStages = Cfg::kStages;
  const int thread = int(threadIdx.x) - Cfg::Base::kThreads;
  Tensor sDyT = make_tensor(make_smem_ptr(smem.a.begin()), typename Cfg::SmemDyT{});
  Tensor sZ = make_tensor(make_smem_ptr(smem.z.begin()), typename Cfg::SmemZ{});  // [16,BM,2]
  typename Cfg::MmaDb mma;
  auto thr = mma.get_thread_slice(thread);
  Tensor tA = thr.make_fragment_A(thr.partition_A(sDyT));  // smem descriptors [.., 1, 8, P]
  Tensor tB = thr.make_fragment_B(thr.partition_B(sZ));    // [.., 1, 8, 2]
  Tensor sDuT = make_tensor(make_smem_ptr(smem.du.begin()), typename Cfg::SmemExtAT{});
  Tensor sDlT = make_tensor(make_smem_ptr(smem.dl.begin()), typename Cfg::SmemExtAT{});
  Tensor tDu = thr.make_fragment_B(thr.partition_B(sDuT));  // [.., 1, 8]
  Tensor tDl = thr.make_fragment_B(thr.partition_B(sDlT));
  const auto tile_db = make_identity_tensor(Shape<typename Cfg::BK, typename Cfg::Ranks>{});
  Tensor acc = thr.partition_fragment_C(tile_db);  // [64 columns, 16 ranks] in fp32
  const Tensor tC = thr.partition_C(tile_db);
  // acc = stage `at`'s tile read transposed (64 columns) times b (16 ranks), over the 128 rows
  const auto multiply = [&](int at, const auto& b) {
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    mma.accumulate_ = GMMA::ScaleOut::Zero;
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tA); ++kb) {  // the 128 rows, 16 at a time
      gemm(mma, tA(_, _, kb, at), b(_, _, kb), acc);
      mma.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc);
  };

  int stage = 0, phase = 0;
  int share = 0;  // the tile's next K step to multiply
  for_each_segment(col_tiles, d.groups, walk, [&](int row_tile, int col, int group,
                                                            int segment, bool) {
    float* const partial =
        ptr.lora_b_partial + int64_t(row_tile) * d.out_features * d.rank;
    if (group == 0) share = col;
    const int buffer = segment & 1;
    const GroupSteps steps(group, d.groups, k_steps);
    bool z_ready = false;  // z is waited for at the first share: the steps before go at once
    for (int kt = steps.first; kt < steps.last; ++kt) {
      TxBarrier::wait(&smem.full[stage], phase);
      if (kt == share) {
        share += col_tiles;
        if (!z_ready) Barrier::wait(&smem.z_full[buffer], (segment >> 1) & 1);  // z's rows
        z_ready = true;
        multiply(stage, tB(_, _, _, buffer));
        Barrier::arrive(&smem.empty[stage]);
        CUTE_UNROLL
        for (int v = 0; v < size(acc); ++v) {
          const auto [o, j] = tC(v);
          const int column = kt * Cfg::kBK + o;
          if (column < d.out_features && j < d.rank) {
            partial[int64_t(column) * d.rank + j] = acc(v);
          }
        }
      } else {
        Barrier::arrive(&smem.empty[stage]);
      }
      if (++stage == kStages) stage = 0, phase ^= 1;
    }
    // Every MMA reading z has retired. A segment with no share waits for its z all the
    // same: a parity wait must see every phase of its barrier, or a later one would pass on
    // an old.
    if (!z_ready) Barrier::wait(&smem.z_full[buffer], (segment >> 1) & 1);
    Barrier::arrive(&smem.z_empty[buffer]);

    // d[A_cat; R]'s partial of the row tile for this column tile's inputs, where x is folded
    // in: x^T du and x^T dl of the segment's group, x's tile in kXChunks stages of 64 columns
    // (a chunk past K is not loaded: nothing to multiply), du and dl once the consumers have
    // routed the segment.
    if (ptr.shrink_partial == nullptr) return;
    const int n = d.in_features;
    float* const shrink_partial = ptr.shrink_partial + int64_t(row_tile) * d.shrink_width() * n;
    // acc's columns of the chunk from `first_column` on, as `rows` rows of [A_cat; R] from
    // `first_row` on
    const auto store = [&](int first_column, int first_row, int rows) {
      CUTE_UNROLL
      for (int v = 0; v < size(acc); ++v) {
        const auto [o, j] = tC(v);
        const int column = first_column + o;
        if (column < n && j < rows) shrink_partial[int64_t(first_row + j) * n + column] = acc(v);
      }
    };
    for (int c = 0; c < Cfg::kXChunks; ++c) {
      TxBarrier::wait(&smem.full[stage], phase);
      if (c == 0) Barrier::wait(&smem.du_ready, segment & 1);
      const int first_column = (col * Cfg::kXChunks + c) * Cfg::kBK;
      if (first_column < n) {  // the group's r rows of A_cat, then its L of R after A_cat
        multiply(stage, tDu);
        store(first_column, group * d.rank, d.rank);
        if (d.router) {
          multiply(stage, tDl);
          store(first_column, d.groups * d.rank + group * d.logits, d.logits);
        }
      }
      Barrier::arrive(&smem.empty[stage]);
      if (++stage == kStages) stage = 0, phase ^= 1;
    }
    Barrier::arrive(&smem.du_free);  // every MMA reading du and dl has retired
  });
}

// dx = dy W + [du | dl] [A_cat; R] (sm90_gemm.h), with g = dy B and the backward routing
// folded in: each K step (64 output columns) also brings those rows of B (zero-padded to 16
// columns, by the producer warp group's B warps) into the ring, and the consumers run g += dy B
// (a 64x16 MMA) beside the main 64x192 one, 8 % more MMA work and no separate read of dy for g.
// A tile's K steps run group by group (a segment each: O / G is a multiple of 64 when G > 1).
// After a group's steps one thread per row routes it in fp32 and writes du and dl into shared
// memory, and du A_g and dl R_g become two 16-deep K steps, before the next group's steps
// accumulate on (walked in runs, one group, a run's later tiles skip g's MMAs and the routing:
// their g, du and dl are the run's). The first column tile also writes its rows' dl sums
// (dc's partials). A fourth
// warp group, the reducer, computes dB's row-tile partials from the same dy tiles, with z
// routed by the producer warp group's z warp, and d[A_cat; R]'s from the tile's x, which the
// producer loads into three ring stages after each group's steps, and du and dl.
template <class Cfg, class TmaA, class TmaB, class TmaE>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    routed_dgrad_kernel(CUTE_GRID_CONSTANT const TmaA tma_dy, CUTE_GRID_CONSTANT const TmaA tma_x,
                        CUTE_GRID_CONSTANT const TmaB tma_w,
                        CUTE_GRID_CONSTANT const TmaE tma_lora_a,
                        CUTE_GRID_CONSTANT const TmaE tma_router, const MorDims d,
                        const RoutedDgradPointers<typename Cfg::T> ptr, const SegmentWalk walk) {
#if defined(EI_SM90_DEVICE_CODE)
  using T = typename Cfg::T;
  constexpr int kStages = Cfg::kStages;
  const int m = int(d.tokens), n = d.in_features, k = d.out_features;
  const int col_tiles = (n + Cfg::kBN - 1) / Cfg::kBN;
  // (tiles G < 2^30, walk.tiles: the host checks)
  const int k_steps = (k + Cfg::kBK - 1) / Cfg::kBK;
  // x folded in: x's tile follows each group's steps through the ring, for d[A_cat; R]
  const bool folds = ptr.shrink_partial != nullptr;
  // TMA's bytes per stage (B's rows: a bulk copy counted on its own barrier), and per stage of
  // x's tile (its dy slot only)
  constexpr uint32_t kStageBytes = uint32_t((Cfg::kBM + Cfg::kBN) * Cfg::kBK * sizeof(T));
  constexpr uint32_t kXBytes = uint32_t(Cfg::kBM * Cfg::kBK * sizeof(T));
  constexpr uint32_t kExtBytes = uint32_t(2 * Cfg::kBN * Cfg::kRanks * sizeof(T));
  extern __shared__ __align__(1024) char shared_bytes[];
  auto& smem = *reinterpret_cast<typename Cfg::Shared*>(shared_bytes);
  Tensor sA = make_tensor(make_smem_ptr(smem.a.begin()), typename Cfg::SmemA{});  // [BM,BK,P]
  Tensor sB = make_tensor(make_smem_ptr(smem.b.begin()), typename Cfg::SmemB{});  // [BN,BK,P]
  Tensor sG = make_tensor(make_smem_ptr(smem.lora_b.begin()),
                          typename Cfg::SmemLoraB{});  // [16, BK, P]
  Tensor sLoraA = make_tensor(make_smem_ptr(smem.lora_a.begin()),
                              typename Cfg::SmemExtB{});  // [BN, 16, 2]
  Tensor sRouter = make_tensor(make_smem_ptr(smem.router.begin()),
                               typename Cfg::SmemExtB{});  // [BN, 16, 2]
  Tensor sDu = make_tensor(make_smem_ptr(smem.du.begin()), typename Cfg::SmemExtA{});  // [BM,16]
  Tensor sDl = make_tensor(make_smem_ptr(smem.dl.begin()), typename Cfg::SmemExtA{});  // [BM,16]

  const auto tiler = Shape<typename Cfg::BM, typename Cfg::BN, typename Cfg::BK>{};
  init_ring<typename Cfg::Shared, kStages>(smem, Cfg::kConsumerThreads + Cfg::kReducerThreads,
                                           1 + Cfg::kLoraBThreads / 32);
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) TxBarrier::init(&smem.lora_b_copied[s], 1);
    for (int b = 0; b < 2; ++b) {
      TxBarrier::init(&smem.ext_full[b], 1);
      Barrier::init(&smem.ext_empty[b], Cfg::kConsumerThreads);
      Barrier::init(&smem.z_full[b], Cfg::kZThreads);
      Barrier::init(&smem.z_empty[b], Cfg::kReducerThreads);
    }
    Barrier::init(&smem.du_ready, 1);
    Barrier::init(&smem.du_free, Cfg::kReducerThreads);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
  // Launched as the dependent of the u GEMM before it (qkv), it waits for that grid's end
  // before anything reads global memory (a plain launch passes at once).
  wait_for_prerequisite();
  // The sum of the partials, launched as this kernel's dependent, may be scheduled from now
  // on: its CTAs wait for this grid's end before they read anything, and until then take only
  // SMs that no CTA of this one holds (all started: the last to call this lets it launch).
  allow_dependent_launch();

  if (threadIdx.x >= Cfg::Base::kThreads) {  // the reducer warp group
    cutlass::arch::warpgroup_reg_dealloc<Cfg::kReducerRegisters>();
    reduce_lora_b<Cfg>(smem, d, ptr, col_tiles, k_steps, walk);
    return;
  }
  if (threadIdx.x < 128) {  // producer warp group: one thread issues every TMA load
    cutlass::arch::warpgroup_reg_dealloc<Cfg::kProducerRegisters>();
    if (threadIdx.x >= 32 + Cfg::kZThreads) {  // the B warps
      expand_lora_b<Cfg>(smem, d, col_tiles, k_steps, folds, walk);
      return;
    }
    if (threadIdx.x >= 32) {  // the z warp
      if (!d.router) {
        route_z<Cfg, false, false>(smem, d, ptr, col_tiles, k_steps, walk);
      } else if (d.bypass) {
        route_z<Cfg, true, true>(smem, d, ptr, col_tiles, k_steps, walk);
      } else {
        route_z<Cfg, true, false>(smem, d, ptr, col_tiles, k_steps, walk);
      }
      return;
    }
    if (!elect_one_sync()) return;
    prefetch_tma_descriptor(tma_dy.get_tma_descriptor());
    prefetch_tma_descriptor(tma_x.get_tma_descriptor());
    prefetch_tma_descriptor(tma_w.get_tma_descriptor());
    prefetch_tma_descriptor(tma_lora_a.get_tma_descriptor());
    prefetch_tma_descriptor(tma_router.get_tma_descriptor());
    // Without a router the last descriptor reads lora_a again, unused.
    const int gr = d.groups * d.rank;
    const int router_rows = d.router ? d.groups * d.logits : gr;
    int stage = 0, phase = 0;
    for_each_segment(col_tiles, d.groups, walk,
                     [&](int row, int col, int group, int segment, bool) {
      // The group's extension tiles first, into the buffer of the segment before last: the
      // 16 rows of A_cat and R from the group's first (TMA fills past the last with zeros;
      // rows of the next group meet du and dl's zero columns), for this tile's columns.
      const int buffer = segment & 1;
      Barrier::wait(&smem.ext_empty[buffer], ((segment >> 1) & 1) ^ 1);  // at first: free
      const auto ext_tile = Shape<typename Cfg::BN, typename Cfg::Ranks>{};
      Tensor gLoraA = local_tile(
          domain_offset(make_coord(0, group * d.rank),
                        tma_lora_a.get_tma_tensor(make_shape(n, gr))),
          ext_tile, make_coord(col, 0));
      Tensor gRouter = local_tile(
          domain_offset(make_coord(0, d.router ? group * d.logits : group * d.rank),
                        tma_router.get_tma_tensor(make_shape(n, router_rows))),
          ext_tile, make_coord(col, 0));
      auto tEA = tma_split(tma_lora_a, sLoraA, gLoraA);
      auto tER = tma_split(tma_router, sRouter, gRouter);
      TxBarrier::arrive_and_expect_tx(&smem.ext_full[buffer], kExtBytes);
      copy(tma_lora_a.with(smem.ext_full[buffer]), get<0>(tEA), get<1>(tEA)(_, buffer));
      copy(tma_router.with(smem.ext_full[buffer]), get<0>(tER), get<1>(tER)(_, buffer));

      const auto tile = make_coord(row, col, _);
      Tensor gDy = local_tile(tma_dy.get_tma_tensor(make_shape(m, k)), tiler, tile,
                              Step<_1, X, _1>{});  // [BM, BK, k steps]
      Tensor gW = local_tile(tma_w.get_tma_tensor(make_shape(n, k)), tiler, tile,
                             Step<X, _1, _1>{});  // [BN, BK, k steps]
      auto tA = tma_split(tma_dy, sA, gDy);
      auto tB = tma_split(tma_w, sB, gW);
      const GroupSteps steps(group, d.groups, k_steps);
      fill_ring<kStages>(
          smem, steps.first, steps.last, kStageBytes, stage, phase,
          [&](int kt, int at, uint64_t& full) {
            copy_step(tma_dy, full, tA, kt, at);
            copy_step(tma_w, full, tB, kt, at);
            // the step's rows of B as they are (O is a multiple of 8: 16-byte multiples)
            const int rows = min(Cfg::kBK, k - kt * Cfg::kBK);
            const int bytes = rows * d.rank * int(sizeof(T));
            TxBarrier::arrive_and_expect_tx(&smem.lora_b_copied[at], uint32_t(bytes));
            SM90_BULK_COPY_G2S::copy(ptr.lora_b + int64_t(kt) * Cfg::kBK * d.rank,
                                     &smem.lora_b_copied[at],
                                     smem.lora_b.begin() + at * Cfg::kRanks * Cfg::kBK, bytes);
          });
      // Then x's tile for the reducer's x^T [du | dl], in kXChunks stages of the dy slot. They
      // hold no B: this thread also makes the B warps' two arrivals (a chunk past K is not
      // loaded: no bytes).
      if (!folds) return;
      Tensor gX = local_tile(tma_x.get_tma_tensor(make_shape(m, n)),
                             Shape<typename Cfg::BM, typename Cfg::BK>{},
                             make_coord(row, _));  // [BM, BK, K chunks]
      auto tX = tma_split(tma_x, sA, gX);
      for (int c = 0; c < Cfg::kXChunks; ++c) {
        const int chunk = col * Cfg::kXChunks + c;
        const bool inside = chunk * Cfg::kBK < n;
        fill_ring<kStages>(smem, chunk, chunk + 1, inside ? kXBytes : 0u, stage, phase,
                           [&](int kt, int at, uint64_t& full) {
                             if (inside) copy_step(tma_x, full, tX, kt, at);
                             Barrier::arrive(&full);
                             Barrier::arrive(&full);
                           });
      }
    });
    return;
  }

  // Consumer warp groups.
  cutlass::arch::warpgroup_reg_alloc<Cfg::kConsumerRegisters>();
  const int thread = int(threadIdx.x) - 128;
  typename Cfg::Mma mma;
  typename Cfg::MmaG mma_g;
  auto thr_mma = mma.get_thread_slice(thread);
  auto thr_g = mma_g.get_thread_slice(thread);
  Tensor tCrA = thr_mma.make_fragment_A(thr_mma.partition_A(sA));  // smem descriptors
  Tensor tCrB = thr_mma.make_fragment_B(thr_mma.partition_B(sB));
  Tensor tGrA = thr_g.make_fragment_A(thr_g.partition_A(sA));
  Tensor tGrB = thr_g.make_fragment_B(thr_g.partition_B(sG));
  Tensor tDuA = thr_mma.make_fragment_A(thr_mma.partition_A(sDu));
  Tensor tDlA = thr_mma.make_fragment_A(thr_mma.partition_A(sDl));
  Tensor tLoraAB = thr_mma.make_fragment_B(thr_mma.partition_B(sLoraA));    // [.., 2]
  Tensor tRouterB = thr_mma.make_fragment_B(thr_mma.partition_B(sRouter));  // [.., 2]
  Tensor acc = thr_mma.partition_fragment_C(
      make_identity_tensor(Shape<typename Cfg::BM, typename Cfg::BN>{}));  // fp32 accumulators
  const auto tile_g = make_identity_tensor(Shape<typename Cfg::BM, typename Cfg::Ranks>{});
  Tensor acc_g = thr_g.partition_fragment_C(tile_g);  // g of the tile's rows
  const Tensor tGc = thr_g.partition_C(tile_g);

  int stage = 0, phase = 0;
  for_each_segment(col_tiles, d.groups, walk, [&](int row_tile, int col, int group,
                                                            int segment, bool starts_run) {
    const bool keeps = col == 0;  // the first column tile writes dc's partials
    if (group == 0) clear(acc);
    const GroupSteps steps(group, d.groups, k_steps);
    // g's MMAs only where a run starts: its later tiles find their g in the staging tile (two
    // runs of steps, the second with none: a branch around them would split every batch). g
    // starts from the first MMA's zero scale, not from cleared registers: a clear that might
    // meet no MMA made ptxas serialise every batch (C7515).
    const int g_steps = starts_run ? steps.last - steps.first : 0;
    const auto fence = [&] {
      warpgroup_fence_operand(acc);
      warpgroup_fence_operand(acc_g);
    };
    int reading = -1;
    mma_g.accumulate_ = GMMA::ScaleOut::Zero;
    drain_steps<kStages>(
        smem, g_steps, stage, phase, reading,
        [&](int at) {
          gemm(mma, tCrA(_, _, _, at), tCrB(_, _, _, at), acc);
          CUTE_UNROLL
          for (int kb = 0; kb < size<2>(tGrA); ++kb) {  // the step's 64 outputs, 16 at a time
            gemm(mma_g, tGrA(_, _, kb, at), tGrB(_, _, kb, at), acc_g);
            mma_g.accumulate_ = GMMA::ScaleOut::One;
          }
        },
        fence);
    // (fencing acc alone: a fence of g's registers, which the last batch may still be
    // writing, made ptxas serialise every batch, C7515)
    drain_steps<kStages>(
        smem, steps.last - steps.first - g_steps, stage, phase, reading,
        [&](int at) { gemm(mma, tCrA(_, _, _, at), tCrB(_, _, _, at), acc); },
        [&] { warpgroup_fence_operand(acc); });
    drain_done(smem, reading, fence);

    // g to the staging tile, then one thread per row routes it (a run's first tile: the later
    // ones find g in the staging tile, and du and dl where their routing left them).
    if (starts_run) {
      CUTE_UNROLL
      for (int j = 0; j < size(acc_g); ++j) {
        const auto [r, c] = tGc(j);
        smem.staging[r][c] = acc_g(j);
      }
    }
    // The consumers' own barrier (user id 1: hardware barrier 9; 0 is __syncthreads). It
    // also orders this group's writes of staging, du, dl and dl_rows after the last
    // group's reads: each warp group waited for its extension MMAs before coming here.
    cutlass::arch::NamedBarrier::sync(Cfg::kConsumerThreads, 1);
    if (thread < Cfg::kBM) {
      const int64_t token = int64_t(row_tile) * Cfg::kBM + thread;
      const float* const staged = smem.staging[thread];
      float* const dl_row = smem.dl_rows[thread];
      // [du | dl] to memory from the first column tile where x is not folded in
      T* const kept = keeps && !folds && token < d.tokens
                          ? ptr.d_shrink + token * d.shrink_ld()
                          : nullptr;
      if (folds) Barrier::wait(&smem.du_free, (segment & 1) ^ 1);  // the reducer read the last
      // A run's later tile keeps its du and dl: the same rows' (its dl_row and kept serve the
      // first column tile only, which starts a run)
      if (starts_run) {
        if (!d.router) {
          route_dgrad_row<Cfg, false, false>(d, group, thread, token, kept, ptr, staged,
                                             dl_row, sDu, sDl);
        } else if (d.bypass) {
          route_dgrad_row<Cfg, true, true>(d, group, thread, token, kept, ptr, staged, dl_row,
                                           sDu, sDl);
        } else {
          route_dgrad_row<Cfg, true, false>(d, group, thread, token, kept, ptr, staged, dl_row,
                                            sDu, sDl);
        }
      }
    }
    cutlass::arch::fence_view_async_shared();  // du and dl: by threads, read by wgmma
    cutlass::arch::NamedBarrier::sync(Cfg::kConsumerThreads, 1);
    if (folds) {
      if (thread == 0) Barrier::arrive(&smem.du_ready);  // for the reducer's x^T [du | dl]
      // The x stages that follow the group's steps are the reducer's: release them now, so
      // that the producer can refill them with the next steps while this extension and store
      // run (waiting for each first, so that the release counts toward the lap that loaded
      // it).
      for (int c = 0; c < Cfg::kXChunks; ++c) {
        TxBarrier::wait(&smem.full[stage], phase);
        Barrier::arrive(&smem.empty[stage]);
        if (++stage == kStages) stage = 0, phase ^= 1;
      }
    }
    if (keeps && d.router && thread < d.logits) {  // this row tile's dl sums, in row order
      float total = 0.0f;
      for (int r = 0; r < Cfg::kBM; ++r) total += smem.dl_rows[r][thread];
      ptr.dl_partial[(int64_t(row_tile) * d.groups + group) * d.logits + thread] = total;
    }

    // The extension: acc += du A_g + dl R_g, one 64x192x16 MMA each per warp group, both in
    // one batch: without a router dl is zeros and the second tile holds lora_a's finite
    // values (a branch around an MMA would split the batch).
    const int buffer = segment & 1;
    TxBarrier::wait(&smem.ext_full[buffer], (segment >> 1) & 1);
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    gemm(mma, tDuA, tLoraAB(_, _, _, buffer), acc);
    gemm(mma, tDlA, tRouterB(_, _, _, buffer), acc);
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc);
    Barrier::arrive(&smem.ext_empty[buffer]);
    if (group == d.groups - 1) {  // the tile's last group
      Tensor gC = local_tile(make_identity_tensor(make_shape(m, n)), tiler,
                             make_coord(row_tile, col, _), Step<_1, _1, X>{});  // [BM, BN]
      store_tile(acc, thr_mma.partition_C(gC), m, n, static_cast<const T*>(nullptr), ptr.dx,
                 int64_t(n));
    }
  });
#else
  (void)tma_dy, (void)tma_x, (void)tma_w, (void)tma_lora_a, (void)tma_router, (void)d;
  (void)ptr, (void)walk;
#if defined(__CUDA_ARCH__)
  __trap();
#endif
#endif
}

// Whether EI_KERNELS_CUDA_SM90_PERSISTENT leaves the kernels persistent (one CTA per SM
// walking the tiles; "0": one CTA per tile).
bool persistent_tiles() {
  const char* const switch_value = std::getenv("EI_KERNELS_CUDA_SM90_PERSISTENT");
  return switch_value == nullptr || std::strcmp(switch_value, "0") != 0;
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

// The CTAs of a launch over `tiles` output tiles (for_each_tile): one per SM (persistent),
// unless switched off (then one per tile). (Attribute queries only, cached: safe during CUDA
// graph capture.)
cudaError_t tile_ctas(int64_t tiles, int64_t* ctas) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = multiprocessor_count(device, &sms);
  *ctas = persistent_tiles() ? std::min<int64_t>(tiles, sms) : tiles;
  return err;
}

// `kernel` on `ctas` CTAs; with as_dependent, as the programmatic dependent of the kernel
// ahead (dependent_launch.cuh).
template <int kSmem, int kThreads, class Kernel, class... Args>
cudaError_t launch_on_ctas(Kernel kernel, int64_t ctas, bool as_dependent, cudaStream_t stream,
                           const Args&... args) {
  static_assert(kSmem <= 227 * 1024, "over the opt-in shared memory of a 9.0 device");
  cudaError_t err = allow_shared_memory(kernel, kSmem);
  if (err != cudaSuccess) return err;
  const dim3 grid{unsigned(ctas)};
  if (as_dependent) {
    err = launch_as_dependent(kernel, grid, dim3(kThreads), kSmem, stream, args...);
    return err != cudaSuccess ? err : cudaGetLastError();
  }
  kernel<<<grid, kThreads, kSmem, stream>>>(args...);
  return cudaGetLastError();
}

// `kernel` over `tiles` output tiles (for_each_tile).
template <int kSmem, int kThreads, class Kernel, class... Args>
cudaError_t launch_on_tiles(Kernel kernel, int64_t tiles, cudaStream_t stream,
                            const Args&... args) {
  int64_t ctas = 0;
  const cudaError_t err = tile_ctas(tiles, &ctas);
  if (err != cudaSuccess) return err;
  return launch_on_ctas<kSmem, kThreads>(kernel, ctas, false, stream, args...);
}

// The same in clusters of kCluster CTAs along the tile walk (tiles is a multiple of kCluster).
// Persistent, it launches as many clusters as fit on the device at once (GPCs need not hold a
// whole number of clusters, so this may leave SMs idle: the occupancy query says how many).
template <int kCluster, int kSmem, int kThreads, class Kernel, class... Args>
cudaError_t launch_on_tile_clusters(Kernel kernel, int64_t tiles, cudaStream_t stream,
                                    const Args&... args) {
  static_assert(kSmem <= 227 * 1024, "over the opt-in shared memory of a 9.0 device");
  // A cluster's CTAs walk the same number of tiles, or one would wait for its peers forever.
  if (tiles % kCluster != 0) return cudaErrorInvalidValue;
  cudaError_t err = allow_shared_memory(kernel, kSmem);
  int device = 0;
  if (err == cudaSuccess) err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  cudaLaunchAttribute cluster_dims = {};
  cluster_dims.id = cudaLaunchAttributeClusterDimension;
  cluster_dims.val.clusterDim.x = kCluster;
  cluster_dims.val.clusterDim.y = 1;
  cluster_dims.val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(kCluster);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = kSmem;
  config.stream = stream;
  config.attrs = &cluster_dims;
  config.numAttrs = 1;
  // How many clusters fit at once, cached per device as count + 1 (the cache keeps positive
  // values only, and 0 is an answer). A failed query (not cached) counts as none fitting.
  int fitting = 0;
  if (cached_per_device(device, &fitting, [&](int* out) {
        int clusters = 0;
        const cudaError_t query = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config);
        *out = std::max(clusters, 0) + 1;
        return query;
      }) != cudaSuccess) {
    (void)cudaGetLastError();  // not left for the launch's error check
    fitting = 1;
  }
  const int clusters = fitting - 1;
  // No cluster of this size fits (a GPU partition, say): CTAs alone, in either mode, right all
  // the same (the shrink then summed in one CTA: other roundings).
  if (clusters <= 0) {
    return launch_on_tiles<kSmem, kThreads>(kernel, tiles, stream, args...);
  }
  const int64_t ctas =
      persistent_tiles() ? std::min<int64_t>(tiles, int64_t(clusters) * kCluster) : tiles;
  config.gridDim = dim3(unsigned(ctas));
  err = cudaLaunchKernelEx(&config, kernel, args...);
  return err != cudaSuccess ? err : cudaGetLastError();
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
  return launch_on_tiles<int(sizeof(typename Cfg::Shared)), Cfg::kThreads>(
      &ext_gemm_kernel<Cfg, decltype(tma_a), decltype(tma_b)>, tile_count(g.m, g.n), stream,
      tma_a, tma_a2, tma_b, tma_b2, g.m, g.n, g.k, g.k2, static_cast<const T*>(g.bias),
      static_cast<T*>(g.c), g.ldc);
}

// Whether a routed kernel walks its tiles in runs (for_each_routed_tile, for_each_segment):
// EI_KERNELS_CUDA_SM90_RUNS=0 never, =1 always (to measure both ways); by default where the
// row blocks that its CTAs hold at once (one per cluster of `cluster` CTAs on every SM, of
// row_block_bytes each) take at most half of the L2, so that a CTA still finds its row block
// there for the run's next tile. (Attribute queries only, cached.)
cudaError_t walks_in_runs(int cluster, int64_t row_block_bytes, bool* runs) {
  const char* const switch_value = std::getenv("EI_KERNELS_CUDA_SM90_RUNS");
  const bool set = switch_value != nullptr && switch_value[0] != '\0';  // empty: the default
  *runs = !set || std::strcmp(switch_value, "0") != 0;
  if (set && (std::strcmp(switch_value, "0") == 0 || std::strcmp(switch_value, "1") == 0)) {
    return cudaSuccess;
  }
  int device = 0, sms = 0, l2_bytes = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = multiprocessor_count(device, &sms);
  if (err == cudaSuccess) err = l2_cache_bytes(device, &l2_bytes);
  *runs = err == cudaSuccess && int64_t(sms / cluster) * row_block_bytes <= l2_bytes / 2;
  return err;
}

template <typename T>
cudaError_t launch_routed_dgrad(const MorDims& d, const MorBackwardArgs& a, cudaStream_t stream) {
  using Cfg = RoutedDgradConfig<T>;
  const int m = int(d.tokens), n = d.in_features, k = d.out_features;
  const auto ext_box = make_shape(typename Cfg::BN{}, typename Cfg::Ranks{});
  const auto tma_dy = make_tma_atom(SM90_TMA_LOAD{}, row_major<T>(a.dy, m, k, k),
                                    typename Cfg::SmemA{}(_, _, Int<0>{}),
                                    make_shape(typename Cfg::BM{}, typename Cfg::BK{}));
  const auto tma_x = make_tma_atom(SM90_TMA_LOAD{}, row_major<T>(a.x, m, n, n),
                                   typename Cfg::SmemA{}(_, _, Int<0>{}),
                                   make_shape(typename Cfg::BM{}, typename Cfg::BK{}));
  const auto tma_w = make_tma_atom(SM90_TMA_LOAD{}, b_operand<T, true>(a.weight, n, k, n),
                                   typename Cfg::SmemB{}(_, _, Int<0>{}),
                                   make_shape(typename Cfg::BN{}, typename Cfg::BK{}));
  const int gr = d.groups * d.rank;
  const auto tma_lora_a = make_tma_atom(SM90_TMA_LOAD{}, b_operand<T, true>(a.lora_a, n, gr, n),
                                        typename Cfg::SmemExtB{}(_, _, Int<0>{}), ext_box);
  // Without a router its descriptor reads lora_a (times dl's zeros)
  const auto tma_router = make_tma_atom(
      SM90_TMA_LOAD{},
      d.router ? b_operand<T, true>(a.router_weight, n, d.groups * d.logits, n)
               : b_operand<T, true>(a.lora_a, n, gr, n),
      typename Cfg::SmemExtB{}(_, _, Int<0>{}), ext_box);
  const RoutedDgradPointers<T> ptr{static_cast<const T*>(a.lora_b),
                                   a.u,
                                   a.u_ld,
                                   a.probs,
                                   static_cast<T*>(a.dx),
                                   a.sm90_folds_x ? a.shrink_partial : nullptr,
                                   a.sm90_folds_x ? nullptr : static_cast<T*>(a.d_shrink),
                                   a.dl_partial,
                                   a.lora_b_partial};
  // Round-robin over the CTAs, or in runs of tiles per CTA (as many CTAs as that takes), which
  // skip g's MMAs and the routing after a run's first tile: one group only (the staging tile
  // holds one group's g), by default where dy's row blocks in flight fit (at 12608 tokens on
  // an H100/H200: O = 768, 26 MB of 50, proj and fc2; not fc1's O = 3072)
  const int64_t tiles = tile_count(m, n);  // under 2^30 (sm90_routed_dgrad_accepts)
  int64_t ctas = 0;
  bool runs = false;
  cudaError_t err = tile_ctas(tiles, &ctas);
  if (err == cudaSuccess && d.groups == 1) {
    err = walks_in_runs(1, int64_t(Cfg::kBM) * k * int64_t(sizeof(T)), &runs);
  }
  if (err != cudaSuccess) return err;
  const SegmentLaunch launch = segment_launch(int(tiles), int(ctas), runs);
  return launch_on_ctas<int(sizeof(typename Cfg::Shared)), Cfg::kThreads>(
      &routed_dgrad_kernel<Cfg, decltype(tma_dy), decltype(tma_w), decltype(tma_lora_a)>,
      launch.ctas, a.dependent_dgrad, stream, tma_dy, tma_x, tma_w, tma_lora_a, tma_router, d, ptr,
      launch.walk);
}

template <typename T>
cudaError_t launch_majors(const ExtGemmArgs& g, cudaStream_t stream) {
  return g.b_n_major ? launch<T, true>(g, stream) : launch<T, false>(g, stream);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// CTAs per cluster of the routed forward: EI_KERNELS_CUDA_SM90_CLUSTER ("1", "2" or "4";
// default 2) column tiles of one row block share out the shrink's K steps. Halved until it
// divides a group's column tiles, so that a cluster's tiles lie in one group and one row block
// (and the tile count is a multiple of it). Why 2 by default: the persistent launch runs as
// many clusters as fit at once, and on an H100/H200 (132 SMs in GPCs of different sizes) 66
// pairs are likely to fit where 33 quads may not; whole waves of 132 tiles are what the
// 128 x 192 tile was chosen for. gpu_check times 1, 2 and 4.
int routed_cluster_size(const MorDims& d) {
  using Cfg = RoutedConfig<cutlass::half_t>;  // the same tiles for both dtypes
  const char* const switch_value = std::getenv("EI_KERNELS_CUDA_SM90_CLUSTER");
  int size = 2;
  if (switch_value != nullptr && std::strcmp(switch_value, "1") == 0) size = 1;
  if (switch_value != nullptr && std::strcmp(switch_value, "4") == 0) size = 4;
  const int group_col_tiles = (d.out_features / d.groups + Cfg::kBN - 1) / Cfg::kBN;
  while (group_col_tiles % size != 0) size /= 2;
  return size;
}

template <typename T>
cudaError_t launch_routed(const MorDims& d, const MorForwardArgs& a, cudaStream_t stream) {
  using Cfg = RoutedConfig<T>;
  const int m = int(d.tokens), n = d.out_features, k = d.in_features;
  const auto tma_x = make_tma_atom(SM90_TMA_LOAD{}, row_major<T>(a.x, m, k, k),
                                   typename Cfg::SmemA{}(_, _, Int<0>{}),
                                   make_shape(typename Cfg::BM{}, typename Cfg::BK{}));
  const auto tma_w = make_tma_atom(SM90_TMA_LOAD{}, row_major<T>(a.weight, n, k, k),
                                   typename Cfg::SmemB{}(_, _, Int<0>{}),
                                   make_shape(typename Cfg::BN{}, typename Cfg::BK{}));
  const auto tma_lora_a = make_tma_atom(
      SM90_TMA_LOAD{}, row_major<T>(a.lora_a, d.groups * d.rank, k, k),
      typename Cfg::SmemU{}(_, _, Int<0>{}), make_shape(typename Cfg::Ranks{}, typename Cfg::BK{}));
  // Without a router its descriptor reads lora_a (the kernel ignores those logits).
  const auto tma_router = make_tma_atom(
      SM90_TMA_LOAD{},
      d.router ? row_major<T>(a.router_weight, d.groups * d.logits, k, k)
               : row_major<T>(a.lora_a, d.groups * d.rank, k, k),
      typename Cfg::SmemL{}(_, _, Int<0>{}),
      make_shape(typename Cfg::Logits{}, typename Cfg::BK{}));
  const RoutedPointers<T> ptr{static_cast<const T*>(a.bias), static_cast<const T*>(a.lora_b),
                              static_cast<const T*>(a.router_bias), static_cast<T*>(a.y),
                              a.probs, a.shrink};
  const auto kernel = &routed_gemm_kernel<Cfg, decltype(tma_x), decltype(tma_w),
                                          decltype(tma_lora_a), decltype(tma_router)>;
  constexpr int kSmem = int(sizeof(typename Cfg::Shared));
  const int64_t tiles = tile_count(m, n);
  // Runs by default where x's row blocks in flight fit (at 12608 tokens on an H100/H200 in
  // pairs: K = 768 holds 13 MB, runs; K = 3072 52 MB, not: there for_each_tile's order, whose
  // CTAs at work together share row blocks, reads x once)
  const int cluster = routed_cluster_size(d);
  bool runs = false;
  const cudaError_t err =
      walks_in_runs(cluster, int64_t(Cfg::kBM) * k * int64_t(sizeof(T)), &runs);
  if (err != cudaSuccess) return err;
  switch (cluster) {
    case 4:
      return launch_on_tile_clusters<4, kSmem, Cfg::kThreads>(kernel, tiles, stream, tma_x, tma_w,
                                                              tma_lora_a, tma_router, d, ptr,
                                                              runs);
    case 2:
      return launch_on_tile_clusters<2, kSmem, Cfg::kThreads>(kernel, tiles, stream, tma_x, tma_w,
                                                              tma_lora_a, tma_router, d, ptr,
                                                              runs);
    default:
      return launch_on_tiles<kSmem, Cfg::kThreads>(kernel, tiles, stream, tma_x, tma_w,
                                                   tma_lora_a, tma_router, d, ptr, runs);
  }
}


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
  return tile_count(g.m, g.n) <= INT32_MAX && ext_ok && aligned16(g.a) && aligned16(g.b) &&
         aligned16(g.c) && rows_ok(g.lda, g.k) && rows_ok(g.ldb, b_cols) &&
         rows_ok(g.ldc, g.n);
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

bool sm90_routed_accepts(DType dtype, const MorDims& d, const MorForwardArgs& a) {
  using Cfg = RoutedConfig<cutlass::half_t>;  // the same sizes for both dtypes
  if (!sm90_gemm_built() || dtype == DType::kFloat) return false;
  if (d.tokens <= 0 || d.tokens > INT32_MAX || d.out_features <= 0 || d.in_features <= 0) {
    return false;  // (CuTe's TMA encoding asserts on an empty dimension)
  }
  if (d.rank > Cfg::kRanks || (d.router && d.logits > Cfg::kLogits)) return false;
  if (d.branches > kRoutedBranches) return false;
  if (d.groups > 1 && (d.out_features / d.groups) % Cfg::kBN != 0) return false;
  // TMA: 16-byte aligned bases and rows (K and O multiples of 8 elements)
  const bool aligned = aligned16(a.x) && aligned16(a.weight) && aligned16(a.lora_a) &&
                       aligned16(a.y) && (!d.router || aligned16(a.router_weight));
  // (tiles < 2^30: for_each_routed_tile's unit + stride stays in 32 bits)
  return aligned && d.in_features % 8 == 0 && d.out_features % 8 == 0 &&
         tile_count(d.tokens, d.out_features) < (int64_t(1) << 30);
}

int64_t sm90_routed_dgrad_row_tiles(int64_t tokens) {
  using Cfg = RoutedDgradConfig<cutlass::half_t>;  // the same tiles for both dtypes
  return (tokens + Cfg::kBM - 1) / Cfg::kBM;
}

bool sm90_routed_dgrad_accepts(DType dtype, const MorDims& d, const MorBackwardArgs& a) {
  using Cfg = RoutedDgradConfig<cutlass::half_t>;  // the same sizes for both dtypes
  if (!sm90_gemm_built() || dtype == DType::kFloat || a.dx == nullptr) return false;
  if (d.tokens <= 0 || d.tokens > INT32_MAX || d.groups < 1) return false;
  if (d.in_features <= 0 || d.out_features <= 0) return false;  // TMA: no empty dimension
  // a tile's K steps run group by group: each group's outputs fill whole steps
  if (d.groups > 1 && (d.out_features / d.groups) % Cfg::kBK != 0) return false;
  if (d.rank > Cfg::kRanks || (d.router && d.logits > Cfg::kRanks)) return false;
  if (d.branches > kRoutedBranches) return false;
  // The partials, one per row tile, take r / 64 of dy's bytes (dB) and S / 64 of x's
  // (d[A_cat; R]): beyond 512 row tiles (65536 tokens: 116 MB at ViT-B's fc1, 135 MB at fc2,
  // r = 14, L = 4) the unrouted path's few split partials are leaner
  if (sm90_routed_dgrad_row_tiles(d.tokens) > kMaxRowTilePartials) return false;
  const bool aligned = aligned16(a.dy) && aligned16(a.x) && aligned16(a.weight) &&
                       aligned16(a.lora_a) && aligned16(a.dx) &&
                       (!d.router || aligned16(a.router_weight));
  // B by bulk copies of 16-byte multiples from a 16-byte aligned start; the tile walk's
  // (tile, group) counts in 32 bits with room to spare (for_each_segment)
  return aligned && aligned16(a.lora_b) && d.in_features % 8 == 0 && d.out_features % 8 == 0 &&
         tile_count(d.tokens, d.in_features) * d.groups < (int64_t(1) << 30);
}

cudaError_t sm90_routed_dgrad(DType dtype, const MorDims& dims, const MorBackwardArgs& args,
                              cudaStream_t stream) {
  switch (dtype) {
    case DType::kHalf:
      return launch_routed_dgrad<cutlass::half_t>(dims, args, stream);
    case DType::kBFloat16:
      return launch_routed_dgrad<cutlass::bfloat16_t>(dims, args, stream);
    case DType::kFloat:
      break;
  }
  return cudaErrorInvalidValue;
}

cudaError_t sm90_routed_gemm(DType dtype, const MorDims& dims, const MorForwardArgs& args,
                             cudaStream_t stream) {
  switch (dtype) {
    case DType::kHalf:
      return launch_routed<cutlass::half_t>(dims, args, stream);
    case DType::kBFloat16:
      return launch_routed<cutlass::bfloat16_t>(dims, args, stream);
    case DType::kFloat:
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace ei
