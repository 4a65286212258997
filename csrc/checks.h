// What both C++ bindings (the CPU kernels in csrc/cpu, the CUDA binding csrc/cuda/bindings.cpp)
// do around a kernel: the argument checks and the output allocation.
//
// The checks are those the kernels' memory safety needs: shapes (every index a kernel computes
// stays inside its buffers), devices (a pointer is dereferenced on the device that holds it) and
// dtypes (a pointer is read as the element type it holds). The kernels can be called directly as
// torch.ops.softtf._cpp_* / _cuda_*, bypassing the Python validation, so they check for
// themselves. One function per op, in the order and with the messages of
// softtf_kernels/validate.py. Not checked here: the task_ids values (the CPU kernel checks them
// where it reads them; on CUDA that would need a device sync, so Python's validation does it).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace softtf {

// What a backend's kernels can read: the device type their pointers live on and the float dtypes
// they are built for (the CPU kernels also take float64, for gradcheck; the CUDA kernels do not).
struct KernelTarget {
  c10::DeviceType device;
  bool float64;
  const char* float_names;  // those dtypes, as the error messages list them
  bool int8_masks;          // reads int8 masks (softtf_kernels/quant.py: codes, then fp32 scale and offset per row)
};
inline constexpr KernelTarget kCpuKernels{c10::DeviceType::CPU, true,
                                          "float32, bfloat16, float16 or float64", true};
inline constexpr KernelTarget kCudaKernels{c10::DeviceType::CUDA, false,
                                           "float32, bfloat16 or float16 for the CUDA kernel", true};

// An int8 mask row: `in` codes, then its fp32 scale and fp32 offset (value = offset + scale * code).
inline constexpr int64_t kQMaskTail = 8;

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// ------------------------------------------------------------------ one argument
inline void check_float(const char* op, const char* name, at::ScalarType t, const KernelTarget& k) {
  TORCH_CHECK(is_float_type(t) && (k.float64 || t != at::kDouble), op, ": ", name, " must be ",
              k.float_names, ", got ", t);
}

inline void check_device_type(const char* op, const char* name, const at::Tensor& t,
                              const KernelTarget& k) {
  TORCH_CHECK(t.device().type() == k.device, op, ": ", name, " must be a ",
              c10::DeviceTypeName(k.device), " tensor, got ", t.device());
}

// On the kernels' device type, and on weight's device (one GPU, one stream, one guard).
inline void check_device(const char* op, const char* name, const at::Tensor& t,
                         const at::Tensor& weight, const KernelTarget& k) {
  check_device_type(op, name, t, k);
  TORCH_CHECK(t.device() == weight.device(), op, ": ", name, " is on ", t.device(),
              " but weight is on ", weight.device());
}

inline void check_weight(const char* op, const at::Tensor& weight, const KernelTarget& k) {
  check_device_type(op, "weight", weight, k);
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out, in], got shape ", weight.sizes());
  check_float(op, "weight", weight.scalar_type(), k);
}

// An activation (x or grad_out): last dim `feat` (`what` says which dim of weight), weight's dtype.
inline void check_activation(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& weight, int64_t feat, const char* what,
                             const KernelTarget& k) {
  check_device(op, name, t, weight, k);
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) == feat, op, ": ", name, " must have last dim ", feat,
              " (", what, "), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == weight.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
              " must equal weight dtype ", weight.scalar_type());
}

// An activation whose leading dim is the batch B (one task id or score row per sample).
inline void check_batched(const char* op, const char* name, const at::Tensor& t, int64_t feat) {
  TORCH_CHECK(t.dim() >= 2, op, ": ", name, " must have shape [B, ..., ", feat, "], got ", t.sizes());
}

// A mask's dtype: float (as the kernels' float dtypes) or int8 where the kernels read int8 masks.
inline void check_mask_dtype(const char* op, const char* name, at::ScalarType t, const KernelTarget& k) {
  if (t == at::kChar) {
    TORCH_CHECK(k.int8_masks, op, ": ", name, " is an int8 (quantized) mask, which the ",
                c10::DeviceTypeName(k.device), " kernels of this build do not read; "
                "use backend 'reference', or keep this task's masks in float (SoftConfig.mask_dtype)");
    return;
  }
  check_float(op, name, t, k);
}

inline int64_t mask_cols(const at::Tensor& mask, const at::Tensor& weight) {
  return weight.size(1) + (mask.scalar_type() == at::kChar ? kQMaskTail : 0);
}

