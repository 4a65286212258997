// masked_linear family kernel kFwd (see plan.h for the GEMM mapping, tile_gemm.cuh for the body).
#include "gpu_ctx.cuh"
#include "kernels.h"

namespace softtf::cuda {

bool launch_fwd(DType t, DType u, const Plan& plan, cudaStream_t stream) {
  return launch_family<kFwd>(t, u, plan, stream);
}

}  // namespace softtf::cuda
