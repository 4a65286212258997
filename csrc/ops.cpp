// Op schemas of the `softtf` namespace. Every op the library exposes is declared here once.
//
// Public ops (torch.ops.softtf.<name>) dispatch in Python (softtf_kernels/_registry.py) to a
// backend chosen per call: the C++ CPU kernels, the CUDA C++ kernels, Triton, or the reference.
// The backend kernels are exposed as private ops with the same arguments, prefixed `_cpp_`
// (CPU dispatch key) and `_cuda_` (CUDA dispatch key), so Python can call and probe them.
#include <Python.h>
#include <torch/library.h>

namespace {

constexpr const char* kMaskedLinear =
    "(Tensor x, Tensor weight, Tensor mask, Tensor? bias=None) -> Tensor";
constexpr const char* kGradInput = "(Tensor grad_out, Tensor weight, Tensor mask) -> Tensor";
constexpr const char* kGradMask =
    "(Tensor grad_out, Tensor x, Tensor weight, ScalarType mask_dtype) -> Tensor";
constexpr const char* kMixtureGrad =
    "(Tensor grad_out, Tensor x, Tensor weight, Tensor masks, bool per_sample) -> Tensor";
constexpr const char* kMixedTask =
    "(Tensor x, Tensor weight, Tensor masks, Tensor task_ids, Tensor? bias=None) -> Tensor";
constexpr const char* kMixedTaskGradInput =
    "(Tensor grad_out, Tensor weight, Tensor masks, Tensor task_ids) -> Tensor";

void define_family(torch::Library& m, const std::string& prefix) {
  m.def((prefix + "masked_linear" + kMaskedLinear).c_str());
  m.def((prefix + "masked_linear_grad_input" + kGradInput).c_str());
  m.def((prefix + "masked_linear_grad_mask" + kGradMask).c_str());
  m.def((prefix + "mask_mixture_grad" + kMixtureGrad).c_str());
  m.def((prefix + "mixed_task_linear" + kMixedTask).c_str());
  m.def((prefix + "mixed_task_linear_grad_input" + kMixedTaskGradInput).c_str());
}

}  // namespace

TORCH_LIBRARY(softtf, m) {
  define_family(m, "");
  define_family(m, "_cpp_");
  define_family(m, "_cuda_");
}

// Importing softtf_kernels._C runs the static registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