inline void check_mask(const char* op, const at::Tensor& mask, const at::Tensor& weight,
                       const KernelTarget& k) {
  check_device(op, "mask", mask, weight, k);
  check_mask_dtype(op, "mask", mask.scalar_type(), k);
  const bool fits = mask.dim() == 2 && mask.size(0) == weight.size(0) && mask.size(1) == mask_cols(mask, weight);
  if (mask.scalar_type() == at::kChar) {
    TORCH_CHECK(fits, op, ": mask must have [out, in + 8] = [", weight.size(0), ", ", mask_cols(mask, weight),
                "] (an int8 mask: in + 8 columns), got ", mask.sizes());
  } else {
    TORCH_CHECK(fits, op, ": mask must have weight's shape ", weight.sizes(), ", got ", mask.sizes());
  }
}

inline void check_masks(const char* op, const at::Tensor& masks, const at::Tensor& weight,
                        const KernelTarget& k) {
  check_device(op, "masks", masks, weight, k);
  check_mask_dtype(op, "masks", masks.scalar_type(), k);
  TORCH_CHECK(masks.dim() == 3 && masks.size(1) == weight.size(0) && masks.size(2) == mask_cols(masks, weight),
              op, ": masks must have shape [T, ", weight.size(0), ", ", mask_cols(masks, weight), "], got ",
              masks.sizes());
  TORCH_CHECK(masks.size(0) > 0, op, ": masks must hold at least one task, got shape ",
              masks.sizes());
}

inline void check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& x,
                       const at::Tensor& weight, const KernelTarget& k) {
  if (!bias.has_value()) return;
  check_device(op, "bias", *bias, weight, k);
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape [",
              weight.size(0), "], got ", bias->sizes());
  TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
              " must equal x dtype ", x.scalar_type());
}

inline void check_task_ids(const char* op, const at::Tensor& ids, int64_t batch,
                           const at::Tensor& weight, const KernelTarget& k) {
  check_device(op, "task_ids", ids, weight, k);
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, op,
              ": task_ids must be an int64 or int32 tensor, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == batch, op, ": task_ids must have shape [", batch,
              "] (one id per sample), got ", ids.sizes());
}

inline void check_same_leading(const char* op, const at::Tensor& grad_out, const at::Tensor& x) {
  TORCH_CHECK(grad_out.sizes().slice(0, grad_out.dim() - 1) == x.sizes().slice(0, x.dim() - 1), op,
              ": grad_out and x must have the same leading dims, got ", grad_out.sizes(), " and ",
              x.sizes());
}

// ------------------------------------------------------------------ one op
inline void check_masked_linear(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& mask, const std::optional<at::Tensor>& bias,
                                const KernelTarget& k) {
  check_weight(op, weight, k);
  check_activation(op, "x", x, weight, weight.size(1), "weight.shape[1]", k);
  check_mask(op, mask, weight, k);
  check_bias(op, bias, x, weight, k);
}

inline void check_masked_linear_grad_input(const char* op, const at::Tensor& grad_out,
                                           const at::Tensor& weight, const at::Tensor& mask,
                                           const KernelTarget& k) {
  check_weight(op, weight, k);
  check_activation(op, "grad_out", grad_out, weight, weight.size(0), "weight.shape[0]", k);
  check_mask(op, mask, weight, k);
}

inline void check_masked_linear_grad_mask(const char* op, const at::Tensor& grad_out,
                                          const at::Tensor& x, const at::Tensor& weight,
                                          at::ScalarType mask_dtype, const KernelTarget& k) {
  check_weight(op, weight, k);
  check_activation(op, "x", x, weight, weight.size(1), "weight.shape[1]", k);
  check_activation(op, "grad_out", grad_out, weight, weight.size(0), "weight.shape[0]", k);
  check_same_leading(op, grad_out, x);
  // mask_dtype is the output's dtype: every backend writes all four float dtypes.
  TORCH_CHECK(is_float_type(mask_dtype), op,
              ": mask_dtype must be float32, bfloat16, float16 or float64, got ", mask_dtype);
}

inline void check_mask_mixture_grad(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                    const at::Tensor& weight, const at::Tensor& masks,
                                    bool per_sample, const KernelTarget& k) {
  check_weight(op, weight, k);
  check_activation(op, "x", x, weight, weight.size(1), "weight.shape[1]", k);
  check_activation(op, "grad_out", grad_out, weight, weight.size(0), "weight.shape[0]", k);
  check_same_leading(op, grad_out, x);
  check_masks(op, masks, weight, k);
  TORCH_CHECK(!per_sample || x.dim() >= 2, op, ": per_sample=True needs x of shape [B, ..., ",
              weight.size(1), "], got ", x.sizes());
}

inline void check_mixed_task_linear(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& masks, const at::Tensor& task_ids,
                                    const std::optional<at::Tensor>& bias, const KernelTarget& k) {
  check_weight(op, weight, k);
  check_activation(op, "x", x, weight, weight.size(1), "weight.shape[1]", k);
  check_batched(op, "x", x, weight.size(1));
  check_masks(op, masks, weight, k);
  check_task_ids(op, task_ids, x.size(0), weight, k);
  check_bias(op, bias, x, weight, k);
}

