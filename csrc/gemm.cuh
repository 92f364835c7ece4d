// One tiled GEMM for every matrix product of the MoR op:
//
//   C[m, n] = sum_k A(m, k) B(k, n)  +  sum_k' A2(m, k') B2(k', n)  (+ bias[n])
//
// The second sum is the "K-extension" of MOR_MATH.md: the rank-r LoRA expand (forward) and the
// [du | dl] [A_cat; R] term of the input gradient run in the same K loop as the base product,
// so nothing of size N x O is written twice. A batch index (grid.z) offsets every operand,
// which covers the block-diagonal B_cat of grouped (qkv) layers, and a split index divides the
// main reduction for the token reductions of the backward (fp32 partials, summed in a fixed
// order by sum_splits_kernel: deterministic, no atomics).
//
// fp16/bf16 multiply on tensor cores (WMMA m16n16k16, fp32 accumulation); fp32 uses FMA on the
// same shared-memory tiles so its results keep full fp32 precision (no TF32). Operand tiles
// reach shared memory by asynchronous copies (cp.async, sm_80 on) in a 2-3 stage ring, so no
// register holds a tile in flight. On a compute capability 9.0 GPU the two big products of
// 16-bit layers take the TMA + wgmma kernel of sm90_gemm.h instead (mor_kernels.cu decides).
#pragma once

#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "dependent_launch.cuh"
#include "numeric.cuh"

namespace ei {

// A row-major matrix in global memory, addressed by (stored row, column). Stored rows at or
// past `split` come from `hi`: [A_cat; R] is read from lora_a and router_weight in place.
template <typename T>
struct Operand {
  const T* lo;
  const T* hi;
  int64_t split;
  int64_t ld;            // elements between stored rows
  int64_t batch_stride;  // elements between the matrices of consecutive batch entries

  __device__ __forceinline__ const T* row(int64_t r, int batch) const {
    const T* base = r < split ? lo + r * ld : hi + (r - split) * ld;
    return base + batch * batch_stride;
  }
};

template <typename T>
Operand<T> dense(const T* p, int64_t ld, int64_t batch_stride = 0) {
  return {p, p, INT64_MAX, ld, batch_stride};
}

template <typename T>
Operand<T> stacked(const T* lo, const T* hi, int64_t split, int64_t ld) {
  return {lo, hi, split, ld, 0};
}

template <typename T, typename OutT>
struct GemmArgs {
  int m, n;                 // C is m x n per batch entry
  int k, k2;                // main and extension reduction lengths (k2 = 0: no extension)
  Operand<T> a, b, a2, b2;  // the layouts (which index is contiguous) are template flags
  const T* bias;            // [n] per batch entry, or null
  int64_t bias_batch_stride;
  OutT* c;
  int64_t ldc, c_batch_stride, c_split_stride;
  int batches, splits;      // grid.z = batches * splits
  int k_per_split;          // main reduction per split, a multiple of the tile depth; the
                            // extension and the bias belong to split 0 and need splits == 1
};

template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int SIMT_TX_>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  // Caps registers at 128 per thread: two 256-thread blocks per SM hide the global loads.
  static constexpr int MIN_BLOCKS = 65536 / 128 / THREADS;
  // fp32 path: threads form a SIMT_TY x SIMT_TX grid, each owning a strided micro-tile.
  static constexpr int SIMT_TX = SIMT_TX_, SIMT_TY = THREADS / SIMT_TX_;
};
using BigTile = Tile<128, 128, 2, 4, 16>;  // the N x O and N x K products
using TallTile = Tile<128, 32, 4, 1, 8>;   // few output columns: the shrinks, dy B_cat, dB
using WideTile = Tile<32, 128, 1, 4, 16>;  // few output rows: d[A_cat; R]

// Tile depth: 64 bytes of each row per stage for either element size.
template <typename T>
constexpr int kTileK = sizeof(T) == 2 ? 32 : 16;

