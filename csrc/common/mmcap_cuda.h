// Shared by the csrc/<op>/ kernels: dtype tags, float <-> storage conversion, block reductions.
// CUDA headers only (no torch): .cu files stay fast to compile (KERNELS.md: 3 s vs 53 s per arch).
#pragma once

#include <cmath>
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace mmcap {

// Storage dtype of a kernel's tensors; the *_api.cpp bindings map torch dtypes onto it.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The bindings (*_api.cpp, host compiler) see only the host-compatible part of this header.
#ifdef __CUDACC__
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Sum over a block of kThreads threads (warp shuffles, then one warp over the warp sums).
// Every thread gets the result. `scratch` holds kThreads / 32 floats of shared memory.
template <int kThreads>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block of whole warps");
  constexpr int kWarps = kThreads / 32;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kWarps ? scratch[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

#endif  // __CUDACC__

// Online-softmax pair (running max m, sum of exp(x - m)); merge is associative.
struct MaxSum {
  float m;
  float s;
};

__host__ __device__ __forceinline__ MaxSum merge_max_sum(MaxSum a, MaxSum b) {
  const float m = a.m > b.m ? a.m : b.m;
  if (m == -INFINITY) return {m, 0.f};  // both empty: avoid (-inf) - (-inf)
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

#ifdef __CUDACC__

template <int kThreads>
__device__ __forceinline__ MaxSum block_max_sum(MaxSum v, MaxSum* scratch) {
  constexpr int kWarps = kThreads / 32;
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = merge_max_sum(v, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kWarps ? scratch[lane] : MaxSum{-INFINITY, 0.f};
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = merge_max_sum(v, other);
  }
  return v;
}

#endif  // __CUDACC__

inline int grid_size(int64_t work_items, int64_t cap) {
  return static_cast<int>(work_items < cap ? (work_items > 0 ? work_items : 1) : cap);
}

}  // namespace mmcap
