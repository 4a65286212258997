// The C++ CPU kernels, one per op of op_list.h (registered as softtf::_cpp_<op> by bindings.cpp).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace softtf::cpu {

// masked_linear_cpu.cpp
at::Tensor masked_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                         const std::optional<at::Tensor>& bias);
at::Tensor masked_linear_grad_input(const at::Tensor& grad_out, const at::Tensor& weight,
                                    const at::Tensor& mask);
at::Tensor masked_linear_grad_mask(const at::Tensor& grad_out, const at::Tensor& x,
                                   const at::Tensor& weight, at::ScalarType mask_dtype);
// mixture_cpu.cpp
at::Tensor mask_mixture_grad(const at::Tensor& grad_out, const at::Tensor& x,
                             const at::Tensor& weight, const at::Tensor& masks, bool per_sample);
at::Tensor mixed_task_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& masks,
                             const at::Tensor& task_ids, const std::optional<at::Tensor>& bias);
at::Tensor mixed_task_linear_grad_input(const at::Tensor& grad_out, const at::Tensor& weight,
                                        const at::Tensor& masks, const at::Tensor& task_ids);
// routed_lora_cpu.cpp
at::Tensor routed_lora(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                       const at::Tensor& weights, double scaling);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_lora_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& weights, double scaling);

}  // namespace softtf::cpu
