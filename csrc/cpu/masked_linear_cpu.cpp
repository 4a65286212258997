// CPU kernels of the masked_linear family.
//
// W ⊙ M is never formed in full: it is built one panel at a time into a small buffer that stays
// in cache, and each panel feeds a BLAS GEMM whose output is written straight into its slice of
// the result. The elementwise cost is O(out·in) per call against O(tokens·out·in) for the GEMM,
// so the mask is almost free once the layer is compute-bound.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace softtf::cpu {
namespace {

// ---- few tokens: memory-bound, so read W and M exactly once and keep everything else in L1.
// BLAS calls on thin panels cost more in call overhead than they save here.
constexpr int64_t kSmallTokens = 32;
constexpr int64_t kRowBlock = 4;  // output rows per pass: each x element loaded once feeds 4 FMAs

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define SOFTTF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SOFTTF_CLONES
#endif

// acc[r][t] = sum_i xf[t][i] * wm[r][i] for r < rows, t < tokens (all fp32, contiguous).
SOFTTF_CLONES
void small_dots(const float* xf, int64_t tokens, const float* wm, int64_t rows, int64_t in_f,
                float* acc) {
  for (int64_t t = 0; t < tokens; ++t) {
    const float* xr = xf + t * in_f;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
    const float* w0 = wm;
    const float* w1 = wm + (rows > 1 ? 1 : 0) * in_f;
    const float* w2 = wm + (rows > 2 ? 2 : 0) * in_f;
    const float* w3 = wm + (rows > 3 ? 3 : 0) * in_f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t i = 0; i < in_f; ++i) {
      const float xv = xr[i];
      a0 += xv * w0[i];
      a1 += xv * w1[i];
      a2 += xv * w2[i];
      a3 += xv * w3[i];
    }
    const float a[kRowBlock] = {a0, a1, a2, a3};
    for (int64_t r = 0; r < rows; ++r) acc[r * tokens + t] = a[r];
  }
}

template <typename scalar_t, typename mask_t>
void masked_linear_few_tokens(const at::Tensor& xf, const at::Tensor& weight,
                              const at::Tensor& mask, const std::optional<at::Tensor>& bias,
                              at::Tensor& y2) {
  const int64_t tokens = xf.size(0), in_f = weight.size(1), out_f = weight.size(0);
  const float* xp = xf.data_ptr<float>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  const mask_t* mp = mask.data_ptr<mask_t>();
  // Read as a dense array below: a strided bias view (rare, out_f elements) is copied first.
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
  scalar_t* yp = y2.data_ptr<scalar_t>();
  const int64_t n_blocks = (out_f + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, n_blocks, 8, [&](int64_t b0, int64_t b1) {
    std::vector<float> wm(kRowBlock * in_f), acc(kRowBlock * tokens);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t o0 = blk * kRowBlock, rows = std::min(kRowBlock, out_f - o0);
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* wr = wp + (o0 + r) * in_f;
        float* dst = wm.data() + r * in_f;
        if constexpr (std::is_same_v<mask_t, int8_t>) {  // codes, then the row's fp32 scale and offset
          const int8_t* mr = mp + (o0 + r) * (in_f + kQMaskTail);
          float scale, offset;
          std::memcpy(&scale, mr + in_f, sizeof(float));
          std::memcpy(&offset, mr + in_f + sizeof(float), sizeof(float));
          for (int64_t i = 0; i < in_f; ++i)
            dst[i] = static_cast<float>(wr[i]) * (static_cast<float>(mr[i]) * scale + offset);
        } else {
          const mask_t* mr = mp + (o0 + r) * in_f;
          for (int64_t i = 0; i < in_f; ++i) dst[i] = static_cast<float>(wr[i]) * static_cast<float>(mr[i]);
        }
      }
      small_dots(xp, tokens, wm.data(), rows, in_f, acc.data());
      for (int64_t r = 0; r < rows; ++r) {
        const float bv = bp ? static_cast<float>(bp[o0 + r]) : 0.f;
        for (int64_t t = 0; t < tokens; ++t)
          yp[t * out_f + o0 + r] = static_cast<scalar_t>(acc[r * tokens + t] + bv);
      }
    }
  });
}

}  // namespace

