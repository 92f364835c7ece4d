// The host launch helpers of the sm_90a kernels (the routed forward's cluster launch and its
// cluster size are in sm90_routed_forward.cu): how many CTAs (one per SM, or one per tile), the
// shared-memory opt-in, plain and programmatic-dependent launches, whether the routed kernels
// walk in runs, the dispatch on the 16-bit dtype, and TMA's alignment test. Only attribute
// queries, cached per device, so every launch is also safe during CUDA graph capture. The
// kernel is a template argument throughout, so that each kernel has caches of its own (keyed
// by the pointer's type, two kernels of the same signature would share one, and the second
// would skip its shared-memory opt-in).
#pragma once

#include <cuda_runtime.h>
#include <cutlass/numeric_types.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "dependent_launch.cuh"
#include "device_cache.h"
#include "mor_kernels.h"

namespace ei {
namespace sm90 {

// Whether EI_KERNELS_CUDA_SM90_PERSISTENT leaves the kernels persistent (one CTA per SM
// walking the tiles; "0": one CTA per tile).
inline bool persistent_tiles() {
  const char* const switch_value = std::getenv("EI_KERNELS_CUDA_SM90_PERSISTENT");
  return switch_value == nullptr || std::strcmp(switch_value, "0") != 0;
}

// The opt-in to more than 48 KiB of dynamic shared memory, once per device and kernel (a plain
// attribute call: no stream work, so it is also safe during CUDA graph capture).
template <auto kKernel>
cudaError_t allow_shared_memory(int bytes) {
  int device = 0, done = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cached_per_device(device, &done, [&](int* out) {
    *out = 1;
    return cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  });
}

// The CTAs of a launch over `tiles` output tiles (sm90_pipeline.cuh's for_each_tile): one per
// SM (persistent), unless switched off (then one per tile). (Attribute queries only, cached:
// safe during CUDA graph capture.)
inline cudaError_t tile_ctas(int64_t tiles, int64_t* ctas) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = multiprocessor_count(device, &sms);
  *ctas = persistent_tiles() ? std::min<int64_t>(tiles, sms) : tiles;
  return err;
}

// kKernel on `ctas` CTAs; with as_dependent, as the programmatic dependent of the kernel
// ahead (dependent_launch.cuh).
template <auto kKernel, int kSmem, int kThreads, class... Args>
cudaError_t launch_on_ctas(int64_t ctas, bool as_dependent, cudaStream_t stream,
                           const Args&... args) {
  static_assert(kSmem <= 227 * 1024, "over the opt-in shared memory of a 9.0 device");
  cudaError_t err = allow_shared_memory<kKernel>(kSmem);
  if (err != cudaSuccess) return err;
  const dim3 grid{unsigned(ctas)};
  if (as_dependent) {
    err = launch_as_dependent(kKernel, grid, dim3(kThreads), kSmem, stream, args...);
    return err != cudaSuccess ? err : cudaGetLastError();
  }
  kKernel<<<grid, kThreads, kSmem, stream>>>(args...);
  return cudaGetLastError();
}

// kKernel over `tiles` output tiles (sm90_pipeline.cuh's for_each_tile).
template <auto kKernel, int kSmem, int kThreads, class... Args>
cudaError_t launch_on_tiles(int64_t tiles, cudaStream_t stream, const Args&... args) {
  int64_t ctas = 0;
  const cudaError_t err = tile_ctas(tiles, &ctas);
  if (err != cudaSuccess) return err;
  return launch_on_ctas<kKernel, kSmem, kThreads>(ctas, false, stream, args...);
}

// Whether a routed kernel walks its tiles in runs (sm90_walks.cuh's for_each_routed_tile,
// for_each_segment): EI_KERNELS_CUDA_SM90_RUNS=0 never, =1 always (to measure both ways); by
// default where the row blocks that its CTAs hold at once (one per cluster of `cluster` CTAs
// on every SM, of row_block_bytes each) take at most half of the L2, so that a CTA still finds
// its row block there for the run's next tile. (Attribute queries only, cached.)
inline cudaError_t walks_in_runs(int cluster, int64_t row_block_bytes, bool* runs) {
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

// launch(cutlass::half_t{}) or launch(cutlass::bfloat16_t{}): a kernel's launcher for the
// 16-bit dtype that it runs in (float, which the sm_90a kernels do not take: an invalid value).
template <class Launch>
cudaError_t with_16bit_type(DType dtype, Launch&& launch) {
  switch (dtype) {
    case DType::kHalf:
      return launch(cutlass::half_t{});
    case DType::kBFloat16:
      return launch(cutlass::bfloat16_t{});
    case DType::kFloat:
      break;
  }
  return cudaErrorInvalidValue;
}

// TMA's base alignment.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace sm90
}  // namespace ei
