// The Hopper (sm_90a) GEMM with a K-extension, as plain C++ for mor_kernels.cu (which then
// needs no CuTe headers):
//
//   C[m, n] = sum_k A(m, k) B(n, k)  +  sum_k' A2(m, k') B2(n, k')  (+ bias[n])
//
// A and A2 are row-major [m, k] / [m, k2]. B and B2 are either row-major [n, k] / [n, k2]
// ("k-major": the forward's W and its LoRA up-projection) or row-major [k, n] / [k2, n]
// ("n-major": W and [A_cat; R] in the input gradient). Operands reach shared memory by TMA and
// are multiplied by warp-group MMA (wgmma); fp16 and bf16 only, fp32 accumulation.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "mor_kernels.h"

namespace ei {

struct ExtGemmArgs {
  int m, n, k, k2;  // k2 = 0: no extension
  bool b_n_major;   // B and B2 are [k, n] / [k2, n] rather than [n, k] / [n, k2]
  const void* a;  int64_t lda;
  const void* b;  int64_t ldb;
  const void* a2; int64_t lda2;
  const void* b2; int64_t ldb2;
  const void* bias;  // [n] or null
  void* c;        int64_t ldc;
};

// True when this build holds the sm_90a kernels (CUDA architecture "90a" and the CUTLASS
// headers were both present at build time).
bool sm90_gemm_built();

// Whether sm90_ext_gemm can run these arguments: a 16-bit dtype, TMA's alignment (every
// operand's base address 16-byte aligned, every row stride a multiple of 16 bytes), positive
// sizes and at most 65535 row tiles. The caller uses the portable GEMM otherwise, so a
// misaligned view is slower, never wrong.
bool sm90_gemm_accepts(DType dtype, const ExtGemmArgs& args);

// Launches the kernel; call only on a compute capability 9.0 device after sm90_gemm_accepts.
cudaError_t sm90_ext_gemm(DType dtype, const ExtGemmArgs& args, cudaStream_t stream);

}  // namespace ei
