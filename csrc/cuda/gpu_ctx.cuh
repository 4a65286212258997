// GPU execution context of the kernel bodies in tile_gemm.cuh: CUDA built-ins and WMMA.
#pragma once
#ifndef __CUDACC__
#error "gpu_ctx.cuh is CUDA-only; the CPU harness uses tests/cuda_harness/cpu_ctx.h"
#endif

#include <mma.h>

#include "tile_gemm.cuh"

namespace softtf::cuda {

// WMMA 16x16x16, T = __half or __nv_bfloat16, fp32 accumulation (tensor cores, sm_80 / sm_90).
// A_K: A is staged k-contiguous (row_major m x k), else m-contiguous (col_major).
// B_K: B is staged k-contiguous ([n][k] = col_major k x n), else n-contiguous (row_major).
template <class T, bool A_K, bool B_K>
struct WmmaOps {
  using LA = std::conditional_t<A_K, nvcuda::wmma::row_major, nvcuda::wmma::col_major>;
  using LB = std::conditional_t<B_K, nvcuda::wmma::col_major, nvcuda::wmma::row_major>;
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, LA>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, LB>;
  using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

  template <class Ctx>
  __device__ __forceinline__ static void zero(Ctx&, FragC& c) {
    nvcuda::wmma::fill_fragment(c, 0.0f);
  }
  template <class Ctx>
  __device__ __forceinline__ static void load_a(Ctx&, FragA& a, const T* p, int ld) {
    nvcuda::wmma::load_matrix_sync(a, p, ld);
  }
  template <class Ctx>
  __device__ __forceinline__ static void load_b(Ctx&, FragB& b, const T* p, int ld) {
    nvcuda::wmma::load_matrix_sync(b, p, ld);
  }
  template <class Ctx>
  __device__ __forceinline__ static void mma(Ctx&, FragC& c, const FragA& a, const FragB& b) {
    nvcuda::wmma::mma_sync(c, a, b, c);
  }
  template <class Ctx>
  __device__ __forceinline__ static void store(Ctx&, float* p, const FragC& c, int ld) {
    nvcuda::wmma::store_matrix_sync(p, c, ld, nvcuda::wmma::mem_row_major);
  }
};

struct GpuCtx {
  char* smem_;
  __device__ __forceinline__ int tid() const { return int(threadIdx.x); }
  __device__ __forceinline__ unsigned bx() const { return blockIdx.x; }
  __device__ __forceinline__ unsigned by() const { return blockIdx.y; }
  __device__ __forceinline__ unsigned bz() const { return blockIdx.z; }
  __device__ __forceinline__ unsigned gx() const { return gridDim.x; }
  __device__ __forceinline__ unsigned gy() const { return gridDim.y; }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  __device__ __forceinline__ char* smem() const { return smem_; }
  template <class T, bool A_K, bool B_K>
  using MmaOps = WmmaOps<T, A_K, B_K>;
};

template <int FAM, class T, class U>
__global__ void __launch_bounds__(kThreads) gemm_kernel(GemmParams p) {
  extern __shared__ __align__(128) char smem_raw[];
  GpuCtx ctx{smem_raw};
  gemm_block<FAM, T, U>(ctx, p);
}

__global__ void __launch_bounds__(kReduceThreads) reduce_partials_kernel(ReduceParams r);

// Launches family FAM for runtime dtypes t (x/W) and u (mask, float or int8; for kDmask the
// output, float or float64).
// Returns false (launching nothing) for an unsupported dtype pair.
template <int FAM>
bool launch_family(DType t, DType u, const Plan& plan, cudaStream_t stream) {
  if (plan.grid.blocks() == 0) return true;
  bool ok = false;
  visit_dtype<GpuTypes, false, false>(t, [&](auto tt) {
    ok = visit_dtype<GpuTypes, FAM == kDmask, FAM != kDmask>(u, [&](auto ut) {
      using T = typename decltype(tt)::type;
      using U = typename decltype(ut)::type;
      constexpr int smem = SmemLayout<T, FamilyTraits<FAM>::A_K, FamilyTraits<FAM>::B_K>::BYTES;
      static_assert(smem <= 48 * 1024, "static limit of dynamic shared memory without opt-in");
      gemm_kernel<FAM, T, U><<<dim3(plan.grid.x, plan.grid.y, plan.grid.z), kThreads, smem,
                               stream>>>(plan.p);
    });
  });
  return ok;
}

}  // namespace softtf::cuda
