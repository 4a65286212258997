// Torch binding of the C++ CPU kernels: softtf::_cpp_<op> on the CPU dispatch key, for every op
// of op_list.h (a kernel missing from kernels.h fails to compile here).
#include <torch/library.h>

#include "kernels.h"
#include "op_list.h"

TORCH_LIBRARY_IMPL(softtf, CPU, m) {
#define SOFTTF_IMPL_CPU(name, schema) m.impl("_cpp_" #name, &softtf::cpu::name);
  SOFTTF_OPS(SOFTTF_IMPL_CPU)
#undef SOFTTF_IMPL_CPU
}
