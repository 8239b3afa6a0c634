// Soft-capped cross-entropy tile kernels: per-row online max / sum-exp / target logit (forward)
// and in-place dlogits (backward). Plain pointers, no torch headers.
#include "softcap_ce.h"

namespace mmcap {
namespace {

constexpr int kThreads = 256;

// One block per row (grid-stride over rows), threads stride over the tile's columns.
__global__ void __launch_bounds__(kThreads)
    tile_stats_kernel(const float* __restrict__ logits, const int64_t* __restrict__ labels,
                      float* __restrict__ m, float* __restrict__ s, float* __restrict__ tgt,
                      int64_t rows, int64_t cols, int64_t col_offset, float cap) {
  __shared__ MaxSum scratch[kThreads / 32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* zr = logits + r * cols;
    const int64_t target_col = labels[r] - col_offset;  // outside [0, cols): not in this tile
    MaxSum acc{-INFINITY, 0.f};
    float dcap;
    for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
      const float c = softcap_value(zr[j], cap, &dcap);
      if (c > acc.m) {  // online softmax: rescale the sum to the new max
        acc.s = acc.s * expf(acc.m - c) + 1.f;
        acc.m = c;
      } else {
        acc.s += expf(c - acc.m);
      }
      if (j == target_col) tgt[r] = c;  // exactly one thread of one tile writes it
    }
    acc = block_max_sum<kThreads>(acc, scratch);
    if (threadIdx.x == 0) {
      const MaxSum run = merge_max_sum(MaxSum{m[r], s[r]}, acc);
      m[r] = run.m;
      s[r] = run.s;
    }
  }
}

// Elementwise, grid-stride; each element is read and written by the same thread (in place ok).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    tile_grad_kernel(const float* logits, T* out, const int64_t* __restrict__ labels,
                     const float* __restrict__ lse, const float* __restrict__ g, int64_t rows,
                     int64_t cols, int64_t col_offset, float cap) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t r = i / cols, j = i - r * cols;
    float dcap;
    const float c = softcap_value(logits[i], cap, &dcap);
    const float p = expf(c - lse[r]);
    const float onehot = (j == labels[r] - col_offset) ? 1.f : 0.f;
    out[i] = from_float<T>(g[r] * (p - onehot) * dcap);
  }
}

}  // namespace

void softcap_ce_tile_stats(const float* logits, const int64_t* labels, float* m, float* s,
                           float* tgt, int64_t rows, int64_t cols, int64_t col_offset, float cap,
                           cudaStream_t stream) {
  tile_stats_kernel<<<grid_size(rows, 65535), kThreads, 0, stream>>>(
      logits, labels, m, s, tgt, rows, cols, col_offset, cap);
}

void softcap_ce_tile_grad(DType out_dtype, const float* logits, void* out, const int64_t* labels,
                          const float* lse, const float* g, int64_t rows, int64_t cols,
                          int64_t col_offset, float cap, cudaStream_t stream) {
  const int blocks = grid_size((rows * cols + kThreads - 1) / kThreads, 65535 * 8);
  switch (out_dtype) {
    case DType::kFloat32:
      tile_grad_kernel<float><<<blocks, kThreads, 0, stream>>>(
          logits, static_cast<float*>(out), labels, lse, g, rows, cols, col_offset, cap);
      break;
    case DType::kFloat16:
      tile_grad_kernel<__half><<<blocks, kThreads, 0, stream>>>(
          logits, static_cast<__half*>(out), labels, lse, g, rows, cols, col_offset, cap);
      break;
    case DType::kBFloat16:
      tile_grad_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(
          logits, static_cast<__nv_bfloat16*>(out), labels, lse, g, rows, cols, col_offset,
          cap);
      break;
  }
}

}  // namespace mmcap
