// CPU kernels of the many-mask ops: the Gradient-ID pass and mixed-task batches.
#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include <utility>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace softtf::cpu {
namespace {

// Groups of samples sharing a task: (task, sample indices) for every task present.
std::vector<std::pair<int64_t, at::Tensor>> group_by_task(const at::Tensor& task_ids, int64_t n_tasks,
                                                          const char* op) {
  auto ids = task_ids.to(at::kLong).contiguous();
  const int64_t* p = ids.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> rows(n_tasks);
  for (int64_t b = 0; b < ids.numel(); ++b) {
    TORCH_CHECK(p[b] >= 0 && p[b] < n_tasks, op, ": task_ids must lie in [0, ", n_tasks,
                "), got ", p[b], " at sample ", b);
    rows[p[b]].push_back(b);
  }
  std::vector<std::pair<int64_t, at::Tensor>> groups;
  for (int64_t t = 0; t < n_tasks; ++t) {
    if (rows[t].empty()) continue;
    groups.emplace_back(t, at::tensor(rows[t], at::kLong));
  }
  return groups;
}

}  // namespace

// s[b, t] = Σ_{o,i} G_b[o,i] W[o,i] M_t[o,i] with G_b = dy_b^T x_b.
// Per row panel of W: H = G ⊙ W for every sample (one batched GEMM into a panel buffer that stays
// in cache), then one GEMM of H against the T mask panels. Each mask element is read once,
// G is never held for more than one panel, and no W ⊙ M_t is formed.
at::Tensor mask_mixture_grad(const at::Tensor& grad_out, const at::Tensor& x,
                             const at::Tensor& weight, const at::Tensor& masks, bool per_sample) {
  check_mask_mixture_grad("softtf::mask_mixture_grad", grad_out, x, weight, masks, per_sample,
                          kCpuKernels);
  const int64_t out_f = weight.size(0), in_f = weight.size(1), n_tasks = masks.size(0);
  const auto acc = acc_dtype(x.scalar_type());
  const int64_t batch = per_sample ? x.size(0) : 1;
  auto scores = at::zeros({batch, n_tasks}, x.options().dtype(acc));
  const int64_t tokens = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  // Nothing to sum (no token, or an empty W): every score is 0.
  if (tokens == 0 || out_f == 0 || in_f == 0) return per_sample ? scores : scores.view({n_tasks});
  auto dy3 = grad_out.reshape({batch, tokens / batch, out_f}).to(acc).contiguous();
  auto x3 = x.reshape({batch, tokens / batch, in_f}).to(acc).contiguous();
  auto w = weight.to(acc);

  // Panel rows so that H [B, p, in] stays around 2 MiB.
  const int64_t p = std::min(out_f, std::max<int64_t>(8, (2 << 20) / std::max<int64_t>(1, batch * in_f * at::elementSize(acc))));
  auto h = at::empty({batch, p, in_f}, x3.options());
  for (int64_t o0 = 0; o0 < out_f; o0 += p) {
    const int64_t n = std::min(p, out_f - o0);
    auto hp = h.narrow(1, 0, n);
    at::bmm_out(hp, dy3.narrow(2, o0, n).transpose(1, 2), x3);
    hp.mul_(w.narrow(0, o0, n));
    auto mp = mask_rows(masks, 1, o0, n, in_f, acc).to(acc).reshape({n_tasks, n * in_f});
    scores.addmm_(hp.reshape({batch, n * in_f}), mp.t());
  }
  return per_sample ? scores : scores.view({n_tasks});
}

at::Tensor mixed_task_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& masks,
                             const at::Tensor& task_ids, const std::optional<at::Tensor>& bias) {
  const char* op = "softtf::mixed_task_linear";
  check_mixed_task_linear(op, x, weight, masks, task_ids, bias, kCpuKernels);
  auto y = new_output(with_last(x, weight.size(0)), x.options());
  // Samples of one task run through the panel kernel together: one GEMM per task present.
  for (auto& [t, rows] : group_by_task(task_ids, masks.size(0), op)) {
    y.index_copy_(0, rows, masked_linear(x.index_select(0, rows), weight, masks[t], bias));
  }
  return y;
}

at::Tensor mixed_task_linear_grad_input(const at::Tensor& grad_out, const at::Tensor& weight,
                                        const at::Tensor& masks, const at::Tensor& task_ids) {
  const char* op = "softtf::mixed_task_linear_grad_input";
  check_mixed_task_linear_grad_input(op, grad_out, weight, masks, task_ids, kCpuKernels);
  auto dx = new_output(with_last(grad_out, weight.size(1)), grad_out.options());
  for (auto& [t, rows] : group_by_task(task_ids, masks.size(0), op)) {
    dx.index_copy_(0, rows, masked_linear_grad_input(grad_out.index_select(0, rows), weight, masks[t]));
  }
  return dx;
}

}  // namespace softtf::cpu
