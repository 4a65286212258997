// CPU execution harness of the softtf CUDA kernels: a shared library (loaded with ctypes by
// tests/test_cuda_harness.py) that plans each op exactly as csrc/cuda/bindings.cpp does (the
// shared plan_* functions of csrc/cuda/plan.h) and runs the kernel bodies of
// csrc/cuda/tile_gemm.cuh through the CPU context of cpu_ctx.h.
//
// Inputs are raw, contiguous buffers (any alignment) in torch's byte layout; dtype codes are
// softtf::cuda::DType (0 f32, 1 f16, 2 bf16, 3 f64, 4 i8: an int8 mask [.., out, in + 8] in
// softtf_kernels/quant.py's layout). Every entry point returns 0 on success and 1 for an
// unsupported dtype pair.
//
// Build: g++ -std=c++20 -O2 -shared -fPIC -pthread -I csrc tests/cuda_harness/harness.cpp
//        [-DSOFTTF_PLANT_BUG]   (a deliberate tail-bound bug, to prove the tests can fail)
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_ctx.h"

using namespace softtf::cuda;
using namespace softtf::cuda::harness;

namespace {
int g_last_vec = -1;
int remember(const Plan& pl, bool ok) {
  g_last_vec = (pl.p.vec_a ? 1 : 0) | (pl.p.vec_b ? 2 : 0) | (pl.p.vec_m ? 4 : 0);
  return ok ? 0 : 1;
}
}  // namespace

extern "C" {

// vec_a | vec_b << 1 | vec_m << 2 of the last planned launch: which operands took the vector path.
int sth_last_vec() { return g_last_vec; }

int sth_planted_bug() {
#ifdef SOFTTF_PLANT_BUG
  return 1;
#else
  return 0;
#endif
}

// fp32 -> fp16 / bf16 rounding and back as the harness's software types do it (tested bit-exact
// against torch's conversions).
void sth_round_f16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = float_to_half_bits(in[i]);
}
void sth_round_bf16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = float_to_bf16_bits(in[i]);
}
void sth_widen_f16(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = half_bits_to_float(in[i]);
}

int sth_masked_linear(int t, int u, const void* x, const void* w, const void* m, const void* bias,
                      void* y, int64_t tokens, int64_t out_f, int64_t in_f) {
  const DType dt = DType(t), mt = DType(u);
  Plan pl = plan_fwd(x, w, m, nullptr, false, bias, y, 1, tokens, out_f, in_f, dtype_size(dt), mt);
  return remember(pl, cpu_launch_family<kFwd>(dt, mt, pl));
}

int sth_grad_input(int t, int u, const void* dy, const void* w, const void* m, void* dx,
                   int64_t tokens, int64_t out_f, int64_t in_f) {
  const DType dt = DType(t), mt = DType(u);
  Plan pl = plan_dgrad(dy, w, m, nullptr, false, dx, 1, tokens, out_f, in_f, dtype_size(dt), mt);
  return remember(pl, cpu_launch_family<kDgrad>(dt, mt, pl));
}

int sth_grad_mask(int t, int u, const void* dy, const void* x, const void* w, void* dm,
                  int64_t tokens, int64_t out_f, int64_t in_f) {
  const DType dt = DType(t), ot = DType(u);
  Plan pl = plan_dmask(dy, x, w, dm, tokens, out_f, in_f, dtype_size(dt));
  return remember(pl, cpu_launch_family<kDmask>(dt, ot, pl));
}

int sth_mixed_linear(int t, int u, const void* x, const void* w, const void* masks,
                     const void* task_ids, int task_ids_64, const void* bias, void* y, int64_t batch,
                     int64_t tokens, int64_t out_f, int64_t in_f) {
  const DType dt = DType(t), mt = DType(u);
  Plan pl = plan_fwd(x, w, masks, task_ids, task_ids_64, bias, y, batch, tokens, out_f, in_f,
                     dtype_size(dt), mt);
  return remember(pl, cpu_launch_family<kFwd>(dt, mt, pl));
}

int sth_mixed_grad_input(int t, int u, const void* dy, const void* w, const void* masks,
                         const void* task_ids, int task_ids_64, void* dx, int64_t batch,
                         int64_t tokens, int64_t out_f, int64_t in_f) {
  const DType dt = DType(t), mt = DType(u);
  Plan pl = plan_dgrad(dy, w, masks, task_ids, task_ids_64, dx, batch, tokens, out_f, in_f,
                       dtype_size(dt), mt);
  return remember(pl, cpu_launch_family<kDgrad>(dt, mt, pl));
}

// out: [batch, n_tasks] fp32; batch = 1 reduces over every token (per_sample=False).
int sth_mixture(int t, int u, const void* dy, const void* x, const void* w, const void* masks,
                int n_tasks, int64_t batch, int64_t tokens, int64_t out_f, int64_t in_f,
                float* out) {
  const DType dt = DType(t), mt = DType(u);
  const Grid g = tile_grid(out_f, in_f, batch);
  const int64_t tiles = int64_t(g.x) * g.y;
  std::vector<float> partial(size_t(std::max<int64_t>(1, batch * tiles * n_tasks)),
                             std::numeric_limits<float>::quiet_NaN());
  Plan pl = plan_mixture(dy, x, w, masks, n_tasks, partial.data(), batch, tokens, out_f, in_f,
                         dtype_size(dt), mt);
  const bool ok = cpu_launch_family<kMixture>(dt, mt, pl);
  if (ok) cpu_reduce_partials(ReduceParams{partial.data(), out, batch, tiles, n_tasks});
  return remember(pl, ok);
}

}  // extern "C"
