// Accumulation dtype and panel sizing shared by the CPU kernels. Argument checks and output
// allocation are shared with the CUDA binding: csrc/checks.h.
#pragma once
#include <ATen/ATen.h>

#include <c10/util/accumulate.h>

#include <algorithm>

#include "checks.h"

namespace softtf::cpu {

// Accumulation dtype: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 (used by gradcheck).
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
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
// The sizes are spelled out: -1 is ambiguous (and raises) when features or tokens are 0.
inline at::Tensor as_2d(const at::Tensor& t) {
  auto t2 = t.reshape({c10::multiply_integers(t.sizes().begin(), t.sizes().end() - 1), t.size(-1)});
  if (t2.stride(1) != 1) t2 = t2.contiguous();
  return t2;
}

inline bool is_qmask(const at::Tensor& mask) { return mask.scalar_type() == at::kChar; }

// Rows [o0, o0 + n) along `row_dim` of a mask [out, in(+8)] or a stack [T, out, in(+8)]: a float
// mask's slice as it is (the callers multiply or convert it), an int8 mask's rows dequantized
// (offset + scale * code, in `acc`) into a panel-sized tensor. No whole mask is dequantized.
inline at::Tensor mask_rows(const at::Tensor& mask, int64_t row_dim, int64_t o0, int64_t n, int64_t in_f,
                            at::ScalarType acc) {
  auto rows = mask.narrow(row_dim, o0, n);
  if (!is_qmask(mask)) return rows;
  const int64_t last = mask.dim() - 1;
  auto codes = rows.narrow(last, 0, in_f).to(acc);
  auto scale_offset = rows.narrow(last, in_f, kQMaskTail).contiguous().view(at::kFloat).to(acc);
  return codes.mul_(scale_offset.narrow(last, 0, 1)).add_(scale_offset.narrow(last, 1, 1));
}

}  // namespace softtf::cpu
