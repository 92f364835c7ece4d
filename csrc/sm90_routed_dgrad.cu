// The routed input gradient on sm_90a (sm90_gemm.h): dx = dy W + [du | dl] [A_cat; R] in one
// launch, with g = dy B and the backward routing folded into the GEMM on sm90_pipeline.cuh's
// ring, and the token reductions' partials from its reducer warp group
// (sm90_routed_dgrad_warps.cuh: its configuration, the reducer, the z warp and the B warps).
// Here: the kernel's TMA thread and consumers (route_dgrad_row), its host launch and
// sm90_gemm.h's sm90_routed_dgrad* entry points.
#include <cutlass/arch/reg_reconfig.h>

#include "dependent_launch.cuh"
#include "routing_math.cuh"
#include "sm90_gemm.h"
#include "sm90_launch.cuh"
#include "sm90_pipeline.cuh"
#include "sm90_routed_dgrad_warps.cuh"
#include "sm90_walks.cuh"

namespace ei {

int64_t sm90_routed_dgrad_row_tiles(int64_t tokens) {
  using Cfg = sm90::RoutedDgradConfig<cutlass::half_t>;  // the same tiles for both dtypes
  return (tokens + Cfg::kBM - 1) / Cfg::kBM;
}

namespace sm90 {
namespace {

// The most row tiles for which the routed input gradient writes the token reductions' partials
// (up to one per row tile: sm90_routed_dgrad_accepts).
constexpr int64_t kMaxRowTilePartials = 512;

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

// dx = dy W + [du | dl] [A_cat; R] (sm90_gemm.h), with g = dy B and the backward routing
// folded in: each K step (64 output columns) also brings those rows of B (zero-padded to 16
// columns, by the producer warp group's B warps) into the ring, and the consumers run g += dy B
// (a 64x16 MMA) beside the main 64x192 one, 8 % more MMA work and no separate read of dy for g.
// A tile's K steps run group by group (a segment each: O / G is a multiple of 64 when G > 1).
// After a group's steps one thread per row routes it in fp32 and writes du and dl into shared
// memory, and du A_g and dl R_g become two 16-deep K steps, before the next group's steps
// accumulate on (walked in runs, one group, a run's later tiles skip g's MMAs and the routing:
// their g, du and dl are the run's). The first column tile also writes its rows' dl sums
// (dc's partials). A fourth warp group, the reducer, computes dB's row-tile partials from the
// same dy tiles, with z routed by the producer warp group's z warp, and d[A_cat; R]'s from the
// tile's x, which the producer loads into three ring stages after each group's steps, and du
// and dl, into the walk's partial slots.
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

// The routed input gradient's walk and grid on the current device: round-robin over the CTAs,
// or in runs of tiles per CTA (as many CTAs as that takes), which skip g's MMAs and the
// routing after a run's first tile: one group only (the staging tile holds one group's g), by
// default where dy's row blocks in flight fit (at 12608 tokens on an H100/H200: O = 768, 26
// MB of 50, proj and fc2; not fc1's O = 3072). Round-robin on a grid that is a multiple of the
// column tiles, each CTA's tiles share a column tile, and it adds their partials into one slot
// (qkv and fc1 at 12608 tokens on 132 SMs: 33 slots for 99 row tiles). (Attribute queries
// only, cached: the binding sizes the partials with it, and the launch walks it.)
cudaError_t dgrad_launch(const MorDims& d, SegmentLaunch* launch) {
  using Cfg = RoutedDgradConfig<cutlass::half_t>;  // the same tiles for both dtypes
  const int64_t row_tiles = sm90_routed_dgrad_row_tiles(d.tokens);
  const int64_t col_tiles = (d.in_features + Cfg::kBN - 1) / Cfg::kBN;
  int64_t ctas = 0;  // tiles under 2^30: sm90_routed_dgrad_accepts
  bool runs = false;
  cudaError_t err = tile_ctas(row_tiles * col_tiles, &ctas);
  if (err == cudaSuccess && d.groups == 1) {
    err = walks_in_runs(1, int64_t(Cfg::kBM) * d.out_features * int64_t(sizeof(Cfg::T)), &runs);
  }
  *launch = segment_launch(int(row_tiles), int(col_tiles), int(ctas), runs);
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
  SegmentLaunch launch{};
  const cudaError_t err = dgrad_launch(d, &launch);
  if (err != cudaSuccess) return err;
  constexpr auto kernel =
      &routed_dgrad_kernel<Cfg, decltype(tma_dy), decltype(tma_w), decltype(tma_lora_a)>;
  return launch_on_ctas<kernel, int(sizeof(typename Cfg::Shared)), Cfg::kThreads>(
      launch.ctas, a.dependent_dgrad, stream, tma_dy, tma_x, tma_w, tma_lora_a, tma_router, d, ptr,
      launch.walk);
}

}  // namespace
}  // namespace sm90

using namespace sm90;


cudaError_t sm90_routed_dgrad_slots(const MorDims& dims, int64_t* slots) {
  SegmentLaunch launch{};
  const cudaError_t err = dgrad_launch(dims, &launch);
  *slots = launch.walk.slots;
  return err;
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
  // The partials, up to one per row tile, take r / 64 of dy's bytes (dB) and S / 64 of x's
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
  return with_16bit_type(dtype, [&](auto type) {
    return launch_routed_dgrad<decltype(type)>(dims, args, stream);
  });
}

}  // namespace ei