// Asynchronous global -> shared copies (sm_80 on: LDGSTS, no registers staged); before sm_80 the
// same calls load and store synchronously, which the barriers of the pipeline order just as well.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define EI_ASYNC_COPY 1
#else
#define EI_ASYNC_COPY 0
#endif

__device__ __forceinline__ void copy16_async(void* smem, const void* gmem) {
#if EI_ASYNC_COPY
  const auto dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
#else
  *static_cast<uint4*>(smem) = *static_cast<const uint4*>(gmem);
#endif
}

__device__ __forceinline__ void async_commit() {
#if EI_ASYNC_COPY
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most PENDING of this thread's committed copy groups are still in flight.
template <int PENDING>
__device__ __forceinline__ void async_wait() {
#if EI_ASYNC_COPY
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
#endif
}

// Copies one ROWS x COLS tile (COLS contiguous in global memory) into a shared stage.
template <typename T, int ROWS_, int COLS, int THREADS>
struct TileLoader {
  static constexpr int ROWS = ROWS_;
  static constexpr int V = 16 / sizeof(T);  // elements per 16-byte vector
  static constexpr int LD = COLS + V;       // padded shared row: shifts banks, keeps alignment
  static constexpr int PER_ROW = COLS / V;
  static constexpr int CHUNKS = ROWS * PER_ROW / THREADS;
  static_assert(COLS % V == 0 && (ROWS * PER_ROW) % THREADS == 0, "tile must split evenly");

  // Stored rows [row0, row0 + ROWS) x columns [col0, col0 + COLS); zeros past row_end and
  // col_end. An asynchronous 16-byte copy where a chunk is in range and 16-byte aligned; odd
  // leading dimensions and column offsets (K = 100, a group's rank slice) and the zeros past
  // the edges take plain loads and stores, ordered by the same barriers.
  __device__ __forceinline__ static void copy(T* smem, const Operand<T>& op, int batch,
                                              int64_t row0, int64_t row_end, int64_t col0,
                                              int64_t col_end) {
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int idx = threadIdx.x + c * THREADS;
      const int64_t row = row0 + idx / PER_ROW;
      const int64_t col = col0 + (idx % PER_ROW) * V;
      T* const dst = smem + (idx / PER_ROW) * LD + (idx % PER_ROW) * V;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (row < row_end && col < col_end) {
        const T* p = op.row(row, batch) + col;
        if (col + V <= col_end && (reinterpret_cast<uintptr_t>(p) & 15) == 0) {
          copy16_async(dst, p);
          continue;
        }
        // Packed with shifts rather than through a T* into `v`, which would put the vector
        // on the stack.
        uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
        for (int i = 0; i < V; ++i) {
          constexpr int kBits = 8 * sizeof(T);
          if (col + i < col_end) w[i * kBits / 32] |= to_bits(p[i]) << (i * kBits % 32);
        }
        v = make_uint4(w[0], w[1], w[2], w[3]);
      }
      *reinterpret_cast<uint4*>(dst) = v;
    }
  }
};

// Shared tiles keep the global orientation: A is [BM][BK] when k is contiguous ("K-major"),
// else [BK][BM]; B is [BN][BK] when K-major, else [BK][BN]. WMMA reads either through the
// fragment layout, so no operand is transposed on the way in.
template <typename T, typename Cfg, bool A_KMAJOR, bool B_KMAJOR>
struct TileShapes {
  static constexpr int BK = kTileK<T>;
  using LoadA = TileLoader<T, A_KMAJOR ? Cfg::BM : BK, A_KMAJOR ? BK : Cfg::BM, Cfg::THREADS>;
  using LoadB = TileLoader<T, B_KMAJOR ? Cfg::BN : BK, B_KMAJOR ? BK : Cfg::BN, Cfg::THREADS>;
  static constexpr int A_ELEMS = LoadA::ROWS * LoadA::LD;
  static constexpr int B_ELEMS = LoadB::ROWS * LoadB::LD;
  // WMMA needs 32-byte aligned fragment pointers: every buffer starts on such a boundary.
  static_assert((A_ELEMS * sizeof(T)) % 32 == 0 && (B_ELEMS * sizeof(T)) % 32 == 0, "align");
};