at::Tensor masked_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                         const std::optional<at::Tensor>& bias) {
  check_masked_linear("softtf::masked_linear", x, weight, mask, bias, kCpuKernels);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  auto y = new_output(with_last(x, out_f), x.options());
  auto x2 = as_2d(x);
  auto y2 = y.view({x2.size(0), out_f});
  if (x2.size(0) == 0 || out_f == 0) return y;

  const auto st = x.scalar_type();
  if (x2.size(0) <= kSmallTokens && st != at::kDouble && weight.is_contiguous() && mask.is_contiguous()) {
    auto xf = x2.to(at::kFloat).contiguous();
    AT_DISPATCH_SWITCH(st, "masked_linear_few_tokens",
        AT_DISPATCH_CASE_REDUCED_FLOATING_TYPES([&] {
          using w_t = scalar_t;
          AT_DISPATCH_SWITCH(mask.scalar_type(), "mask",
              AT_DISPATCH_CASE_FLOATING_TYPES_AND3(at::kBFloat16, at::kHalf, at::kChar, [&] {
                masked_linear_few_tokens<w_t, scalar_t>(xf, weight, mask, bias, y2);
              }));
        })
        AT_DISPATCH_CASE(at::kFloat, [&] {
          using w_t = scalar_t;
          AT_DISPATCH_SWITCH(mask.scalar_type(), "mask",
              AT_DISPATCH_CASE_FLOATING_TYPES_AND3(at::kBFloat16, at::kHalf, at::kChar, [&] {
                masked_linear_few_tokens<w_t, scalar_t>(xf, weight, mask, bias, y2);
              }));
        }));
    return y;
  }

  // Zero in-features: an empty reduction, y = bias (or 0).
  if (in_f == 0) {
    if (bias.has_value()) {
      y2.copy_(bias->unsqueeze(0).expand({x2.size(0), out_f}));
    } else {
      y2.zero_();
    }
    return y;
  }

  // Sequential panels, each GEMM using every thread: measured faster here than one panel per
  // thread with single-threaded GEMMs (x is packed per panel either way).
  // W ⊙ M is formed in the accumulation dtype (fp32 for 16-bit inputs): a product that overflows
  // the weight dtype (fp16 300 * 300) must not turn into inf when the result does not. For 16-bit
  // inputs x is converted once and the GEMMs write an fp32 result rounded once into y.
  const auto acc = acc_dtype(st);
  const at::Tensor xa = st == acc ? x2 : x2.to(acc);
  at::Tensor ya = st == acc ? y2 : at::empty({x2.size(0), out_f}, x2.options().dtype(acc));
  const at::Tensor ba = bias.has_value() ? bias->to(acc) : at::Tensor();
  auto one_panel = [&](at::Tensor& panel, int64_t o0, int64_t n) {
    auto wm = panel.narrow(0, 0, n);
    wm.copy_(weight.narrow(0, o0, n));
    wm.mul_(mask_rows(mask, 0, o0, n, in_f, acc));
    auto ys = ya.narrow(1, o0, n);
    if (ba.defined()) {
      at::addmm_out(ys, ba.narrow(0, o0, n), xa, wm.t());
    } else {
      at::mm_out(ys, xa, wm.t());
    }
  };
  const int64_t p = panel_size(in_f, at::elementSize(acc), out_f);
  auto panel = at::empty({p, in_f}, weight.options().dtype(acc));
  for (int64_t o0 = 0; o0 < out_f; o0 += p) one_panel(panel, o0, std::min(p, out_f - o0));
  if (st != acc) y2.copy_(ya);
  return y;
}

at::Tensor masked_linear_grad_input(const at::Tensor& grad_out, const at::Tensor& weight,
                                    const at::Tensor& mask) {
  check_masked_linear_grad_input("softtf::masked_linear_grad_input", grad_out, weight, mask,
                                 kCpuKernels);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  auto dx = new_output(with_last(grad_out, in_f), grad_out.options());
  auto dy2 = as_2d(grad_out);
  auto dx2 = dx.view({dy2.size(0), in_f});
  if (dy2.size(0) == 0 || in_f == 0) return dx;
  if (out_f == 0) return dx.zero_();  // an empty reduction

  // Row panels of W ⊙ M (contiguous reads), accumulated into dx with full-width GEMMs: dy is
  // packed once per panel along K only. Everything runs in the accumulation dtype: W ⊙ M is
  // formed there (fp16 300 * 300 must not overflow), and for 16-bit inputs dx is accumulated in
  // fp32 across the panels and rounded once at the end.
  const auto st = grad_out.scalar_type();
  const auto acc = acc_dtype(st);
  const at::Tensor dya = st == acc ? dy2 : dy2.to(acc);
  at::Tensor dxa = st == acc ? dx2 : at::empty({dy2.size(0), in_f}, dy2.options().dtype(acc));
  const int64_t p = panel_size(in_f, at::elementSize(acc), out_f);
  auto panel = at::empty({p, in_f}, weight.options().dtype(acc));
  for (int64_t o0 = 0; o0 < out_f; o0 += p) {
    const int64_t n = std::min(p, out_f - o0);
    auto wm = panel.narrow(0, 0, n);
    wm.copy_(weight.narrow(0, o0, n));
    wm.mul_(mask_rows(mask, 0, o0, n, in_f, acc));
    if (o0 == 0) {
      at::mm_out(dxa, dya.narrow(1, 0, n), wm);
    } else {
      dxa.addmm_(dya.narrow(1, o0, n), wm);
    }
  }
  if (st != acc) dx2.copy_(dxa);
  return dx;
}

at::Tensor masked_linear_grad_mask(const at::Tensor& grad_out, const at::Tensor& x,
                                   const at::Tensor& weight, at::ScalarType mask_dtype) {
  check_masked_linear_grad_mask("softtf::masked_linear_grad_mask", grad_out, x, weight, mask_dtype,
                                kCpuKernels);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  auto dm = new_output({out_f, in_f}, weight.options().dtype(mask_dtype));
  const auto acc = acc_dtype(x.scalar_type());
  // dy^T x accumulates over every token: do it in the accumulation dtype, round once at the end.
  auto dy2 = as_2d(grad_out).to(acc);
  auto x2 = as_2d(x).to(acc);
  if (out_f == 0 || in_f == 0) return dm;
  if (x2.size(0) == 0) return dm.zero_();
  if (mask_dtype == acc) {
    // dM must exist in full anyway: one GEMM straight into it, then ⊙ W in place.
    at::mm_out(dm, dy2.t(), x2);
    dm.mul_(weight);
    return dm;
  }

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

}  // namespace softtf::cpu
