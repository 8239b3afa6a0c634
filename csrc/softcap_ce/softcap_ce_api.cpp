// Torch bindings of the soft-capped cross-entropy tile kernels (module mmcap_softcap_ce_cuda).
// The Python driver (mmcap/ops/softcap_ce.py) owns chunking, the cuBLAS matmuls and TP.
#include "../common/torch_api.h"
#include "softcap_ce.h"

namespace {

void check_rows(const at::Tensor& t, const char* name, int64_t rows, at::ScalarType dtype) {
  mmcap::check_cuda(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows && t.scalar_type() == dtype, "softcap_ce: ",
              name, " must be [", rows, "] of ", dtype);
}

// logits: [rows, cols] float32; labels [rows] int64; m, s, tgt [rows] float32, updated in place.
void tile_stats(const at::Tensor& logits, const at::Tensor& labels, at::Tensor m, at::Tensor s,
                at::Tensor tgt, int64_t col_offset, double cap) {
  mmcap::check_cuda(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat,
              "softcap_ce: logits tile [rows, cols] float32 expected");
  const int64_t rows = logits.size(0);
  check_rows(labels, "labels", rows, at::kLong);
  check_rows(m, "m", rows, at::kFloat);
  check_rows(s, "s", rows, at::kFloat);
  check_rows(tgt, "tgt", rows, at::kFloat);
  mmcap::softcap_ce_tile_stats(logits.data_ptr<float>(), labels.data_ptr<int64_t>(),
                               m.data_ptr<float>(), s.data_ptr<float>(), tgt.data_ptr<float>(),
                               rows, logits.size(1), col_offset, static_cast<float>(cap),
                               mmcap::current_stream());
  mmcap::check_launch("softcap_ce_tile_stats");
}

// out: [rows, cols] of float32 (may be logits: in place) / float16 / bfloat16.
void tile_grad(const at::Tensor& logits, at::Tensor out, const at::Tensor& labels,
               const at::Tensor& lse, const at::Tensor& g, int64_t col_offset, double cap) {
  mmcap::check_cuda(logits, "logits");
  mmcap::check_cuda(out, "out");
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat,
              "softcap_ce: logits tile [rows, cols] float32 expected");
  TORCH_CHECK(out.sizes() == logits.sizes(), "softcap_ce: out must have the tile's shape");
  const int64_t rows = logits.size(0);
  check_rows(labels, "labels", rows, at::kLong);
  check_rows(lse, "lse", rows, at::kFloat);
  check_rows(g, "g", rows, at::kFloat);
  mmcap::softcap_ce_tile_grad(mmcap::dtype_of(out), logits.data_ptr<float>(), out.data_ptr(),
                              labels.data_ptr<int64_t>(), lse.data_ptr<float>(),
                              g.data_ptr<float>(), rows, logits.size(1), col_offset,
                              static_cast<float>(cap), mmcap::current_stream());
  mmcap::check_launch("softcap_ce_tile_grad");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tile_stats", &tile_stats, "fold a logits tile into running max / sum-exp / target");
  m.def("tile_grad", &tile_grad, "dlogits of a logits tile (in place for float32)");
}
