// The one list of the softtf ops: SOFTTF_OPS(X) expands X(name, schema) once per op.
//
// csrc/ops.cpp defines every entry three times (softtf::<name>, softtf::_cpp_<name>,
// softtf::_cuda_<name>); the CPU bindings (csrc/cpu/bindings.cpp) and the CUDA bindings
// (csrc/cuda/bindings.cpp) register a kernel for every entry, so an op missing a kernel is a
// compile error. The Python side has its own table of the same ops (softtf_kernels/table.py);
// tests/test_op_table.py checks that both agree.
#pragma once

#define SOFTTF_OPS(X)                                                                           \
  X(masked_linear, "(Tensor x, Tensor weight, Tensor mask, Tensor? bias=None) -> Tensor")       \
  X(masked_linear_grad_input, "(Tensor grad_out, Tensor weight, Tensor mask) -> Tensor")        \
  X(masked_linear_grad_mask,                                                                    \
    "(Tensor grad_out, Tensor x, Tensor weight, ScalarType mask_dtype) -> Tensor")              \
  X(mask_mixture_grad,                                                                          \
    "(Tensor grad_out, Tensor x, Tensor weight, Tensor masks, bool per_sample) -> Tensor")      \
  X(mixed_task_linear,                                                                          \
    "(Tensor x, Tensor weight, Tensor masks, Tensor task_ids, Tensor? bias=None) -> Tensor")    \
  X(mixed_task_linear_grad_input,                                                               \
    "(Tensor grad_out, Tensor weight, Tensor masks, Tensor task_ids) -> Tensor")                \
  X(routed_lora,                                                                                \
    "(Tensor x, Tensor lora_a, Tensor lora_b, Tensor weights, float scaling) -> Tensor")        \
  X(routed_lora_backward,                                                                       \
    "(Tensor grad_out, Tensor x, Tensor lora_a, Tensor lora_b, Tensor weights, float scaling) " \
    "-> (Tensor, Tensor, Tensor, Tensor)")
