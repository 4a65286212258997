// Launchers of the softtf CUDA kernels (torch-free). Implemented in csrc/cuda/*.cu; called by the
// torch binding (bindings.cpp), which checks the launch with C10_CUDA_KERNEL_LAUNCH_CHECK().
#pragma once

#include <cuda_runtime_api.h>

#include "common.cuh"
#include "plan.h"

namespace softtf::cuda {

// Each returns false (and launches nothing) if the dtype pair is not supported:
// t = x/W dtype in {f32, f16, bf16}; u = mask dtype in {f32, f16, bf16, i8 (an int8 mask,
// dequantized in registers)} (kDmask: output dtype in {f32, f16, bf16, f64}).
bool launch_fwd(DType t, DType u, const Plan& plan, cudaStream_t stream);      // ml_fwd.cu
bool launch_dgrad(DType t, DType u, const Plan& plan, cudaStream_t stream);    // ml_dgrad.cu
bool launch_dmask(DType t, DType u, const Plan& plan, cudaStream_t stream);    // ml_dmask.cu
bool launch_mixture(DType t, DType u, const Plan& plan, cudaStream_t stream);  // mixture.cu
void launch_reduce_partials(const ReduceParams& r, cudaStream_t stream);       // mixture.cu

}  // namespace softtf::cuda
