// RMSNorm(1 + w) forward / backward kernels: one block per row (grid-stride over rows),
// float32 statistics. Plain pointers, no torch headers.
#include "rmsnorm.h"

namespace mmcap {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBwdBlocks = 1024;  // dw partials: kMaxBwdBlocks x hidden float32 at most

template <typename T>
__global__ void __launch_bounds__(kThreads)
    rmsnorm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                       float* __restrict__ rstd, int64_t rows, int64_t hidden, float eps) {
  __shared__ float scratch[kThreads / 32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * hidden;
    float ss = 0.f;
    for (int64_t j = threadIdx.x; j < hidden; j += kThreads) {
      const float v = to_float(xr[j]);
      ss += v * v;
    }
    ss = block_sum<kThreads>(ss, scratch);
    const float inv = rsqrtf(ss / static_cast<float>(hidden) + eps);
    if (threadIdx.x == 0) rstd[r] = inv;
    T* yr = y + r * hidden;
    for (int64_t j = threadIdx.x; j < hidden; j += kThreads) {
      yr[j] = from_float<T>(to_float(xr[j]) * inv * (1.f + to_float(w[j])));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    rmsnorm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                       const T* __restrict__ w, const float* __restrict__ rstd,
                       T* __restrict__ dx, float* __restrict__ dw_partial, int64_t rows,
                       int64_t hidden) {
  extern __shared__ float dw_acc[];  // [hidden]: column j is owned by thread j % kThreads
  __shared__ float scratch[kThreads / 32];
  for (int64_t j = threadIdx.x; j < hidden; j += kThreads) dw_acc[j] = 0.f;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * hidden;
    const T* dyr = dy + r * hidden;
    const float inv = rstd[r];
    float dot = 0.f;  // sum_j g_j * xhat_j
    for (int64_t j = threadIdx.x; j < hidden; j += kThreads) {
      const float xhat = to_float(xr[j]) * inv;
      const float d = to_float(dyr[j]);
      dot += d * (1.f + to_float(w[j])) * xhat;
      dw_acc[j] += d * xhat;
    }
    const float mean = block_sum<kThreads>(dot, scratch) / static_cast<float>(hidden);
    T* dxr = dx + r * hidden;
    for (int64_t j = threadIdx.x; j < hidden; j += kThreads) {
      const float xhat = to_float(xr[j]) * inv;
      const float g = to_float(dyr[j]) * (1.f + to_float(w[j]));
      dxr[j] = from_float<T>(inv * (g - xhat * mean));
    }
  }
  for (int64_t j = threadIdx.x; j < hidden; j += kThreads) {
    dw_partial[blockIdx.x * hidden + j] = dw_acc[j];
  }
}

template <typename T>
void launch_fwd(const void* x, const void* w, void* y, float* rstd, int64_t rows,
                int64_t hidden, float eps, cudaStream_t stream) {
  rmsnorm_fwd_kernel<T><<<grid_size(rows, 65535), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(w), static_cast<T*>(y), rstd, rows,
      hidden, eps);
}

template <typename T>
void launch_bwd(const void* dy, const void* x, const void* w, const float* rstd, void* dx,
                float* dw_partial, int64_t rows, int64_t hidden, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(hidden) * sizeof(float);
  rmsnorm_bwd_kernel<T><<<rmsnorm_bwd_blocks(rows), kThreads, smem, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(w), rstd,
      static_cast<T*>(dx), dw_partial, rows, hidden);
}

}  // namespace

int rmsnorm_bwd_blocks(int64_t rows) { return grid_size(rows, kMaxBwdBlocks); }

void rmsnorm_fwd(DType dtype, const void* x, const void* w, void* y, float* rstd, int64_t rows,
                 int64_t hidden, float eps, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_fwd<float>(x, w, y, rstd, rows, hidden, eps, stream);
    case DType::kFloat16: return launch_fwd<__half>(x, w, y, rstd, rows, hidden, eps, stream);
    case DType::kBFloat16:
      return launch_fwd<__nv_bfloat16>(x, w, y, rstd, rows, hidden, eps, stream);
  }
}

void rmsnorm_bwd(DType dtype, const void* dy, const void* x, const void* w, const float* rstd,
                 void* dx, float* dw_partial, int64_t rows, int64_t hidden,
                 cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_bwd<float>(dy, x, w, rstd, dx, dw_partial, rows, hidden, stream);
    case DType::kFloat16:
      return launch_bwd<__half>(dy, x, w, rstd, dx, dw_partial, rows, hidden, stream);
    case DType::kBFloat16:
      return launch_bwd<__nv_bfloat16>(dy, x, w, rstd, dx, dw_partial, rows, hidden, stream);
  }
}

}  // namespace mmcap
