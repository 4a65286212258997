// CPU execution context for the CUDA kernel bodies of csrc/cuda/tile_gemm.cuh.
//
// A launch runs the grid's blocks one after another. Each block runs with one std::thread per
// CUDA thread (threadIdx.x = 0..NT-1), all sharing one shared-memory buffer; __syncthreads() is a
// std::barrier over the block's threads, so the threads interleave freely between barriers as on
// the GPU (a missing barrier is a real data race here too). Shared memory is poisoned (0xFF bytes,
// NaN as floats) before every block so a kernel that reads what it did not write fails.
//
// WMMA emulation (CpuMma): same API and semantics as nvcuda::wmma 16x16x16 with fp32
// accumulation and the layouts the kernels use (matrix_a row/col major, matrix_b row/col major,
// accumulator stored row-major). Fragments are warp-collective objects whose element distribution
// over lanes is unspecified by the API, so the emulation keeps the whole 16x16 tile in lane 0 of
// the warp; other lanes hold nothing. The kernel code must therefore only use fragments through
// these collective calls (as it does), never index them per lane.
#pragma once

#include <barrier>
#include <cstring>
#include <thread>
#include <vector>

#include "cuda/tile_gemm.cuh"

namespace softtf::cuda::harness {

template <class T, bool A_K, bool B_K>
struct CpuMma {
  struct FragA {  // logical [m][k]
    float v[16][16];
  };
  struct FragB {  // logical [k][n]
    float v[16][16];
  };
  struct FragC {  // logical [m][n]
    float v[16][16];
  };
  template <class Ctx>
  static void zero(Ctx& c, FragC& f) {
    if (c.lane() == 0) std::memset(f.v, 0, sizeof f.v);
  }
  template <class Ctx>
  static void load_a(Ctx& c, FragA& f, const T* p, int ld) {
    if (c.lane() != 0) return;
    for (int m = 0; m < 16; ++m)
      for (int k = 0; k < 16; ++k) f.v[m][k] = Num<T>::to_f(A_K ? p[m * ld + k] : p[k * ld + m]);
  }
  template <class Ctx>
  static void load_b(Ctx& c, FragB& f, const T* p, int ld) {
    if (c.lane() != 0) return;
    for (int k = 0; k < 16; ++k)
      for (int n = 0; n < 16; ++n) f.v[k][n] = Num<T>::to_f(B_K ? p[n * ld + k] : p[k * ld + n]);
  }
  template <class Ctx>
  static void mma(Ctx& c, FragC& d, const FragA& a, const FragB& b) {
    if (c.lane() != 0) return;
    for (int m = 0; m < 16; ++m)
      for (int k = 0; k < 16; ++k) {
        const float av = a.v[m][k];
        for (int n = 0; n < 16; ++n) d.v[m][n] += av * b.v[k][n];
      }
  }
  template <class Ctx>
  static void store(Ctx& c, float* p, const FragC& f, int ld) {
    if (c.lane() != 0) return;
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 16; ++n) p[m * ld + n] = f.v[m][n];
  }
};

struct CpuCtx {
  int tid_ = 0;
  unsigned bx_ = 0, by_ = 0, bz_ = 0, gx_ = 1, gy_ = 1;
  char* smem_ = nullptr;
  std::barrier<>* bar_ = nullptr;

  int tid() const { return tid_; }
  int lane() const { return tid_ % 32; }
  unsigned bx() const { return bx_; }
  unsigned by() const { return by_; }
  unsigned bz() const { return bz_; }
  unsigned gx() const { return gx_; }
  unsigned gy() const { return gy_; }
  void sync() const { bar_->arrive_and_wait(); }
  char* smem() const { return smem_; }
  template <class T, bool A_K, bool B_K>
  using MmaOps = CpuMma<T, A_K, B_K>;
};

// Runs body(ctx) for every thread of every block of `grid` with `threads` threads per block.
template <class Body>
void cpu_launch(const Grid& grid, int threads, size_t smem_bytes, Body body) {
  if (grid.blocks() == 0) return;
  std::vector<char> storage(smem_bytes + 128);
  char* smem = storage.data() + (128 - reinterpret_cast<uintptr_t>(storage.data()) % 128) % 128;
  std::barrier<> bar(threads);
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      CpuCtx c;
      c.tid_ = t, c.smem_ = smem, c.bar_ = &bar, c.gx_ = grid.x, c.gy_ = grid.y;
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            if (t == 0 && smem_bytes) std::memset(smem, 0xff, smem_bytes);
            bar.arrive_and_wait();  // block start: poisoned smem visible to all
            c.bx_ = x, c.by_ = y, c.bz_ = z;
            body(c);
            bar.arrive_and_wait();  // block end: nobody still reads smem
          }
    });
  }
  for (auto& th : pool) th.join();
}

// Same launch plumbing as csrc/cuda/gpu_ctx.cuh's launch_family, on the CPU.
template <int FAM>
bool cpu_launch_family(DType t, DType u, const Plan& plan) {
  if (plan.grid.blocks() == 0) return true;
  bool ok = false;
  visit_dtype<CpuTypes, false>(t, [&](auto tt) {
    ok = visit_dtype<CpuTypes, FAM == kDmask>(u, [&](auto ut) {
      using T = typename decltype(tt)::type;
      using U = typename decltype(ut)::type;
      constexpr int smem = SmemLayout<T, FamilyTraits<FAM>::A_K, FamilyTraits<FAM>::B_K>::BYTES;
      cpu_launch(plan.grid, kThreads, smem,
                 [&](CpuCtx& c) { gemm_block<FAM, T, U>(c, plan.p); });
    });
  });
  return ok;
}

inline void cpu_reduce_partials(const ReduceParams& r) {
  if (r.batches * r.n_tasks == 0) return;
  cpu_launch(reduce_grid(r), kReduceThreads, 0,
             [&](CpuCtx& c) { reduce_partials_block(c, r); });
}

}  // namespace softtf::cuda::harness
