// Torch binding of the softtf CUDA kernels: the `softtf::_cuda_*` ops on the CUDA dispatch key.
//
// Argument checks raise naming the argument; unsupported dtypes raise (the Python dispatcher sends
// float64 to the reference before it gets here). Layout: x / grad_out of any leading dims are
// viewed as [tokens, features]; a non-contiguous one is copied to a contiguous buffer first
// (documented cost: one copy). weight / mask(s) / bias are made contiguous the same way (a no-op
// for parameters). Unaligned but contiguous inputs (e.g. a view starting mid-row) are fine: the
// kernels then take their scalar load path. task_ids values are range-checked by the Python
// dispatcher (softtf_kernels._validate), not here (that would need a device sync).
//
// The kernels themselves (csrc/cuda/*.cu) include no torch header; this file only plans the
// launch with the shared plan_* functions of plan.h and checks it with C10_CUDA_KERNEL_LAUNCH_CHECK.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>

#include "kernels.h"

namespace softtf::cuda {
namespace {

bool poison_outputs() {
  static const bool on = [] {
    const char* p = std::getenv("SOFTTF_POISON_OUTPUTS");
    return p != nullptr && p[0] == '1';
  }();
  return on;
}

// Tests set SOFTTF_POISON_OUTPUTS=1: outputs start as NaN so unwritten elements fail the oracle.
at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& opts) {
  auto t = at::empty(shape, opts.memory_format(at::MemoryFormat::Contiguous));
  if (poison_outputs()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

DType to_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat:
      return DType::kF32;
    case at::kHalf:
      return DType::kF16;
    case at::kBFloat16:
      return DType::kBF16;
    case at::kDouble:
      return DType::kF64;
    default:
      TORCH_CHECK(false, "unreachable dtype ", s);
  }
}

bool kernel_float(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

void check_cuda(const char* op, const char* name, const at::Tensor& t, const at::Tensor& weight) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == weight.device(), op, ": ", name, " is on ", t.device(),
              " but weight is on ", weight.device());
}

void check_weight(const char* op, const at::Tensor& weight) {
  TORCH_CHECK(weight.is_cuda(), op, ": weight must be a CUDA tensor, got ", weight.device());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out, in], got shape ", weight.sizes());
  TORCH_CHECK(kernel_float(weight.scalar_type()), op,
              ": weight must be float32, bfloat16 or float16 for the CUDA kernel, got ",
              weight.scalar_type());
}

void check_act(const char* op, const char* name, const at::Tensor& t, const at::Tensor& weight,
               int64_t feat, const char* what) {
  check_cuda(op, name, t, weight);
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) == feat, op, ": ", name, " must have last dim ", feat,
              " (", what, "), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == weight.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
              " must equal weight dtype ", weight.scalar_type());
}

void check_same_leading(const char* op, const at::Tensor& grad_out, const at::Tensor& x) {
  TORCH_CHECK(grad_out.sizes().slice(0, grad_out.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
              op, ": grad_out and x must have the same leading dims, got ", grad_out.sizes(),
              " and ", x.sizes());
}

void check_mask(const char* op, const char* name, const at::Tensor& m, const at::Tensor& weight,
                bool stacked) {
  check_cuda(op, name, m, weight);
  if (stacked) {
    TORCH_CHECK(m.dim() == 3 && m.size(1) == weight.size(0) && m.size(2) == weight.size(1) &&
                    m.size(0) > 0,
                op, ": ", name, " must have shape [T, ", weight.size(0), ", ", weight.size(1),
                "] with T >= 1, got ", m.sizes());
  } else {
    TORCH_CHECK(m.sizes() == weight.sizes(), op, ": ", name, " must have weight's shape ",
                weight.sizes(), ", got ", m.sizes());
  }
  TORCH_CHECK(kernel_float(m.scalar_type()), op, ": ", name,
              " must be float32, bfloat16 or float16 for the CUDA kernel, got ", m.scalar_type());
}

void check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& x,
                const at::Tensor& weight) {
  if (!bias.has_value()) return;
  check_cuda(op, "bias", *bias, weight);
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape [",
              weight.size(0), "], got ", bias->sizes());
  TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
              " must equal x dtype ", x.scalar_type());
}

void check_task_ids(const char* op, const at::Tensor& ids, int64_t batch, const at::Tensor& weight) {
  check_cuda(op, "task_ids", ids, weight);
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, op,
              ": task_ids must be an int64 or int32 tensor, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == batch, op, ": task_ids must have shape [", batch,
              "] (one id per sample), got ", ids.sizes());
}

int64_t leading(const at::Tensor& t) {
  return c10::multiply_integers(t.sizes().begin(), t.sizes().end() - 1);
}

void check_grid(const char* op, const Plan& pl) {
  TORCH_CHECK(pl.grid.y <= 65535 && pl.grid.z <= 65535, op,
              ": problem too large for one launch (grid ", pl.grid.x, " x ", pl.grid.y, " x ",
              pl.grid.z, ")");
}

