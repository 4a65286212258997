// CPU execution context for the CUDA kernel bodies of csrc/cuda/tile_gemm.cuh.
//
// A launch runs the grid's blocks one after another; all threads of a block share one
// shared-memory buffer, poisoned (0xFF bytes, NaN as floats) before every block so a kernel that
// reads what it did not write fails. Two ways to run the NT threads of a block:
//   - fibers (default): one ucontext fiber per CUDA thread on the calling OS thread. Each
//     __syncthreads() phase runs every thread up to its next barrier, in a pseudo-random order
//     that changes every phase (fixed seed: reproducible), so a result that depends on the order
//     of threads between barriers -- a missing __syncthreads -- changes with the order and fails.
//     Threads that leave the kernel while others wait at a barrier are reported (abort), as that
//     is undefined on the GPU.
//   - OS threads (SOFTTF_HARNESS_THREADS=1): one std::thread per CUDA thread, a std::barrier for
//     __syncthreads: true concurrency between barriers (slower: every barrier wakes NT threads).
//
// WMMA emulation (CpuMma): same API and semantics as nvcuda::wmma 16x16x16 with fp32
// accumulation and the layouts the kernels use (matrix_a row/col major, matrix_b row/col major,
// accumulator stored row-major). Fragments are warp-collective objects whose element distribution
// over lanes is unspecified by the API, so the emulation keeps the whole 16x16 tile in lane 0 of
// the warp; other lanes hold nothing. The kernel code must therefore only use fragments through
// these collective calls (as it does), never index them per lane.
#pragma once

#include <ucontext.h>

#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
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

struct FiberSched;
void fiber_sync(FiberSched* s);

struct CpuCtx {
  int tid_ = 0;
  unsigned bx_ = 0, by_ = 0, bz_ = 0, gx_ = 1, gy_ = 1;
  char* smem_ = nullptr;
  std::barrier<>* bar_ = nullptr;  // OS-thread mode
  FiberSched* sched_ = nullptr;    // fiber mode

  int tid() const { return tid_; }
  int lane() const { return tid_ % 32; }
  unsigned bx() const { return bx_; }
  unsigned by() const { return by_; }
  unsigned bz() const { return bz_; }
  unsigned gx() const { return gx_; }
  unsigned gy() const { return gy_; }
  void sync() const {
    if (sched_ != nullptr)
      fiber_sync(sched_);
    else
      bar_->arrive_and_wait();
  }
  char* smem() const { return smem_; }
  template <class T, bool A_K, bool B_K>
  using MmaOps = CpuMma<T, A_K, B_K>;
};

// Fiber scheduler: one ucontext per CUDA thread of the current block.
struct FiberSched {
  enum State { kRunnable, kAtBarrier, kDone };
  ucontext_t main{};
  std::vector<ucontext_t> fibers;
  std::vector<State> state;
  std::unique_ptr<char[]> stacks;  // uninitialized: pages are touched only as deep as used
  size_t stack_size = 256 * 1024;
  int current = 0;
  const std::function<void(CpuCtx&)>* body = nullptr;
  CpuCtx proto;  // block coordinates etc.; tid_ filled per fiber
};

inline thread_local FiberSched* tl_sched = nullptr;

inline void fiber_sync(FiberSched* s) {
  const int t = s->current;
  s->state[t] = FiberSched::kAtBarrier;
  swapcontext(&s->fibers[t], &s->main);
}

inline void fiber_entry() {
  FiberSched* s = tl_sched;
  const int t = s->current;
  CpuCtx c = s->proto;
  c.tid_ = t;
  (*s->body)(c);
  s->state[t] = FiberSched::kDone;  // returns to s->main through uc_link
}

inline bool use_os_threads() {
  const char* p = std::getenv("SOFTTF_HARNESS_THREADS");
  return p != nullptr && p[0] == '1';
}

// One block: every fiber from the start, phase by phase, until all have left the kernel.
[[gnu::noinline]] inline void run_fiber_block(FiberSched& s, int threads, std::vector<int>& order,
                                              std::mt19937& rng) {
  for (int t = 0; t < threads; ++t) {
    getcontext(&s.fibers[t]);
    s.fibers[t].uc_stack.ss_sp = s.stacks.get() + size_t(t) * s.stack_size;
    s.fibers[t].uc_stack.ss_size = s.stack_size;
    s.fibers[t].uc_link = &s.main;
    makecontext(&s.fibers[t], fiber_entry, 0);
    s.state[t] = FiberSched::kRunnable;
  }
  for (;;) {  // one barrier phase per iteration
    std::shuffle(order.begin(), order.end(), rng);
    for (int t : order) {
      s.current = t;
      swapcontext(&s.main, &s.fibers[t]);
    }
    int done = 0;
    for (auto st : s.state) done += st == FiberSched::kDone;
    if (done == threads) return;
    if (done != 0) {
      std::fprintf(stderr, "cuda harness: %d of %d threads exited while others wait at "
                           "__syncthreads (block %u,%u,%u)\n", done, threads, s.proto.bx_,
                   s.proto.by_, s.proto.bz_);
      std::abort();
    }
    for (auto& st : s.state) st = FiberSched::kRunnable;
  }
}

// Runs body(ctx) for every thread of every block of `grid` with `threads` threads per block.
template <class Body>
void cpu_launch(const Grid& grid, int threads, size_t smem_bytes, Body body) {
  if (grid.blocks() == 0) return;
  std::vector<char> storage(smem_bytes + 128);
  char* smem = storage.data() + (128 - reinterpret_cast<uintptr_t>(storage.data()) % 128) % 128;

  if (use_os_threads()) {
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
    return;
  }

  const std::function<void(CpuCtx&)> fn = [&](CpuCtx& c) { body(c); };
  FiberSched s;
  s.fibers.resize(threads);
  s.state.resize(threads);
  s.stacks.reset(new char[s.stack_size * threads]);
  s.body = &fn;
  s.proto.smem_ = smem, s.proto.sched_ = &s, s.proto.gx_ = grid.x, s.proto.gy_ = grid.y;
  FiberSched* saved = tl_sched;
  tl_sched = &s;
  std::mt19937 rng(12345u);
  std::vector<int> order(threads);
  for (int t = 0; t < threads; ++t) order[t] = t;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        if (smem_bytes) std::memset(smem, 0xff, smem_bytes);
        s.proto.bx_ = x, s.proto.by_ = y, s.proto.bz_ = z;
        run_fiber_block(s, threads, order, rng);
      }
  tl_sched = saved;
}

// Same launch plumbing as csrc/cuda/gpu_ctx.cuh's launch_family, on the CPU.
template <int FAM>
bool cpu_launch_family(DType t, DType u, const Plan& plan) {
  if (plan.grid.blocks() == 0) return true;
  bool ok = false;
  visit_dtype<CpuTypes, false, false>(t, [&](auto tt) {
    ok = visit_dtype<CpuTypes, FAM == kDmask, FAM != kDmask>(u, [&](auto ut) {
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
