// A positive per-device value computed once (an attribute query, a one-time kernel setting):
// later calls, e.g. inside a CUDA graph capture, make no CUDA API call at all.
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>

namespace ei {

// One cache per Query type: every call site passes its own lambda, so each has its own cache.
// query(int* out) stores a positive value in *out; a failed query is not cached.
template <typename Query>
cudaError_t cached_per_device(int device, int* value, Query query) {
  static std::atomic<int> cache[64];
  const bool cached = device >= 0 && device < 64;
  if (cached && (*value = cache[device].load(std::memory_order_relaxed)) > 0) return cudaSuccess;
  const cudaError_t err = query(value);
  if (err == cudaSuccess && cached) cache[device].store(*value, std::memory_order_relaxed);
  return err;
}

// The device's SM count, queried once.
inline cudaError_t multiprocessor_count(int device, int* sms) {
  return cached_per_device(device, sms, [&](int* out) {
    return cudaDeviceGetAttribute(out, cudaDevAttrMultiProcessorCount, device);
  });
}

// The device's L2 cache size in bytes, queried once.
inline cudaError_t l2_cache_bytes(int device, int* bytes) {
  return cached_per_device(device, bytes, [&](int* out) {
    return cudaDeviceGetAttribute(out, cudaDevAttrL2CacheSize, device);
  });
}

}  // namespace ei
