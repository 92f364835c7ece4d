// Programmatic dependent launch (compute capability 9.0 and up): a kernel launched with
// launch_as_dependent() may be scheduled before the kernel ahead of it in the stream has
// ended, once every CTA of that kernel has called allow_dependent_launch() (or exited), so
// that its launch latency hides behind the other's tail. It must call wait_for_prerequisite()
// before its first global memory access: that waits for the kernel ahead to end and makes
// all of its writes visible. Launched the usual way, or below 9.0, both calls do nothing.
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace ei {

__device__ __forceinline__ void wait_for_prerequisite() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Called by every thread of a CTA (nothing is said of a CTA where only some call it).
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// `kernel` on `stream` as a programmatic dependent of the kernel ahead of it (a 9.0+ device),
// with shared_bytes of dynamic shared memory.
template <class... Params, class... Args>
cudaError_t launch_as_dependent(void (*kernel)(Params...), dim3 grid, dim3 block,
                                size_t shared_bytes, cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute overlap = {};
  overlap.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  overlap.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  config.attrs = &overlap;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace ei
