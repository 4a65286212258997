// Shared argument checks and panel sizing for the CPU kernels.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <limits>

namespace softtf::cpu {

// Accumulation dtype: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 (used by gradcheck).
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

inline void check_weight_mask(const char* op, const at::Tensor& weight, const at::Tensor& mask,
                              const char* mask_name = "mask") {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out, in], got shape ", weight.sizes());
  TORCH_CHECK(mask.sizes() == weight.sizes(), op, ": ", mask_name,
              " must have weight's shape ", weight.sizes(), ", got ", mask.sizes());
  TORCH_CHECK(is_float_type(mask.scalar_type()), op, ": ", mask_name,
              " must be float32, bfloat16, float16 or float64, got ", mask.scalar_type());
  TORCH_CHECK(mask.device() == weight.device(), op, ": ", mask_name, " is on ", mask.device(),
              " but weight is on ", weight.device());
}

// An activation (x or grad_out) whose last dim must be `feat`, in weight's dtype and device.
inline void check_activation(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& weight, int64_t feat) {
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) == feat, op, ": ", name, " must have last dim ", feat,
              ", got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == weight.scalar_type(), op, ": ", name, " dtype ",
              t.scalar_type(), " must equal weight dtype ", weight.scalar_type());
  TORCH_CHECK(t.device() == weight.device(), op, ": ", name, " is on ", t.device(),
              " but weight is on ", weight.device());
  TORCH_CHECK(is_float_type(t.scalar_type()), op, ": ", name,
              " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
}

inline void check_same_leading(const char* op, const at::Tensor& grad_out, const at::Tensor& x) {
  TORCH_CHECK(grad_out.sizes().slice(0, grad_out.dim() - 1) == x.sizes().slice(0, x.dim() - 1), op,
              ": grad_out and x must have the same leading dims, got ", grad_out.sizes(), " and ",
              x.sizes());
}

// Rows (or columns) per panel. Each panel feeds one BLAS call whose other operand (x or dy) is
// re-read once per panel, so panels must be wide enough for an efficient GEMM (>= 128 wide) yet
// small enough to stay in cache (~2 MiB: L2 here, a slice of L3 elsewhere).
inline int64_t panel_size(int64_t other_dim, int64_t elem_size, int64_t total) {
  constexpr int64_t kPanelBytes = 2 * 1024 * 1024;
  int64_t p = kPanelBytes / std::max<int64_t>(1, other_dim * elem_size);
  p = std::max<int64_t>(128, (p / 16) * 16);
  if (p >= total) return total;
  // Balance the panels (e.g. 2304 rows as 4 x 576, not 3 x 672 + 288): no skinny remainder.
  const int64_t n_panels = (total + p - 1) / p;
  return ((total + n_panels - 1) / n_panels + 15) / 16 * 16;
}

// x viewed as [tokens, features] with unit stride on features, copying only when it must.
inline at::Tensor as_2d(const at::Tensor& t) {
  auto t2 = t.reshape({-1, t.size(-1)});
  if (t2.stride(1) != 1) t2 = t2.contiguous();
  return t2;
}

// Tests set SOFTTF_POISON_OUTPUTS=1 so that every output starts as NaN: an element a kernel
// forgets to write then fails the oracle comparison instead of passing on lucky zeros.
inline at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& opts) {
  auto t = at::empty(shape, opts.memory_format(at::MemoryFormat::Contiguous));
  const char* p = std::getenv("SOFTTF_POISON_OUTPUTS");
  if (p != nullptr && p[0] == '1') t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

}  // namespace softtf::cpu
