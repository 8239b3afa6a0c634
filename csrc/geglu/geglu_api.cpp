// Torch bindings of the GeGLU kernels (module mmcap_geglu_cuda).
#include "../common/torch_api.h"
#include "geglu.h"

namespace {

// x: [rows, 2 * ffn] ([gate ; up]) -> y: [rows, ffn]
at::Tensor forward(const at::Tensor& x) {
  mmcap::check_cuda(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "geglu: x [rows, 2 * ffn] expected");
  const int64_t ffn = x.size(1) / 2;
  auto y = at::empty({x.size(0), ffn}, x.options());
  mmcap::geglu_fwd(mmcap::dtype_of(x), x.data_ptr(), y.data_ptr(), x.size(0), ffn,
                   mmcap::current_stream());
  mmcap::check_launch("geglu_fwd");
  return y;
}

// dy: [rows, ffn], x: [rows, 2 * ffn] -> dx: [rows, 2 * ffn]
at::Tensor backward(const at::Tensor& dy, const at::Tensor& x) {
  mmcap::check_cuda(dy, "dy");
  mmcap::check_cuda(x, "x");
  TORCH_CHECK(x.dim() == 2 && dy.dim() == 2 && x.size(0) == dy.size(0) &&
                  x.size(1) == 2 * dy.size(1) && x.scalar_type() == dy.scalar_type(),
              "geglu_bwd: dy [rows, ffn] and x [rows, 2 * ffn] of one dtype expected");
  auto dx = at::empty_like(x);
  mmcap::geglu_bwd(mmcap::dtype_of(x), dy.data_ptr(), x.data_ptr(), dx.data_ptr(), x.size(0),
                   dy.size(1), mmcap::current_stream());
  mmcap::check_launch("geglu_bwd");
  return dx;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "GeGLU forward");
  m.def("backward", &backward, "GeGLU backward");
}
