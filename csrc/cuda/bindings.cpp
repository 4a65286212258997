// Torch binding of the softtf CUDA kernels: the `softtf::_cuda_*` ops on the CUDA dispatch key.
//
// Argument checks (csrc/checks.h, shared with the CPU kernels) raise naming the argument;
// unsupported dtypes raise (the Python dispatcher sends float64 to the reference before it gets
// here). Layout: x / grad_out of any leading dims are viewed as [tokens, features]; a
// non-contiguous one is copied to a contiguous buffer first (documented cost: one copy). weight /
// mask(s) / bias are made contiguous the same way (a no-op for parameters; an int8 mask is copied
// as its bytes, never dequantized: the kernels dequantize it in registers, qmask.cuh). Unaligned
// but contiguous inputs (e.g. a view starting mid-row) are fine: the kernels then take their
// scalar load path. task_ids values are range-checked by the Python dispatcher
// (softtf_kernels.validate), not here (that would need a device sync).
//
// The kernels themselves (csrc/cuda/*.cu) include no torch header; this file only plans the
// launch with the shared plan_* functions of plan.h and checks it with C10_CUDA_KERNEL_LAUNCH_CHECK.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <limits>

#include "checks.h"
#include "kernels.h"
#include "op_list.h"
#include "routed_lora.h"

namespace softtf::cuda {
namespace {

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
    case at::kChar:  // an int8 mask (checks.h validated its [.., out, in + 8] layout)
      return DType::kI8;
    default:
      TORCH_CHECK(false, "unreachable dtype ", s);
  }
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

// y [tokens, out] of an empty reduction (in_f == 0): the bias, or 0.
at::Tensor bias_only(at::Tensor y, const std::optional<at::Tensor>& bias) {
  if (bias.has_value()) {
    y.copy_(bias->expand(y.sizes()));
  } else {
    y.zero_();
  }
  return y;
}

// ------------------------------------------------------------------ ops
at::Tensor masked_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                         const std::optional<at::Tensor>& bias) {
  const char* op = "softtf::_cuda_masked_linear";
  check_masked_linear(op, x, weight, mask, bias, kCudaKernels);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  c10::cuda::CUDAGuard guard(x.device());
  auto y = new_output(with_last(x, out_f), x.options());
  const int64_t tokens = leading(x);
  if (tokens == 0 || out_f == 0) return y;
  if (in_f == 0) return bias_only(y, bias);
  auto xc = x.contiguous(), w = weight.contiguous(), m = mask.contiguous();
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const DType dt = to_dtype(x.scalar_type()), mt = to_dtype(mask.scalar_type());
  Plan pl = plan_fwd(xc.data_ptr(), w.data_ptr(), m.data_ptr(), nullptr, false,
                     b.defined() ? b.data_ptr() : nullptr, y.data_ptr(), 1, tokens, out_f, in_f,
                     dtype_size(dt), mt);
  check_grid(op, pl);
  launched(op, launch_fwd(dt, mt, pl, at::cuda::getCurrentCUDAStream()), dt, mt);
  return y;
}

at::Tensor masked_linear_grad_input(const at::Tensor& grad_out, const at::Tensor& weight,
                                    const at::Tensor& mask) {
  const char* op = "softtf::_cuda_masked_linear_grad_input";
  check_masked_linear_grad_input(op, grad_out, weight, mask, kCudaKernels);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  c10::cuda::CUDAGuard guard(grad_out.device());
  auto dx = new_output(with_last(grad_out, in_f), grad_out.options());
  const int64_t tokens = leading(grad_out);
  if (tokens == 0 || in_f == 0) return dx;
  if (out_f == 0) return dx.zero_();  // an empty reduction
  auto dy = grad_out.contiguous(), w = weight.contiguous(), m = mask.contiguous();
  const DType dt = to_dtype(dy.scalar_type()), mt = to_dtype(mask.scalar_type());
  Plan pl = plan_dgrad(dy.data_ptr(), w.data_ptr(), m.data_ptr(), nullptr, false, dx.data_ptr(), 1,
                       tokens, out_f, in_f, dtype_size(dt), mt);
  check_grid(op, pl);
  launched(op, launch_dgrad(dt, mt, pl, at::cuda::getCurrentCUDAStream()), dt, mt);
  return dx;
}