// Tensor-core product of the shared tiles: each warp owns a (BM/WARPS_M) x (BN/WARPS_N) block
// of 16 x 16 fp32 accumulator fragments.
template <typename T, typename Cfg, bool A_KMAJOR, bool B_KMAJOR>
struct WmmaMma {
  using Shapes = TileShapes<T, Cfg, A_KMAJOR, B_KMAJOR>;
  static constexpr int WM = Cfg::BM / Cfg::WARPS_M, WN = Cfg::BN / Cfg::WARPS_N;
  static constexpr int FM = WM / 16, FN = WN / 16;
  static constexpr int LDA = Shapes::LoadA::LD, LDB = Shapes::LoadB::LD;
  using LayoutA = std::conditional_t<A_KMAJOR, nvcuda::wmma::row_major, nvcuda::wmma::col_major>;
  using LayoutB = std::conditional_t<B_KMAJOR, nvcuda::wmma::col_major, nvcuda::wmma::row_major>;

  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
  int warp_m, warp_n;

  __device__ WmmaMma() {
    const int warp = threadIdx.x / 32;
    warp_m = (warp / Cfg::WARPS_N) * WM;
    warp_n = (warp % Cfg::WARPS_N) * WN;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
  }

  __device__ __forceinline__ void step(const T* sa, const T* sb) {
    using namespace nvcuda;
#pragma unroll
    for (int kk = 0; kk < Shapes::BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> fa[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> fb[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        const int m = warp_m + 16 * i;
        wmma::load_matrix_sync(fa[i], A_KMAJOR ? sa + m * LDA + kk : sa + kk * LDA + m, LDA);
      }
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        const int n = warp_n + 16 * j;
        wmma::load_matrix_sync(fb[j], B_KMAJOR ? sb + n * LDB + kk : sb + kk * LDB + n, LDB);
      }
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }

  // Fragments have an opaque register layout: each goes through a per-warp 16 x 16 scratch
  // so that `write(row, col, value)` sees tile coordinates (consecutive lanes, columns).
  template <typename Write>
  __device__ __forceinline__ void epilogue(float* scratch, Write write) {
    float* mine = scratch + (threadIdx.x / 32) * 256;
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        nvcuda::wmma::store_matrix_sync(mine, acc[i][j], 16, nvcuda::wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int idx = lane + 32 * e;
          write(warp_m + 16 * i + idx / 16, warp_n + 16 * j + idx % 16, mine[idx]);
        }
        __syncwarp();
      }
  }

  static constexpr int kScratchBytes = Cfg::THREADS / 32 * 256 * sizeof(float);
};

// Product of the shared tiles with fp32 FMA: thread (ty, tx) owns rows ty + i*TY and columns
// tx + j*TX of the tile, so neighbouring lanes store neighbouring columns. fp32's path (full
// fp32 precision), and bf16's on targets without bf16 tensor cores (sm_75).
template <typename T, typename Cfg, bool A_KMAJOR, bool B_KMAJOR>
struct SimtMma {
  using Shapes = TileShapes<T, Cfg, A_KMAJOR, B_KMAJOR>;
  static constexpr int TX = Cfg::SIMT_TX, TY = Cfg::SIMT_TY;
  static constexpr int RM = Cfg::BM / TY, RN = Cfg::BN / TX;
  static constexpr int LDA = Shapes::LoadA::LD, LDB = Shapes::LoadB::LD;
  static_assert(Cfg::BM % TY == 0 && Cfg::BN % TX == 0, "SIMT grid must tile the block");

  float acc[RM][RN];
  int tx, ty;

