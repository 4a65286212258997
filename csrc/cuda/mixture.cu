// mask_mixture_grad kernels: the tiled dy^T x GEMM (per batch, or per sample on grid z) whose
// epilogue reduces the C tile against every task's mask tile (each read once per output tile),
// then a deterministic reduction of the per-tile partial sums.
#include "gpu_ctx.cuh"
#include "kernels.h"

namespace softtf::cuda {

struct GpuReduceCtx {
  __device__ __forceinline__ int tid() const { return int(threadIdx.x); }
  __device__ __forceinline__ unsigned bx() const { return blockIdx.x; }
};

__global__ void __launch_bounds__(kReduceThreads) reduce_partials_kernel(ReduceParams r) {
  GpuReduceCtx ctx;
  reduce_partials_block(ctx, r);
}

bool launch_mixture(DType t, DType u, const Plan& plan, cudaStream_t stream) {
  return launch_family<kMixture>(t, u, plan, stream);
}

void launch_reduce_partials(const ReduceParams& r, cudaStream_t stream) {
  if (r.batches * r.n_tasks == 0) return;
  const Grid g = reduce_grid(r);
  reduce_partials_kernel<<<g.x, kReduceThreads, 0, stream>>>(r);
}

}  // namespace softtf::cuda
