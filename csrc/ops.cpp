// Op schemas of the `softtf` namespace, defined from the one list in op_list.h.
//
// Public ops (torch.ops.softtf.<name>) dispatch in Python (softtf_kernels/registry.py) to a
// backend chosen per call: the C++ CPU kernels, the CUDA C++ kernels, Triton, or the reference.
// The backend kernels are exposed as private ops with the same arguments, prefixed `_cpp_`
// (CPU dispatch key) and `_cuda_` (CUDA dispatch key), so Python can call and probe them.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "op_list.h"

namespace {

void define_family(torch::Library& m, const std::string& prefix) {
#define SOFTTF_DEFINE(name, schema) m.def((prefix + #name schema).c_str());
  SOFTTF_OPS(SOFTTF_DEFINE)
#undef SOFTTF_DEFINE
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
