// CPU kernels of the masked_linear family.
//
// W ⊙ M is never formed in full: it is built one panel at a time into a small buffer that stays
// in cache, and each panel feeds a BLAS GEMM whose output is written straight into its slice of
// the result. The elementwise cost is O(out·in) per call against O(tokens·out·in) for the GEMM,
// so the mask is almost free once the layer is compute-bound.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"

namespace softtf::cpu {
namespace {

void check_x(const char* op, const char* name, const at::Tensor& x, const at::Tensor& weight,
             int64_t feat) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == feat, op, ": ", name, " must have last dim ", feat,
              ", got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), op, ": ", name, " dtype ",
              x.scalar_type(), " must equal weight dtype ", weight.scalar_type());
  TORCH_CHECK(x.device() == weight.device(), op, ": ", name, " is on ", x.device(),
              " but weight is on ", weight.device());
  TORCH_CHECK(is_float_type(x.scalar_type()), op, ": ", name,
              " must be float32, bfloat16, float16 or float64, got ", x.scalar_type());
}

}  // namespace

at::Tensor masked_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                         const std::optional<at::Tensor>& bias) {
  const char* op = "softtf::masked_linear";
  check_weight_mask(op, weight, mask);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  check_x(op, "x", x, weight, in_f);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_f, op, ": bias must have shape [",
                out_f, "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ",
                bias->scalar_type(), " must equal x dtype ", x.scalar_type());
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = out_f;
  auto y = new_output(out_shape, x.options());
  auto x2 = as_2d(x);
  auto y2 = y.view({-1, out_f});
  if (x2.size(0) == 0) return y;

  const int64_t p = panel_size(in_f, weight.element_size(), out_f);
  auto panel = at::empty({p, in_f}, weight.options());
  for (int64_t o0 = 0; o0 < out_f; o0 += p) {
    const int64_t n = std::min(p, out_f - o0);
    auto wm = panel.narrow(0, 0, n);
    at::mul_out(wm, weight.narrow(0, o0, n), mask.narrow(0, o0, n));
    auto ys = y2.narrow(1, o0, n);
    if (bias.has_value()) {
      at::addmm_out(ys, bias->narrow(0, o0, n), x2, wm.t());
    } else {
      at::mm_out(ys, x2, wm.t());
    }
  }
  return y;
}

at::Tensor masked_linear_grad_input(const at::Tensor& grad_out, const at::Tensor& weight,
                                    const at::Tensor& mask) {
  const char* op = "softtf::masked_linear_grad_input";
  check_weight_mask(op, weight, mask);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  check_x(op, "grad_out", grad_out, weight, out_f);
  auto dx_shape = grad_out.sizes().vec();
  dx_shape.back() = in_f;
  auto dx = new_output(dx_shape, grad_out.options());
  auto dy2 = as_2d(grad_out);
  auto dx2 = dx.view({-1, in_f});
  if (dy2.size(0) == 0) return dx;

  // Column panels: each dx column block is complete after one GEMM, no cross-panel accumulation.
  const int64_t p = panel_size(out_f, weight.element_size(), in_f);
  auto panel = at::empty({out_f, p}, weight.options());
  for (int64_t i0 = 0; i0 < in_f; i0 += p) {
    const int64_t n = std::min(p, in_f - i0);
    auto wm = panel.narrow(1, 0, n);
    at::mul_out(wm, weight.narrow(1, i0, n), mask.narrow(1, i0, n));
    auto dxs = dx2.narrow(1, i0, n);
    at::mm_out(dxs, dy2, wm);
  }
  return dx;
}

at::Tensor masked_linear_grad_mask(const at::Tensor& grad_out, const at::Tensor& x,
                                   const at::Tensor& weight, at::ScalarType mask_dtype) {
  const char* op = "softtf::masked_linear_grad_mask";
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out, in], got shape ",
              weight.sizes());
  TORCH_CHECK(is_float_type(mask_dtype), op,
              ": mask_dtype must be float32, bfloat16, float16 or float64, got ", mask_dtype);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  check_x(op, "x", x, weight, in_f);
  check_x(op, "grad_out", grad_out, weight, out_f);
  TORCH_CHECK(grad_out.numel() / out_f == x.numel() / in_f, op,
              ": grad_out and x must have the same leading dims, got ", grad_out.sizes(),
              " and ", x.sizes());
  auto dm = new_output({out_f, in_f}, weight.options().dtype(mask_dtype));
  const auto acc = acc_dtype(x.scalar_type());
  // dy^T x accumulates over every token: do it in the accumulation dtype, round once at the end.
  auto dy2 = as_2d(grad_out).to(acc);
  auto x2 = as_2d(x).to(acc);
  if (x2.size(0) == 0) return dm.zero_();

  const int64_t p = panel_size(in_f, at::elementSize(acc), out_f);
  auto g = at::empty({p, in_f}, x2.options());
  for (int64_t o0 = 0; o0 < out_f; o0 += p) {
    const int64_t n = std::min(p, out_f - o0);
    auto gp = g.narrow(0, 0, n);
    at::mm_out(gp, dy2.narrow(1, o0, n).t(), x2);
    auto dms = dm.narrow(0, o0, n);
    at::mul_out(dms, gp, weight.narrow(0, o0, n));
  }
  return dm;
}

TORCH_LIBRARY_IMPL(softtf, CPU, m) {
  m.impl("_cpp_masked_linear", &masked_linear);
  m.impl("_cpp_masked_linear_grad_input", &masked_linear_grad_input);
  m.impl("_cpp_masked_linear_grad_mask", &masked_linear_grad_mask);
}

}  // namespace softtf::cpu
