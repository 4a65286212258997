// masked_linear family kernel kDmask (see plan.h for the GEMM mapping, tile_gemm.cuh for the body).
#include "gpu_ctx.cuh"
#include "kernels.h"

namespace softtf::cuda {

bool launch_dmask(DType t, DType u, const Plan& plan, cudaStream_t stream) {
  return launch_family<kDmask>(t, u, plan, stream);
}

}  // namespace softtf::cuda
