// GeGLU forward / backward: elementwise over [rows, ffn], grid-stride, float32 math.
// Plain pointers, no torch headers.
#include "geglu.h"

namespace mmcap {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    geglu_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int64_t ffn) {
  const int64_t n = rows * ffn;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t r = i / ffn, j = i - r * ffn;
    const T* xr = x + r * 2 * ffn;
    float unused;
    y[i] = from_float<T>(gelu_tanh(to_float(xr[j]), &unused) * to_float(xr[ffn + j]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    geglu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                     int64_t rows, int64_t ffn) {
  const int64_t n = rows * ffn;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t r = i / ffn, j = i - r * ffn;
    const T* xr = x + r * 2 * ffn;
    T* dxr = dx + r * 2 * ffn;
    float dgelu;
    const float gelu = gelu_tanh(to_float(xr[j]), &dgelu);
    const float d = to_float(dy[i]);
    dxr[j] = from_float<T>(d * to_float(xr[ffn + j]) * dgelu);
    dxr[ffn + j] = from_float<T>(d * gelu);
  }
}

int blocks_for(int64_t n) { return grid_size((n + kThreads - 1) / kThreads, 65535 * 8); }

}  // namespace

void geglu_fwd(DType dtype, const void* x, void* y, int64_t rows, int64_t ffn,
               cudaStream_t stream) {
  const int blocks = blocks_for(rows * ffn);
  switch (dtype) {
    case DType::kFloat32:
      geglu_fwd_kernel<float><<<blocks, kThreads, 0, stream>>>(
          static_cast<const float*>(x), static_cast<float*>(y), rows, ffn);
      break;
    case DType::kFloat16:
      geglu_fwd_kernel<__half><<<blocks, kThreads, 0, stream>>>(
          static_cast<const __half*>(x), static_cast<__half*>(y), rows, ffn);
      break;
    case DType::kBFloat16:
      geglu_fwd_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(x), static_cast<__nv_bfloat16*>(y), rows, ffn);
      break;
  }
}

void geglu_bwd(DType dtype, const void* dy, const void* x, void* dx, int64_t rows, int64_t ffn,
               cudaStream_t stream) {
  const int blocks = blocks_for(rows * ffn);
  switch (dtype) {
    case DType::kFloat32:
      geglu_bwd_kernel<float><<<blocks, kThreads, 0, stream>>>(
          static_cast<const float*>(dy), static_cast<const float*>(x), static_cast<float*>(dx),
          rows, ffn);
      break;
    case DType::kFloat16:
      geglu_bwd_kernel<__half><<<blocks, kThreads, 0, stream>>>(
          static_cast<const __half*>(dy), static_cast<const __half*>(x),
          static_cast<__half*>(dx), rows, ffn);
      break;
    case DType::kBFloat16:
      geglu_bwd_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(dy), static_cast<const __nv_bfloat16*>(x),
          static_cast<__nv_bfloat16*>(dx), rows, ffn);
      break;
  }
}

}  // namespace mmcap