  __device__ SimtMma() : tx(threadIdx.x % TX), ty(threadIdx.x / TX) {
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < RN; ++j) acc[i][j] = 0.0f;
  }

  __device__ __forceinline__ void step(const T* sa, const T* sb) {
#pragma unroll
    for (int kk = 0; kk < Shapes::BK; ++kk) {
      float a[RM], b[RN];
#pragma unroll
      for (int i = 0; i < RM; ++i) {
        const int m = ty + i * TY;
        a[i] = to_float(A_KMAJOR ? sa[m * LDA + kk] : sa[kk * LDA + m]);
      }
#pragma unroll
      for (int j = 0; j < RN; ++j) {
        const int n = tx + j * TX;
        b[j] = to_float(B_KMAJOR ? sb[n * LDB + kk] : sb[kk * LDB + n]);
      }
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < RN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }

  template <typename Write>
  __device__ __forceinline__ void epilogue(float*, Write write) {
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < RN; ++j) write(ty + i * TY, tx + j * TX, acc[i][j]);
  }

  static constexpr int kScratchBytes = 0;
};

// bf16 WMMA exists from sm_80 on: compiled for an older target (sm_75, where `precision:
// auto` picks fp16 anyway), bf16 products take the FMA path, slower but exact.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
constexpr bool kBf16TensorCores = false;
#else
constexpr bool kBf16TensorCores = true;
#endif

template <typename T>
constexpr bool kTensorCores =
    !std::is_same_v<T, float> && (kBf16TensorCores || !std::is_same_v<T, __nv_bfloat16>);

template <typename T, typename Cfg, bool A_KMAJOR, bool B_KMAJOR>
using MmaFor = std::conditional_t<kTensorCores<T>, WmmaMma<T, Cfg, A_KMAJOR, B_KMAJOR>,
                                  SimtMma<T, Cfg, A_KMAJOR, B_KMAJOR>>;

// Pipeline depth: three stages where they fit the 48 KiB of static shared memory (the thin
// tiles), else two (the 128 x 128 tile: 40 KiB in 16-bit types). Copies of the next stages are
// in flight while the current one is multiplied, without registers holding them.
template <typename T, typename Cfg, bool A_KMAJOR, bool B_KMAJOR>
constexpr int kStages =
    3 * (TileShapes<T, Cfg, A_KMAJOR, B_KMAJOR>::A_ELEMS +
         TileShapes<T, Cfg, A_KMAJOR, B_KMAJOR>::B_ELEMS) * int(sizeof(T)) <= 48 * 1024
        ? 3
        : 2;

// The FMA path keeps a 64-value accumulator per thread on the 128 x 128 tile, and before sm_80
// the copies go through registers: both spill under the 128-register cap, so they get one
// block per SM and the registers they want.
template <typename T, typename Cfg>
constexpr int kMinBlocks = kTensorCores<T> && EI_ASYNC_COPY ? Cfg::MIN_BLOCKS : 1;

