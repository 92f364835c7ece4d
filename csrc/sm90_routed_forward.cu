// The routed forward on sm_90a (sm90_gemm.h): y = [x | z][W | B_cat]^T + b in one launch,
// the shrink [u | l] = x [A_cat; R]^T and the routing folded into the GEMM on sm90_pipeline.cuh's
// ring. The kernel runs in thread block clusters of column tiles of one row block, which
// share out its shrink and sum the partials through distributed shared memory; it walks its
// tiles in runs of one row block and group where x's row blocks in flight fit the L2, and a
// run's later tiles reuse its first tile's z (sm90_walks.cuh's for_each_routed_tile).
#include <cutlass/arch/reg_reconfig.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "device_cache.h"
#include "routing_math.cuh"
#include "sm90_gemm.h"
#include "sm90_launch.cuh"
#include "sm90_pipeline.cuh"
#include "sm90_walks.cuh"

namespace ei {
namespace sm90 {
namespace {

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

// sm90_launch.cuh's launch_on_tiles in clusters of kCluster CTAs along the tile walk (tiles is a
// multiple of kCluster). Persistent, it launches as many clusters as fit on the device at once
// (GPCs need not hold a whole number of clusters, so this may leave SMs idle: the occupancy
// query says how many).
template <auto kKernel, int kCluster, int kSmem, int kThreads, class... Args>
cudaError_t launch_on_tile_clusters(int64_t tiles, cudaStream_t stream, const Args&... args) {
  static_assert(kSmem <= 227 * 1024, "over the opt-in shared memory of a 9.0 device");
  // A cluster's CTAs walk the same number of tiles, or one would wait for its peers forever.
  if (tiles % kCluster != 0) return cudaErrorInvalidValue;
  cudaError_t err = allow_shared_memory<kKernel>(kSmem);
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
        const cudaError_t query = cudaOccupancyMaxActiveClusters(&clusters, kKernel, &config);
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
    return launch_on_tiles<kKernel, kSmem, kThreads>(tiles, stream, args...);
  }
  const int64_t ctas =
      persistent_tiles() ? std::min<int64_t>(tiles, int64_t(clusters) * kCluster) : tiles;
  config.gridDim = dim3(unsigned(ctas));
  err = cudaLaunchKernelEx(&config, kKernel, args...);
  return err != cudaSuccess ? err : cudaGetLastError();
}

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
  constexpr auto kernel = &routed_gemm_kernel<Cfg, decltype(tma_x), decltype(tma_w),
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
      return launch_on_tile_clusters<kernel, 4, kSmem, Cfg::kThreads>(
          tiles, stream, tma_x, tma_w, tma_lora_a, tma_router, d, ptr, runs);
    case 2:
      return launch_on_tile_clusters<kernel, 2, kSmem, Cfg::kThreads>(
          tiles, stream, tma_x, tma_w, tma_lora_a, tma_router, d, ptr, runs);
    default:
      return launch_on_tiles<kernel, kSmem, Cfg::kThreads>(tiles, stream, tma_x, tma_w,
                                                           tma_lora_a, tma_router, d, ptr, runs);
  }
}

}  // namespace
}  // namespace sm90

using namespace sm90;

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

cudaError_t sm90_routed_gemm(DType dtype, const MorDims& dims, const MorForwardArgs& args,
                             cudaStream_t stream) {
  return with_16bit_type(dtype, [&](auto type) {
    return launch_routed<decltype(type)>(dims, args, stream);
  });
}

}  // namespace ei
