// Torch bindings of the RMSNorm(1 + w) kernels (module mmcap_rmsnorm_cuda).
#include "../common/torch_api.h"
#include "rmsnorm.h"

namespace {

constexpr int64_t kMaxHidden = 8192;  // the backward keeps a float32 [hidden] row in shared memory

// x: [rows, hidden], weight: [hidden] of x's dtype -> (y [rows, hidden], rstd [rows] float32)
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight, double eps) {
  mmcap::check_cuda(x, "x");
  mmcap::check_cuda(weight, "weight");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1),
              "rmsnorm: x [rows, hidden] and weight [hidden] expected");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rmsnorm: weight dtype must equal x's");
  TORCH_CHECK(x.size(1) <= kMaxHidden, "rmsnorm: hidden > ", kMaxHidden);
  auto y = at::empty_like(x);
  auto rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  mmcap::rmsnorm_fwd(mmcap::dtype_of(x), x.data_ptr(), weight.data_ptr(), y.data_ptr(),
                     rstd.data_ptr<float>(), x.size(0), x.size(1), static_cast<float>(eps),
                     mmcap::current_stream());
  mmcap::check_launch("rmsnorm_fwd");
  return {y, rstd};
}

// -> (dx [rows, hidden] of x's dtype, dweight [hidden] of weight's dtype)
std::vector<at::Tensor> backward(const at::Tensor& dy, const at::Tensor& x,
                                 const at::Tensor& weight, const at::Tensor& rstd) {
  for (auto* t : {&dy, &x, &weight, &rstd}) mmcap::check_cuda(*t, "rmsnorm_bwd input");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(),
              "rmsnorm_bwd: dy must match x");
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == x.size(0),
              "rmsnorm_bwd: rstd [rows] float32 expected");
  auto dx = at::empty_like(x);
  const int blocks = mmcap::rmsnorm_bwd_blocks(x.size(0));
  auto partial = at::empty({blocks, x.size(1)}, x.options().dtype(at::kFloat));
  mmcap::rmsnorm_bwd(mmcap::dtype_of(x), dy.data_ptr(), x.data_ptr(), weight.data_ptr(),
                     rstd.data_ptr<float>(), dx.data_ptr(), partial.data_ptr<float>(),
                     x.size(0), x.size(1), mmcap::current_stream());
  mmcap::check_launch("rmsnorm_bwd");
  return {dx, partial.sum(0).to(weight.scalar_type())};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "RMSNorm(1 + w) forward");
  m.def("backward", &backward, "RMSNorm(1 + w) backward");
}
