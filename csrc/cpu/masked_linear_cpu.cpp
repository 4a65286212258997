// CPU kernels of the masked_linear family.
//
// W ⊙ M is never formed in full: it is built one panel at a time into a small buffer that stays
// in cache, and each panel feeds a BLAS GEMM whose output is written straight into its slice of
// the result. The elementwise cost is O(out·in) per call against O(tokens·out·in) for the GEMM,
// so the mask is almost free once the layer is compute-bound.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

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
        const mask_t* mr = mp + (o0 + r) * in_f;
        float* dst = wm.data() + r * in_f;
        for (int64_t i = 0; i < in_f; ++i) dst[i] = static_cast<float>(wr[i]) * static_cast<float>(mr[i]);
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
  auto y2 = y.view({-1, out_f});
  if (x2.size(0) == 0) return y;

  const auto st = x.scalar_type();
  if (x2.size(0) <= kSmallTokens && st != at::kDouble && weight.is_contiguous() && mask.is_contiguous()) {
    auto xf = x2.to(at::kFloat).contiguous();
    AT_DISPATCH_SWITCH(st, "masked_linear_few_tokens",
        AT_DISPATCH_CASE_REDUCED_FLOATING_TYPES([&] {
          using w_t = scalar_t;
          AT_DISPATCH_SWITCH(mask.scalar_type(), "mask",
              AT_DISPATCH_CASE_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, [&] {
                masked_linear_few_tokens<w_t, scalar_t>(xf, weight, mask, bias, y2);
              }));
        })
        AT_DISPATCH_CASE(at::kFloat, [&] {
          using w_t = scalar_t;
          AT_DISPATCH_SWITCH(mask.scalar_type(), "mask",
              AT_DISPATCH_CASE_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, [&] {
                masked_linear_few_tokens<w_t, scalar_t>(xf, weight, mask, bias, y2);
              }));
        }));
    return y;
  }

  // Sequential panels, each GEMM using every thread: measured faster here than one panel per
  // thread with single-threaded GEMMs (x is packed per panel either way).
  auto one_panel = [&](at::Tensor& panel, int64_t o0, int64_t n) {
    auto wm = panel.narrow(0, 0, n);
    at::mul_out(wm, weight.narrow(0, o0, n), mask.narrow(0, o0, n));
    auto ys = y2.narrow(1, o0, n);
    if (bias.has_value()) {
      at::addmm_out(ys, bias->narrow(0, o0, n), x2, wm.t());
    } else {
      at::mm_out(ys, x2, wm.t());
    }
  };
  const int64_t p = panel_size(in_f, weight.element_size(), out_f);
  auto panel = at::empty({p, in_f}, weight.options());
  for (int64_t o0 = 0; o0 < out_f; o0 += p) one_panel(panel, o0, std::min(p, out_f - o0));
  return y;
}

at::Tensor masked_linear_grad_input(const at::Tensor& grad_out, const at::Tensor& weight,
                                    const at::Tensor& mask) {
  check_masked_linear_grad_input("softtf::masked_linear_grad_input", grad_out, weight, mask,
                                 kCpuKernels);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  auto dx = new_output(with_last(grad_out, in_f), grad_out.options());
  auto dy2 = as_2d(grad_out);
  auto dx2 = dx.view({-1, in_f});
  if (dy2.size(0) == 0) return dx;

  const auto st = grad_out.scalar_type();
  if (st == at::kFloat || st == at::kDouble) {
    // Row panels of W ⊙ M (contiguous reads), accumulated into dx with full-width GEMMs: dy is
    // packed once per panel along K only and dx stays in the output dtype's full precision.
    const int64_t p = panel_size(in_f, weight.element_size(), out_f);
    auto panel = at::empty({p, in_f}, weight.options());
    for (int64_t o0 = 0; o0 < out_f; o0 += p) {
      const int64_t n = std::min(p, out_f - o0);
      auto wm = panel.narrow(0, 0, n);
      at::mul_out(wm, weight.narrow(0, o0, n), mask.narrow(0, o0, n));
      if (o0 == 0) {
        at::mm_out(dx2, dy2.narrow(1, 0, n), wm);
      } else {
        dx2.addmm_(dy2.narrow(1, o0, n), wm);
      }
    }
    return dx;
  }
  // 16-bit dx would lose precision if accumulated across panels: column panels instead, each dx
  // column block complete after one GEMM (fp32 accumulation inside the BLAS call).
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
  check_masked_linear_grad_mask("softtf::masked_linear_grad_mask", grad_out, x, weight, mask_dtype,
                                kCpuKernels);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  auto dm = new_output({out_f, in_f}, weight.options().dtype(mask_dtype));
  const auto acc = acc_dtype(x.scalar_type());
  // dy^T x accumulates over every token: do it in the accumulation dtype, round once at the end.
  auto dy2 = as_2d(grad_out).to(acc);
  auto x2 = as_2d(x).to(acc);
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
