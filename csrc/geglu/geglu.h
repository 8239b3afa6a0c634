// GeGLU gelu_tanh(gate) * up on megatron's fused fc1 output: each row is [gate ; up] (the local
// TP shard of linear_fc1 with stride 2 holds [gate_r ; up_r]). Launchers for geglu_api.cpp.
#pragma once

#include "../common/mmcap_cuda.h"

namespace mmcap {

// torch's gelu(approximate="tanh"): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) and its
// derivative; float32, shared by the kernels (and host code, if ever tested there).
__host__ __device__ __forceinline__ float gelu_tanh(float x, float* dgelu) {
  constexpr float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
  constexpr float kKappa = 0.044715f;
  const float inner = kBeta * (x + kKappa * x * x * x);
  const float t = tanhf(inner);
  *dgelu = 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * kBeta * (1.f + 3.f * kKappa * x * x);
  return 0.5f * x * (1.f + t);
}

// x: [rows, 2 * ffn] ([gate ; up] per row) -> y: [rows, ffn]; dtype storage, float32 math.
void geglu_fwd(DType dtype, const void* x, void* y, int64_t rows, int64_t ffn,
               cudaStream_t stream);

// dx[:, :ffn] = dy * up * gelu'(gate), dx[:, ffn:] = dy * gelu(gate).
void geglu_bwd(DType dtype, const void* dy, const void* x, void* dx, int64_t rows, int64_t ffn,
               cudaStream_t stream);

}  // namespace mmcap
