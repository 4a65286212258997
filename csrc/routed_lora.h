// routed_lora (SAPT's weighted sum of T LoRA blocks) as one rank-(T·r) LoRA, written once over
// ATen so the CPU kernel (csrc/cpu/routed_lora_cpu.cpp: BLAS GEMMs, ATen's OpenMP elementwise
// loops) and the CUDA kernel (csrc/cuda/bindings.cpp: cuBLAS GEMMs) are the same source lines.
//
//   y_b = Σ_t w[b, t] · s · x_b A_tᵀ B_tᵀ  =  ((x_b A_catᵀ) ⊙ (s · w_b ⊗ 1_r)) B_catᵀ
//
// with A_cat = A viewed as [T·r, in] (a view of a contiguous A) and B_cat [out, T·r] (B permuted,
// one small copy: out·T·r elements). Every GEMM is thin in T·r; no [B, out, in] weight and no
// per-task loop. Sums accumulate in fp32 (fp64 for fp64 inputs): 16-bit x / A / B are converted
// to the accumulation dtype first and the results rounded once. Any strides: reshape copies only
// the leading dims that cannot be merged, and the GEMMs take strided operands.
//
// Backward (one op, all four gradients; each is a thin GEMM or a [tokens, T·r] elementwise step):
//   h = x A_catᵀ, dg = dy B_cat                                  [tokens, T·r]
//   dw[b, t] = s Σ_{n, j<r} dg[b, n, t, j] h[b, n, t, j]
//   dB_cat = dyᵀ (h ⊙ S), dx = (dg ⊙ S) A_cat, dA_cat = (dg ⊙ S)ᵀ x     with S = s · w ⊗ 1_r
#pragma once
#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include <tuple>

#include "checks.h"

namespace softtf {

struct RoutedLoraShape {
  int64_t batch, tokens, per_sample, n_tasks, rank, in_f, out_f;
};

inline RoutedLoraShape routed_lora_shape(const at::Tensor& x, const at::Tensor& lora_a,
                                         const at::Tensor& lora_b) {
  RoutedLoraShape s;
  s.batch = x.size(0);
  s.tokens = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  s.per_sample = s.batch > 0 ? s.tokens / s.batch : 0;
  s.n_tasks = lora_a.size(0), s.rank = lora_a.size(1), s.in_f = lora_a.size(2);
  s.out_f = lora_b.size(1);
  return s;
}

inline at::ScalarType routed_lora_acc(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// [tokens, T·r] scale of every rank column of every token: s · w[b, t] (repeated r times).
inline at::Tensor routed_lora_scales(const at::Tensor& weights, double scaling,
                                     const RoutedLoraShape& s, at::ScalarType acc) {
  return (weights.to(acc) * scaling)
      .view({s.batch, 1, s.n_tasks, 1})
      .expand({s.batch, s.per_sample, s.n_tasks, s.rank});
}

// (x [tokens, in], A_cat [T·r, in], B_cat [out, T·r]) in the accumulation dtype.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_lora_operands(
    const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const RoutedLoraShape& s, at::ScalarType acc) {
  auto xa = x.reshape({s.tokens, s.in_f}).to(acc);
  auto a_cat = lora_a.reshape({s.n_tasks * s.rank, s.in_f}).to(acc);
  auto b_cat = lora_b.to(acc).permute({1, 0, 2}).reshape({s.out_f, s.n_tasks * s.rank});
  return {xa, a_cat, b_cat};
}

inline at::Tensor routed_lora_forward(const char* op, const at::Tensor& x, const at::Tensor& lora_a,
                                      const at::Tensor& lora_b, const at::Tensor& weights,
                                      double scaling, const KernelTarget& k) {
  check_routed_lora(op, x, lora_a, lora_b, weights, scaling, k);
  const auto s = routed_lora_shape(x, lora_a, lora_b);
  auto y = new_output(with_last(x, s.out_f), x.options());
  if (s.tokens == 0 || s.out_f == 0) return y;
  const auto acc = routed_lora_acc(x.scalar_type());
  auto [xa, a_cat, b_cat] = routed_lora_operands(x, lora_a, lora_b, s, acc);
  auto h = at::mm(xa, a_cat.t());  // [tokens, T·r]; zeros when in == 0
  h.view({s.batch, s.per_sample, s.n_tasks, s.rank}).mul_(routed_lora_scales(weights, scaling, s, acc));
  auto y2 = y.view({s.tokens, s.out_f});
  if (x.scalar_type() == acc) {
    at::mm_out(y2, h, b_cat.t());
  } else {
    y2.copy_(at::mm(h, b_cat.t()));
  }
  return y;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_lora_backward(
    const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& weights, double scaling, const KernelTarget& k) {
  check_routed_lora_backward(op, grad_out, x, lora_a, lora_b, weights, scaling, k);
  const auto s = routed_lora_shape(x, lora_a, lora_b);
  auto dx = new_output(x.sizes(), x.options());
  auto da = new_output(lora_a.sizes(), lora_a.options());
  auto db = new_output(lora_b.sizes(), lora_b.options());
  auto dw = new_output(weights.sizes(), weights.options());
  if (s.tokens == 0) {  // no token: nothing flows back (dx is empty)
    da.zero_(), db.zero_(), dw.zero_();
    return {dx, da, db, dw};
  }
  const auto acc = routed_lora_acc(x.scalar_type());
  auto [xa, a_cat, b_cat] = routed_lora_operands(x, lora_a, lora_b, s, acc);
  auto dya = grad_out.reshape({s.tokens, s.out_f}).to(acc);
  const auto scales = routed_lora_scales(weights, scaling, s, acc);
  auto h = at::mm(xa, a_cat.t());   // [tokens, T·r]
  auto dg = at::mm(dya, b_cat);     // [tokens, T·r]
  auto h4 = h.view({s.batch, s.per_sample, s.n_tasks, s.rank});
  auto dg4 = dg.view({s.batch, s.per_sample, s.n_tasks, s.rank});
  dw.copy_(at::mul(dg4, h4).sum({1, 3}).mul_(scaling));
  h4.mul_(scales);   // h ⊙ S
  dg4.mul_(scales);  // dh = dg ⊙ S
  db.copy_(at::mm(dya.t(), h).view({s.out_f, s.n_tasks, s.rank}).permute({1, 0, 2}));
  da.view({s.n_tasks * s.rank, s.in_f}).copy_(at::mm(dg.t(), xa));
  dx.view({s.tokens, s.in_f}).copy_(at::mm(dg, a_cat));
  return {dx, da, db, dw};
}

}  // namespace softtf
