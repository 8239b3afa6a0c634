// RMSNorm with (1 + weight) scaling (Gemma-2): launchers called by rmsnorm_api.cpp.
#pragma once

#include "../common/mmcap_cuda.h"

namespace mmcap {

// y[r] = x[r] * rstd[r] * (1 + w), rstd[r] = 1 / sqrt(mean(x[r]^2) + eps); x, w, y of dtype;
// statistics in float32. x, y: [rows, hidden] contiguous; rstd: [rows] float32.
void rmsnorm_fwd(DType dtype, const void* x, const void* w, void* y, float* rstd, int64_t rows,
                 int64_t hidden, float eps, cudaStream_t stream);

// dx = rstd * (g - xhat * mean(g * xhat)), g = dy * (1 + w), xhat = x * rstd;
// dw_partial[b] = sum over the rows block b handled of dy * xhat ([partial_blocks, hidden],
// float32; the binding sums it). partial_blocks = rmsnorm_bwd_blocks(rows).
void rmsnorm_bwd(DType dtype, const void* dy, const void* x, const void* w, const float* rstd,
                 void* dx, float* dw_partial, int64_t rows, int64_t hidden, cudaStream_t stream);
int rmsnorm_bwd_blocks(int64_t rows);

}  // namespace mmcap