void launched(const char* op, bool ok, DType t, DType u) {
  TORCH_CHECK(ok, op, ": no CUDA kernel for dtype codes (", int(t), ", ", int(u), ")");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::vector<int64_t> with_last(const at::Tensor& t, int64_t last) {
  auto s = t.sizes().vec();
  s.back() = last;
  return s;
}

// ------------------------------------------------------------------ ops
at::Tensor masked_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                         const std::optional<at::Tensor>& bias) {
  const char* op = "softtf::_cuda_masked_linear";
  check_weight(op, weight);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  check_act(op, "x", x, weight, in_f, "weight.shape[1]");
  check_mask(op, "mask", mask, weight, false);
  check_bias(op, bias, x, weight);
  c10::cuda::CUDAGuard guard(x.device());
  auto y = new_output(with_last(x, out_f), x.options());
  const int64_t tokens = leading(x);
  if (tokens == 0 || out_f == 0) return y;
  auto xc = x.contiguous(), w = weight.contiguous(), m = mask.contiguous();
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const DType dt = to_dtype(x.scalar_type()), mt = to_dtype(mask.scalar_type());
  Plan pl = plan_fwd(xc.data_ptr(), w.data_ptr(), m.data_ptr(), nullptr, false,
                     b.defined() ? b.data_ptr() : nullptr, y.data_ptr(), 1, tokens, out_f, in_f,
                     dtype_size(dt), dtype_size(mt));
  check_grid(op, pl);
  launched(op, launch_fwd(dt, mt, pl, at::cuda::getCurrentCUDAStream()), dt, mt);
  return y;
}

at::Tensor masked_linear_grad_input(const at::Tensor& grad_out, const at::Tensor& weight,
                                    const at::Tensor& mask) {
  const char* op = "softtf::_cuda_masked_linear_grad_input";
  check_weight(op, weight);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  check_act(op, "grad_out", grad_out, weight, out_f, "weight.shape[0]");
  check_mask(op, "mask", mask, weight, false);
  c10::cuda::CUDAGuard guard(grad_out.device());
  auto dx = new_output(with_last(grad_out, in_f), grad_out.options());
  const int64_t tokens = leading(grad_out);
  if (tokens == 0 || in_f == 0) return dx;
  auto dy = grad_out.contiguous(), w = weight.contiguous(), m = mask.contiguous();
  const DType dt = to_dtype(dy.scalar_type()), mt = to_dtype(mask.scalar_type());
  Plan pl = plan_dgrad(dy.data_ptr(), w.data_ptr(), m.data_ptr(), nullptr, false, dx.data_ptr(), 1,
                       tokens, out_f, in_f, dtype_size(dt), dtype_size(mt));
  check_grid(op, pl);
  launched(op, launch_dgrad(dt, mt, pl, at::cuda::getCurrentCUDAStream()), dt, mt);
  return dx;
}

at::Tensor masked_linear_grad_mask(const at::Tensor& grad_out, const at::Tensor& x,
                                   const at::Tensor& weight, at::ScalarType mask_dtype) {
  const char* op = "softtf::_cuda_masked_linear_grad_mask";
  check_weight(op, weight);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  check_act(op, "x", x, weight, in_f, "weight.shape[1]");
  check_act(op, "grad_out", grad_out, weight, out_f, "weight.shape[0]");
  check_same_leading(op, grad_out, x);
  TORCH_CHECK(kernel_float(mask_dtype) || mask_dtype == at::kDouble, op,
              ": mask_dtype must be float32, bfloat16, float16 or float64, got ", mask_dtype);
  c10::cuda::CUDAGuard guard(x.device());
  auto dm = new_output({out_f, in_f}, weight.options().dtype(mask_dtype));
  if (out_f == 0 || in_f == 0) return dm;
  auto dy = grad_out.contiguous(), xc = x.contiguous(), w = weight.contiguous();
  const DType dt = to_dtype(x.scalar_type()), ot = to_dtype(mask_dtype);
  // tokens == 0 is fine: K = 0 gives dM = 0 * W.
  Plan pl = plan_dmask(dy.data_ptr(), xc.data_ptr(), w.data_ptr(), dm.data_ptr(), leading(x), out_f,
                       in_f, dtype_size(dt));
  check_grid(op, pl);
  launched(op, launch_dmask(dt, ot, pl, at::cuda::getCurrentCUDAStream()), dt, ot);
  return dm;
}