at::Tensor masked_linear_grad_mask(const at::Tensor& grad_out, const at::Tensor& x,
                                   const at::Tensor& weight, at::ScalarType mask_dtype) {
  const char* op = "softtf::_cuda_masked_linear_grad_mask";
  check_masked_linear_grad_mask(op, grad_out, x, weight, mask_dtype, kCudaKernels);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
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
  check_mask_mixture_grad(op, grad_out, x, weight, masks, per_sample, kCudaKernels);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t n_tasks = masks.size(0);
  TORCH_CHECK(n_tasks <= std::numeric_limits<int>::max(), op, ": too many masks");
  const int64_t batches = per_sample ? x.size(0) : 1;
  auto opts = x.options().dtype(at::kFloat);
  auto out = new_output({batches, n_tasks}, opts);
  if (batches == 0) return out;
  // Nothing to sum (no token, or an empty W): every score is 0, and no empty grid is launched.
  if (leading(x) == 0 || out_f == 0 || in_f == 0) {
    out.zero_();
    return per_sample ? out : out.view({n_tasks});
  }
  const int64_t tokens = leading(x) / batches;
  auto dy = grad_out.contiguous(), xc = x.contiguous(), w = weight.contiguous();
  auto m = masks.contiguous();
  const DType dt = to_dtype(x.scalar_type()), mt = to_dtype(masks.scalar_type());
  const Grid g = tile_grid(out_f, in_f, batches);
  const int64_t tiles = int64_t(g.x) * g.y;
  auto partial = at::empty({batches, tiles, n_tasks}, opts);
  Plan pl = plan_mixture(dy.data_ptr(), xc.data_ptr(), w.data_ptr(), m.data_ptr(), int(n_tasks),
                         partial.data_ptr<float>(), batches, tokens, out_f, in_f, dtype_size(dt),
                         mt);
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
  check_mixed_task_linear(op, x, weight, masks, task_ids, bias, kCudaKernels);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  c10::cuda::CUDAGuard guard(x.device());
  auto y = new_output(with_last(x, out_f), x.options());
  const int64_t batches = x.size(0), all = leading(x);
  if (all == 0 || out_f == 0) return y;
  if (in_f == 0) return bias_only(y, bias);
  auto xc = x.contiguous(), w = weight.contiguous(), m = masks.contiguous();
  auto ids = task_ids.contiguous();
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const DType dt = to_dtype(x.scalar_type()), mt = to_dtype(masks.scalar_type());
  Plan pl = plan_fwd(xc.data_ptr(), w.data_ptr(), m.data_ptr(), ids.data_ptr(),
                     ids.scalar_type() == at::kLong, b.defined() ? b.data_ptr() : nullptr,
                     y.data_ptr(), batches, all / batches, out_f, in_f, dtype_size(dt), mt);
  check_grid(op, pl);
  launched(op, launch_fwd(dt, mt, pl, at::cuda::getCurrentCUDAStream()), dt, mt);
  return y;
}

at::Tensor mixed_task_linear_grad_input(const at::Tensor& grad_out, const at::Tensor& weight,
                                        const at::Tensor& masks, const at::Tensor& task_ids) {
  const char* op = "softtf::_cuda_mixed_task_linear_grad_input";
  check_mixed_task_linear_grad_input(op, grad_out, weight, masks, task_ids, kCudaKernels);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  c10::cuda::CUDAGuard guard(grad_out.device());
  auto dx = new_output(with_last(grad_out, in_f), grad_out.options());
  const int64_t batches = grad_out.size(0), all = leading(grad_out);
  if (all == 0 || in_f == 0) return dx;
  if (out_f == 0) return dx.zero_();  // an empty reduction
  auto dy = grad_out.contiguous(), w = weight.contiguous(), m = masks.contiguous();
  auto ids = task_ids.contiguous();
  const DType dt = to_dtype(dy.scalar_type()), mt = to_dtype(masks.scalar_type());
  Plan pl = plan_dgrad(dy.data_ptr(), w.data_ptr(), m.data_ptr(), ids.data_ptr(),
                       ids.scalar_type() == at::kLong, dx.data_ptr(), batches, all / batches, out_f,
                       in_f, dtype_size(dt), mt);
  check_grid(op, pl);
  launched(op, launch_dgrad(dt, mt, pl, at::cuda::getCurrentCUDAStream()), dt, mt);
  return dx;
}

// routed_lora: the rank-(T·r) LoRA of csrc/routed_lora.h, the same source as the CPU kernel, on
// cuBLAS GEMMs (every step is a thin GEMM or a [tokens, T·r] elementwise op: no custom tile kernel
// would beat cuBLAS here; Triton is the default CUDA backend of this op as of the others).
// The checks run before the device guard, which needs a CUDA device to switch to.
at::Tensor routed_lora(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                       const at::Tensor& weights, double scaling) {
  const char* op = "softtf::_cuda_routed_lora";
  check_routed_lora(op, x, lora_a, lora_b, weights, scaling, kCudaKernels);
  c10::cuda::CUDAGuard guard(lora_a.device());
  return routed_lora_forward(op, x, lora_a, lora_b, weights, scaling, kCudaKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_lora_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& weights, double scaling) {
  const char* op = "softtf::_cuda_routed_lora_backward";
  check_routed_lora_backward(op, grad_out, x, lora_a, lora_b, weights, scaling, kCudaKernels);
  c10::cuda::CUDAGuard guard(lora_a.device());
  return softtf::routed_lora_backward(op, grad_out, x, lora_a, lora_b, weights, scaling,
                                      kCudaKernels);
}

}  // namespace

// softtf::_cuda_<op> for every op of op_list.h (an op without a function above fails to compile).
TORCH_LIBRARY_IMPL(softtf, CUDA, m) {
#define SOFTTF_IMPL_CUDA(name, schema) m.impl("_cuda_" #name, &name);
  SOFTTF_OPS(SOFTTF_IMPL_CUDA)
#undef SOFTTF_IMPL_CUDA
}

}  // namespace softtf::cuda
