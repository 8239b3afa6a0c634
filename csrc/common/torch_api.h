// Shared by the *_api.cpp bindings (torch side): tensor checks and the dtype mapping.
#pragma once

// Only what the bindings use: Tensor (its methods), at::empty / empty_like and pybind11 with
// torch's Tensor casters (and STL ones: std::vector returns). <torch/extension.h> pulls in the
// whole C++ frontend (nn, optim, data, ...): with it one binding took 118 s to compile at -O3 on
// the 2-core CPU machine, with these 25 s (2026-11-30); by that ratio most of the H200 build
// (111 s, 2026-11-29, not timed per file) was the bindings.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include "mmcap_cuda.h"

namespace mmcap {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "mmcap kernels take float32/float16/bfloat16, got ", t.dtype());
  }
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, what, " launch failed: ", cudaGetErrorString(err));
}

}  // namespace mmcap