template <typename T, typename OutT, typename Cfg, bool A_KMAJOR, bool B_KMAJOR>
__global__ void __launch_bounds__(Cfg::THREADS, (kMinBlocks<T, Cfg>))
    gemm_kernel(const GemmArgs<T, OutT> args) {
  using Shapes = TileShapes<T, Cfg, A_KMAJOR, B_KMAJOR>;
  using Mma = MmaFor<T, Cfg, A_KMAJOR, B_KMAJOR>;
  constexpr int BK = Shapes::BK;
  constexpr int STAGES = kStages<T, Cfg, A_KMAJOR, B_KMAJOR>;
  constexpr int kTileBytes = STAGES * (Shapes::A_ELEMS + Shapes::B_ELEMS) * int(sizeof(T));
  constexpr int kBytes = kTileBytes > Mma::kScratchBytes ? kTileBytes : Mma::kScratchBytes;
  __shared__ __align__(128) unsigned char smem[kBytes];
  T* const tiles = reinterpret_cast<T*>(smem);
  // Stage s of the ring (pointer arithmetic: an array of stage pointers indexed at run time
  // would live on the stack).
  const auto stage_a = [&](int s) { return tiles + s * Shapes::A_ELEMS; };
  const auto stage_b = [&](int s) {
    return tiles + STAGES * Shapes::A_ELEMS + s * Shapes::B_ELEMS;
  };

  // A kernel launched as this one's programmatic dependent (the routed input gradient after
  // the u it reads) may be scheduled once every block has started: it waits for this grid's
  // end before it reads anything.
  allow_dependent_launch();
  const int batch = blockIdx.z / args.splits;
  const int split = blockIdx.z % args.splits;
  const int64_t m0 = int64_t(blockIdx.x) * Cfg::BM;
  const int n0 = blockIdx.y * Cfg::BN;
  const int k_begin = split * args.k_per_split;
  const int k_end = min(args.k, k_begin + args.k_per_split);
  const int main_tiles = k_end > k_begin ? (k_end - k_begin + BK - 1) / BK : 0;
  const int ext_tiles = split == 0 ? (args.k2 + BK - 1) / BK : 0;
  const int num_tiles = main_tiles + ext_tiles;

  // Starts the copies of k tile t (main reduction, then the extension) into stage t % STAGES.
  auto fetch = [&](int t) {
    const bool ext = t >= main_tiles;
    const Operand<T> a = ext ? args.a2 : args.a;
    const Operand<T> b = ext ? args.b2 : args.b;
    const int k0 = ext ? (t - main_tiles) * BK : k_begin + t * BK;
    const int k_stop = ext ? args.k2 : k_end;
    T* const sa = stage_a(t % STAGES);
    T* const sb = stage_b(t % STAGES);
    if constexpr (A_KMAJOR) {
      Shapes::LoadA::copy(sa, a, batch, m0, args.m, k0, k_stop);
    } else {
      Shapes::LoadA::copy(sa, a, batch, k0, k_stop, m0, args.m);
    }
    if constexpr (B_KMAJOR) {
      Shapes::LoadB::copy(sb, b, batch, n0, args.n, k0, k_stop);
    } else {
      Shapes::LoadB::copy(sb, b, batch, k0, k_stop, n0, args.n);
    }
  };

  Mma mma;
  // One commit group per k tile (empty past the last), so that waiting for all but the
  // newest STAGES - 2 groups always means: tile t has landed.
#pragma unroll
  for (int t = 0; t < STAGES - 1; ++t) {
    if (t < num_tiles) fetch(t);
    async_commit();
  }
  for (int t = 0; t < num_tiles; ++t) {
    async_wait<STAGES - 2>();
    // Every thread's part of tile t is in shared memory, and every warp is done with tile
    // t - 1, whose stage the fetch below refills.
    __syncthreads();
    if (t + STAGES - 1 < num_tiles) fetch(t + STAGES - 1);
    async_commit();
    mma.step(stage_a(t % STAGES), stage_b(t % STAGES));
  }
  async_wait<0>();
  __syncthreads();  // the epilogue's scratch reuses the stages

  OutT* const c = args.c + split * args.c_split_stride + batch * args.c_batch_stride;
  const T* const bias = args.bias ? args.bias + batch * args.bias_batch_stride : nullptr;
  mma.epilogue(reinterpret_cast<float*>(smem), [&](int r, int col, float v) {
    const int64_t row = m0 + r;
    const int n = n0 + col;
    if (row < args.m && n < args.n) {
      if (bias) v += to_float(bias[n]);
      c[row * args.ldc + n] = from_float<OutT>(v);
    }
  });
}

template <typename Cfg, bool A_KMAJOR, bool B_KMAJOR, typename T, typename OutT>
void launch_gemm(const GemmArgs<T, OutT>& args, cudaStream_t stream) {
  if (args.m == 0 || args.n == 0 || args.batches == 0) return;
  const dim3 grid((args.m + Cfg::BM - 1) / Cfg::BM, (args.n + Cfg::BN - 1) / Cfg::BN,
                  args.batches * args.splits);
  gemm_kernel<T, OutT, Cfg, A_KMAJOR, B_KMAJOR><<<grid, Cfg::THREADS, 0, stream>>>(args);
}

// Main-reduction length per split: `splits` near-equal parts in whole tiles.
template <typename T>
int split_length(int64_t k, int splits) {
  const int64_t part = (k + splits - 1) / splits;
  return int((part + kTileK<T> - 1) / kTileK<T> * kTileK<T>);
}

}  // namespace ei
