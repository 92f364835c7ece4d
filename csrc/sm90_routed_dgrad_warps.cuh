// The routed input gradient's configuration (its shared memory, its warp groups' registers)
// and the roles beside its consumers and TMA thread (sm90_routed_dgrad.cu): the z warp, which
// routes z = (p S) u from the saved u and p, the B warps, which lay out each K step's rows of
// B as g's MMA operand, and the reducer warp group, which writes the token reductions'
// partials in slots (dB's dy^T z, d[A_cat; R]'s x^T [du | dl]); with what the kernel shares
// with them (RoutedDgradPointers, GroupSteps) and compile-time checks of their shared-memory
// views (dy_view_is_transposed, du_view_is_transposed, lora_b_offsets_match).
#pragma once

#include "mor_kernels.h"
#include "routing_math.cuh"
#include "sm90_pipeline.cuh"
#include "sm90_walks.cuh"

namespace ei {
namespace sm90 {

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

// What the routed input gradient reads and writes besides its TMA operands.
template <typename T>
struct RoutedDgradPointers {
  const T* lora_b;     // [O, r], by bulk copies of each K step's rows (expand_lora_b)
  const float* u;      // [N, u_ld]: u = x A_cat^T in fp32 (the forward's [u | l], or recomputed)
  int64_t u_ld;
  const float* probs;  // [N, G*L]
  T* dx;               // [N, K]
  // Where x is folded in: [slots, S, K], the sums of [du | dl]^T x over the row tiles of
  // each slot (SegmentWalk::slots) for d[A_cat; R], and d_shrink null; else null, and
  // d_shrink [N, shrink_ld()] gets [du | dl] for a split-K launch of its own.
  float* shrink_partial;
  T* d_shrink;
  float* dl_partial;   // [row tiles, G*L]: each tile's fp32 sums of dl, for dc
  float* lora_b_partial;  // [slots, O, r]: the sums of dy^T z over each slot's row tiles, for dB
};

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
// tile's column tiles split the work and every partial element has one writer, which stores
// it or adds it to its slot (SegmentWalk::slots; the sum launch adds the slots in a fixed
// order). z of the step's group comes from
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
  // acc's values go into a partial slot (SegmentWalk::slots), element(v) where value v goes
  // or null: stored by the CTA's first tile of the slot, added by its later ones with a
  // reduction that the L2 carries out (red.global.add: fire and forget, as the store is; a load
  // of the sum back would hold this warp group, and with it the ring, for the load's latency).
  // Every slot element has this one thread as its only writer, in walk order (its tiles of
  // one column tile hold the same elements), so the order of the additions, and the bits, are
  // fixed. (The L2's float additions flush subnormal sums to zero.)
  const auto put = [&](bool adds, const auto& element) {
    CUTE_UNROLL
    for (int v = 0; v < size(acc); ++v) {
      float* const at = element(v);
      if (at == nullptr) continue;
      if (adds) {
        asm volatile("red.global.add.f32 [%0], %1;" ::"l"(at), "f"(acc(v)) : "memory");
      } else {
        *at = acc(v);
      }
    }
  };

  int stage = 0, phase = 0;
  int share = 0;  // the tile's next K step to multiply
  for_each_segment(col_tiles, d.groups, walk, [&](int row_tile, int col, int group,
                                                            int segment, bool) {
    const int64_t slot = walk.slot(row_tile);
    const bool adds = walk.adds(row_tile);
    float* const partial = ptr.lora_b_partial + slot * d.out_features * d.rank;
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
        const auto element = [&](int v) -> float* {
          const auto [o, j] = tC(v);
          const int column = kt * Cfg::kBK + o;
          return column < d.out_features && j < d.rank ? partial + int64_t(column) * d.rank + j
                                                       : nullptr;
        };
        multiply(stage, tB(_, _, _, buffer));
        Barrier::arrive(&smem.empty[stage]);
        put(adds, element);
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
    float* const shrink_partial = ptr.shrink_partial + slot * d.shrink_width() * n;
    // acc = x^T (du or dl) of the stage, into `rows` rows of [A_cat; R] from `first_row` on,
    // the chunk's columns from `first_column` on
    const auto multiply_into = [&](int at, const auto& b, int first_column, int first_row,
                                   int rows) {
      const auto element = [&](int v) -> float* {
        const auto [o, j] = tC(v);
        const int column = first_column + o;
        return column < n && j < rows ? shrink_partial + int64_t(first_row + j) * n + column
                                      : nullptr;
      };
      multiply(at, b);
      put(adds, element);
    };
    for (int c = 0; c < Cfg::kXChunks; ++c) {
      TxBarrier::wait(&smem.full[stage], phase);
      if (c == 0) Barrier::wait(&smem.du_ready, segment & 1);
      const int first_column = (col * Cfg::kXChunks + c) * Cfg::kBK;
      if (first_column < n) {  // the group's r rows of A_cat, then its L of R after A_cat
        multiply_into(stage, tDu, first_column, group * d.rank, d.rank);
        if (d.router) {
          multiply_into(stage, tDl, first_column, d.groups * d.rank + group * d.logits,
                        d.logits);
        }
      }
      Barrier::arrive(&smem.empty[stage]);
      if (++stage == kStages) stage = 0, phase ^= 1;
    }
    Barrier::arrive(&smem.du_free);  // every MMA reading du and dl has retired
  });
}

}  // namespace sm90
}  // namespace ei
