// Soft-capped cross-entropy over one [rows, cols] tile of float32 logits (one TP rank's chunk
// of tokens x vocabulary rows, produced by a cuBLAS matmul in mmcap/ops/softcap_ce.py).
// Launchers called by softcap_ce_api.cpp. cap <= 0 means no soft-cap.
#pragma once

#include "../common/mmcap_cuda.h"

namespace mmcap {

// c = cap * tanh(z / cap) (or z); its derivative dc/dz = 1 - tanh(z / cap)^2 (or 1).
__host__ __device__ __forceinline__ float softcap_value(float z, float cap, float* dcap) {
  if (cap <= 0.f) {
    *dcap = 1.f;
    return z;
  }
  const float t = tanhf(z / cap);
  *dcap = 1.f - t * t;
  return cap * t;
}

// Folds the tile into the per-row running statistics: m (max of c), s (sum of exp(c - m)) and
// tgt (c at column labels[r] - col_offset when that column is in the tile; untouched else).
// labels are global vocabulary ids (ignore_index and other ranks' ids fall outside the tile).
void softcap_ce_tile_stats(const float* logits, const int64_t* labels, float* m, float* s,
                           float* tgt, int64_t rows, int64_t cols, int64_t col_offset, float cap,
                           cudaStream_t stream);

// dlogits = g[r] * (exp(c - lse[r]) - [col == label]) * dc/dz, written to `out` of out_dtype
// ([rows, cols] contiguous; may be `logits` itself when out_dtype is float32: in place).
void softcap_ce_tile_grad(DType out_dtype, const float* logits, void* out, const int64_t* labels,
                          const float* lse, const float* g, int64_t rows, int64_t cols,
                          int64_t col_offset, float cap, cudaStream_t stream);

}  // namespace mmcap
