// CPU kernels of routed_lora: the rank-(T·r) LoRA of csrc/routed_lora.h (shared with the CUDA
// binding) on BLAS GEMMs; the per-sample scaling and the ∂/∂w reduction are ATen elementwise
// kernels, parallel over OpenMP.
#include <ATen/ATen.h>

#include "routed_lora.h"
#include "common.h"
#include "kernels.h"

namespace softtf::cpu {

at::Tensor routed_lora(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                       const at::Tensor& weights, double scaling) {
  return routed_lora_forward("softtf::routed_lora", x, lora_a, lora_b, weights, scaling,
                             kCpuKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_lora_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& weights, double scaling) {
  return softtf::routed_lora_backward("softtf::routed_lora_backward", grad_out, x, lora_a, lora_b,
                                      weights, scaling, kCpuKernels);
}

}  // namespace softtf::cpu