at::Tensor mask_mixture_grad(const at::Tensor& grad_out, const at::Tensor& x,
                             const at::Tensor& weight, const at::Tensor& masks, bool per_sample) {
  const char* op = "softtf::_cuda_mask_mixture_grad";
  check_weight(op, weight);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  check_act(op, "x", x, weight, in_f, "weight.shape[1]");
  check_act(op, "grad_out", grad_out, weight, out_f, "weight.shape[0]");
  check_same_leading(op, grad_out, x);
  check_mask(op, "masks", masks, weight, true);
  TORCH_CHECK(!per_sample || x.dim() >= 2, op, ": per_sample=True needs x of shape [B, ..., ",
              in_f, "], got ", x.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t n_tasks = masks.size(0);
  TORCH_CHECK(n_tasks <= std::numeric_limits<int>::max(), op, ": too many masks");
  const int64_t batches = per_sample ? x.size(0) : 1;
  auto opts = x.options().dtype(at::kFloat);
  auto out = new_output({batches, n_tasks}, opts);
  if (batches == 0) return out;
  const int64_t tokens = batches > 0 ? leading(x) / batches : 0;
  auto dy = grad_out.contiguous(), xc = x.contiguous(), w = weight.contiguous();
  auto m = masks.contiguous();
  const DType dt = to_dtype(x.scalar_type()), mt = to_dtype(masks.scalar_type());
  const Grid g = tile_grid(out_f, in_f, batches);
  const int64_t tiles = int64_t(g.x) * g.y;
  auto partial = at::empty({batches, tiles, n_tasks}, opts);
  Plan pl = plan_mixture(dy.data_ptr(), xc.data_ptr(), w.data_ptr(), m.data_ptr(), int(n_tasks),
                         partial.data_ptr<float>(), batches, tokens, out_f, in_f, dtype_size(dt));
  check_grid(op, pl);
  auto stream = at::cuda::getCurrentCUDAStream();
  launched(op, launch_mixture(dt, mt, pl, stream), dt, mt);
  launch_reduce_partials(ReduceParams{partial.data_ptr<float>(), out.data_ptr<float>(), batches,
                                      tiles, n_tasks},
                         stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return per_sample ? out : out.view({n_tasks});
}

at::Tensor mixed_task_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& masks,
                             const at::Tensor& task_ids, const std::optional<at::Tensor>& bias) {
  const char* op = "softtf::_cuda_mixed_task_linear";
  check_weight(op, weight);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  check_act(op, "x", x, weight, in_f, "weight.shape[1]");
  TORCH_CHECK(x.dim() >= 2, op, ": x must have shape [B, ..., ", in_f, "], got ", x.sizes());
  check_mask(op, "masks", masks, weight, true);
  check_task_ids(op, task_ids, x.size(0), weight);
  check_bias(op, bias, x, weight);
  c10::cuda::CUDAGuard guard(x.device());
  auto y = new_output(with_last(x, out_f), x.options());
  const int64_t batches = x.size(0), all = leading(x);
  if (all == 0 || out_f == 0) return y;
  auto xc = x.contiguous(), w = weight.contiguous(), m = masks.contiguous();
  auto ids = task_ids.contiguous();
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const DType dt = to_dtype(x.scalar_type()), mt = to_dtype(masks.scalar_type());
  Plan pl = plan_fwd(xc.data_ptr(), w.data_ptr(), m.data_ptr(), ids.data_ptr(),
                     ids.scalar_type() == at::kLong, b.defined() ? b.data_ptr() : nullptr,
                     y.data_ptr(), batches, all / batches, out_f, in_f, dtype_size(dt),
                     dtype_size(mt));
  check_grid(op, pl);
  launched(op, launch_fwd(dt, mt, pl, at::cuda::getCurrentCUDAStream()), dt, mt);
  return y;
}

at::Tensor mixed_task_linear_grad_input(const at::Tensor& grad_out, const at::Tensor& weight,
                                        const at::Tensor& masks, const at::Tensor& task_ids) {
  const char* op = "softtf::_cuda_mixed_task_linear_grad_input";
  check_weight(op, weight);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  check_act(op, "grad_out", grad_out, weight, out_f, "weight.shape[0]");
  TORCH_CHECK(grad_out.dim() >= 2, op, ": grad_out must have shape [B, ..., ", out_f, "], got ",
              grad_out.sizes());
  check_mask(op, "masks", masks, weight, true);
  check_task_ids(op, task_ids, grad_out.size(0), weight);
  c10::cuda::CUDAGuard guard(grad_out.device());
  auto dx = new_output(with_last(grad_out, in_f), grad_out.options());
  const int64_t batches = grad_out.size(0), all = leading(grad_out);
  if (all == 0 || in_f == 0) return dx;
  auto dy = grad_out.contiguous(), w = weight.contiguous(), m = masks.contiguous();
  auto ids = task_ids.contiguous();
  const DType dt = to_dtype(dy.scalar_type()), mt = to_dtype(masks.scalar_type());
  Plan pl = plan_dgrad(dy.data_ptr(), w.data_ptr(), m.data_ptr(), ids.data_ptr(),
                       ids.scalar_type() == at::kLong, dx.data_ptr(), batches, all / batches, out_f,
                       in_f, dtype_size(dt), dtype_size(mt));
  check_grid(op, pl);
  launched(op, launch_dgrad(dt, mt, pl, at::cuda::getCurrentCUDAStream()), dt, mt);
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(softtf, CUDA, m) {
  m.impl("_cuda_masked_linear", &masked_linear);
  m.impl("_cuda_masked_linear_grad_input", &masked_linear_grad_input);
  m.impl("_cuda_masked_linear_grad_mask", &masked_linear_grad_mask);
  m.impl("_cuda_mask_mixture_grad", &mask_mixture_grad);
  m.impl("_cuda_mixed_task_linear", &mixed_task_linear);
  m.impl("_cuda_mixed_task_linear_grad_input", &mixed_task_linear_grad_input);
}

}  // namespace softtf::cuda