inline void check_mixed_task_linear_grad_input(const char* op, const at::Tensor& grad_out,
                                               const at::Tensor& weight, const at::Tensor& masks,
                                               const at::Tensor& task_ids, const KernelTarget& k) {
  check_weight(op, weight, k);
  check_activation(op, "grad_out", grad_out, weight, weight.size(0), "weight.shape[0]", k);
  check_batched(op, "grad_out", grad_out, weight.size(0));
  check_masks(op, masks, weight, k);
  check_task_ids(op, task_ids, grad_out.size(0), weight, k);
}

// routed_lora: x [B, ..., in], lora_a [T, r, in], lora_b [T, out, r] (x's dtype), weights [B, T]
// (any float dtype), scaling finite. The LoRA factors play weight's part in the device checks.
inline void check_routed_lora(const char* op, const at::Tensor& x, const at::Tensor& lora_a,
                              const at::Tensor& lora_b, const at::Tensor& weights, double scaling,
                              const KernelTarget& k) {
  check_device_type(op, "lora_a", lora_a, k);
  check_float(op, "lora_a", lora_a.scalar_type(), k);
  TORCH_CHECK(lora_a.dim() == 3, op, ": lora_a must be 3-D [T, r, in], got shape ", lora_a.sizes());
  TORCH_CHECK(lora_a.size(0) > 0, op, ": lora_a must hold at least one task, got shape ",
              lora_a.sizes());
  const int64_t n_tasks = lora_a.size(0), rank = lora_a.size(1), in_f = lora_a.size(2);
  check_device(op, "x", x, lora_a, k);
  check_float(op, "x", x.scalar_type(), k);
  TORCH_CHECK(x.dim() >= 2 && x.size(-1) == in_f, op, ": x must have shape [B, ..., ", in_f,
              "] (lora_a.shape[2]), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == lora_a.scalar_type(), op, ": x dtype ", x.scalar_type(),
              " must equal lora_a dtype ", lora_a.scalar_type());
  check_device(op, "lora_b", lora_b, lora_a, k);
  check_float(op, "lora_b", lora_b.scalar_type(), k);
  TORCH_CHECK(lora_b.dim() == 3 && lora_b.size(0) == n_tasks && lora_b.size(2) == rank, op,
              ": lora_b must have shape [", n_tasks, ", out, ", rank, "], got ", lora_b.sizes());
  TORCH_CHECK(lora_b.scalar_type() == lora_a.scalar_type(), op, ": lora_b dtype ",
              lora_b.scalar_type(), " must equal lora_a dtype ", lora_a.scalar_type());
  check_device(op, "weights", weights, lora_a, k);
  check_float(op, "weights", weights.scalar_type(), k);
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == x.size(0) && weights.size(1) == n_tasks, op,
              ": weights must have shape [", x.size(0), ", ", n_tasks, "] (one row per sample), got ",
              weights.sizes());
  TORCH_CHECK(std::isfinite(scaling), op, ": scaling must be finite, got ", scaling);
}

inline void check_routed_lora_backward(const char* op, const at::Tensor& grad_out,
                                       const at::Tensor& x, const at::Tensor& lora_a,
                                       const at::Tensor& lora_b, const at::Tensor& weights,
                                       double scaling, const KernelTarget& k) {
  check_routed_lora(op, x, lora_a, lora_b, weights, scaling, k);
  check_device(op, "grad_out", grad_out, lora_a, k);
  TORCH_CHECK(grad_out.dim() == x.dim() && grad_out.size(-1) == lora_b.size(1), op,
              ": grad_out must have shape [B, ..., ", lora_b.size(1), "] (lora_b.shape[1]), got ",
              grad_out.sizes());
  check_same_leading(op, grad_out, x);
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out dtype ",
              grad_out.scalar_type(), " must equal x dtype ", x.scalar_type());
}

// ------------------------------------------------------------------ outputs
// t's shape with the last dim replaced: the output shape of the linear ops.
inline std::vector<int64_t> with_last(const at::Tensor& t, int64_t last) {
  auto s = t.sizes().vec();
  s.back() = last;
  return s;
}

// Every kernel output, dense row-major. Tests set SOFTTF_POISON_OUTPUTS=1 so that outputs start as
// NaN: an element a kernel forgets to write then fails the oracle comparison instead of passing on
// lucky zeros. Read per call, as softtf_kernels.common.new_output does.
inline at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& opts) {
  auto t = at::empty(shape, opts.memory_format(at::MemoryFormat::Contiguous));
  const char* p = std::getenv("SOFTTF_POISON_OUTPUTS");
  if (p != nullptr && std::strcmp(p, "1") == 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

}  // namespace softtf
