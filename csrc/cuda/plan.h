// Problem description of every softtf CUDA kernel as one tiled GEMM, and the host-side planning
// (pointers, leading dims, batch offsets, grid, vector-load eligibility) shared by the torch
// binding (bindings.cpp) and the CPU execution harness (tests/cuda_harness/harness.cpp).
//
// No torch headers: plain C++ (plus common.cuh) that nvcc and g++ both compile.
//
// Every op is C[m, n] = sum_k A(m, k) * B(k, n) over a tile grid (x: m tiles, y: n tiles,
// z: batch), with a family-specific operand layout and epilogue:
//
//   family    M       N    K       A(m,k)            B(k,n)                      epilogue
//   kFwd      tokens  out  in      x[m, k]           (W ⊙ M)[n, k]               + bias, -> x dtype
//   kDgrad    tokens  in   out     dy[m, k]          (W ⊙ M)[k, n]               -> dy dtype
//   kDmask    out     in   tokens  dy[k, m]          x[k, n]                     * W[m, n] -> mask dtype
//   kMixture  out     in   tokens  dy[k, m]          x[k, n]                     Σ C ⊙ W ⊙ M_t per t
//
// For mixed_task_linear(_grad_input) the batch z is the sample and the mask is masks[task_ids[z]];
// for the per-sample mixture the batch z is the sample (its own tokens only). A mask M may be
// float or int8 (rows of in codes + 8 tail bytes, see qmask.cuh): M is then its dequantized value.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "qmask.cuh"

namespace softtf::cuda {

enum Family : int { kFwd = 0, kDgrad = 1, kDmask = 2, kMixture = 3 };

// Tile sizes are the same for every dtype so that the grid does not depend on it.
constexpr int kBlockM = 64;
constexpr int kBlockN = 64;
constexpr int kThreads = 128;

struct GemmParams {
  const void* a;  // A operand (x or dy), element type T
  int64_t lda;
  int64_t a_bstride;  // elements between batches
  const void* b;      // B operand (W, or x for kDmask / kMixture), element type T
  int64_t ldb;
  int64_t b_bstride;
  const void* mask;  // kFwd/kDgrad: mask(s) multiplied into B while staging (B's layout)
                     // kMixture: masks [T, M, N] of the epilogue
  int64_t ldm;           // mask row stride: in, or in + 8 for an int8 mask (mask_ld)
  int64_t mask_tstride;  // elements between tasks' masks
  const void* task_ids;  // kFwd/kDgrad: mask of batch z is masks[task_ids[z]]; null: mask 0
  int task_ids_64;       // task_ids are int64 (else int32)
  const void* bias;      // kFwd: [N] or null
  const void* w;         // kDmask/kMixture: W [M, N] of the epilogue (ld = ldw)
  int64_t ldw;
  void* c;  // kFwd/kDgrad/kDmask: output [M, N] per batch
  int64_t ldc;
  int64_t c_bstride;
  float* partial;  // kMixture: [batches, tiles, n_tasks] partial sums
  int n_tasks;
  int64_t M, N, K;  // per batch
  int vec_a;        // A may be read with 16-byte vector loads (see aligned_rows)
  int vec_b;        // B may be read with vector loads
  int vec_m;        // the mask may be read in chunk-wide vector loads; an int8 mask's tails are
                    // then 4-byte aligned (kMixture: only the latter)
};

struct Grid {
  unsigned x = 1, y = 1, z = 1;
  int64_t blocks() const { return int64_t(x) * y * z; }
};

struct Plan {
  GemmParams p{};
  Grid grid{};
};

SOFTTF_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows of `ld` elements of `elem` bytes starting at `ptr`, `bstride` elements between batches,
// can be read with `align`-byte vector loads at every `align`-byte boundary of a row: base
// aligned and every row/batch start aligned. (Chunks are VEC = 16 / sizeof(T) elements of a row.)
inline bool aligned_rows(const void* ptr, int64_t ld, int64_t bstride, int elem, int align = 16) {
  if (ptr == nullptr) return true;
  return reinterpret_cast<uintptr_t>(ptr) % align == 0 && (ld * elem) % align == 0 &&
         (bstride * elem) % align == 0;
}

// A mask staged with B in VEC = 16 / elem chunks: a chunk is VEC * mask_elem bytes (4 for an int8
// mask beside fp32), read as one vector when so aligned. Separate from vec_b, so that W keeps its
// 16-byte loads whatever the mask's row length (an int8 row is in + 8 bytes).
inline bool aligned_mask(const void* masks, int64_t ldm, int64_t tstride, int elem, DType mask) {
  const int me = dtype_size(mask), chunk = (16 / elem) * me;
  return aligned_rows(masks, ldm, tstride, me, chunk < 16 ? chunk : 16);
}

inline Grid tile_grid(int64_t M, int64_t N, int64_t Z) {
  Grid g;
  g.x = unsigned(ceil_div(M, kBlockM));
  g.y = unsigned(ceil_div(N, kBlockN));
  g.z = unsigned(Z);
  return g;
}

// y[z] = x[z] (W ⊙ M_z)^T + bias; x: [Z, tokens, in] contiguous, y: [Z, tokens, out].
// masks: [n_masks, out, mask_ld(in)]; task_ids null means the single mask for every batch.
inline Plan plan_fwd(const void* x, const void* w, const void* masks, const void* task_ids,
                     bool task_ids_64, const void* bias, void* y, int64_t Z, int64_t tokens,
                     int64_t out_f, int64_t in_f, int elem, DType mask) {
  Plan pl;
  GemmParams& p = pl.p;
  p.a = x, p.lda = in_f, p.a_bstride = tokens * in_f;
  p.b = w, p.ldb = in_f, p.b_bstride = 0;
  p.mask = masks, p.ldm = mask_ld(in_f, mask), p.mask_tstride = task_ids ? out_f * p.ldm : 0;
  p.task_ids = task_ids, p.task_ids_64 = task_ids_64;
  p.bias = bias;
  p.c = y, p.ldc = out_f, p.c_bstride = tokens * out_f;
  p.M = tokens, p.N = out_f, p.K = in_f;
  p.vec_a = aligned_rows(x, in_f, p.a_bstride, elem);
  p.vec_b = aligned_rows(w, in_f, 0, elem);
  p.vec_m = aligned_mask(masks, p.ldm, p.mask_tstride, elem, mask);
  pl.grid = tile_grid(p.M, p.N, Z);
  return pl;
}

// dx[z] = dy[z] (W ⊙ M_z); dy: [Z, tokens, out], dx: [Z, tokens, in].
inline Plan plan_dgrad(const void* dy, const void* w, const void* masks, const void* task_ids,
                       bool task_ids_64, void* dx, int64_t Z, int64_t tokens, int64_t out_f,
                       int64_t in_f, int elem, DType mask) {
  Plan pl;
  GemmParams& p = pl.p;
  p.a = dy, p.lda = out_f, p.a_bstride = tokens * out_f;
  p.b = w, p.ldb = in_f, p.b_bstride = 0;
  p.mask = masks, p.ldm = mask_ld(in_f, mask), p.mask_tstride = task_ids ? out_f * p.ldm : 0;
  p.task_ids = task_ids, p.task_ids_64 = task_ids_64;
  p.c = dx, p.ldc = in_f, p.c_bstride = tokens * in_f;
  p.M = tokens, p.N = in_f, p.K = out_f;
  p.vec_a = aligned_rows(dy, out_f, p.a_bstride, elem);
  p.vec_b = aligned_rows(w, in_f, 0, elem);
  p.vec_m = aligned_mask(masks, p.ldm, p.mask_tstride, elem, mask);
  pl.grid = tile_grid(p.M, p.N, Z);
  return pl;
}

// dM = (dy^T x) ⊙ W over all tokens; dy: [tokens, out], x: [tokens, in], dm: [out, in].
inline Plan plan_dmask(const void* dy, const void* x, const void* w, void* dm, int64_t tokens,
                       int64_t out_f, int64_t in_f, int elem) {
  Plan pl;
  GemmParams& p = pl.p;
  p.a = dy, p.lda = out_f, p.a_bstride = 0;
  p.b = x, p.ldb = in_f, p.b_bstride = 0;
  p.w = w, p.ldw = in_f;
  p.c = dm, p.ldc = in_f, p.c_bstride = 0;
  p.M = out_f, p.N = in_f, p.K = tokens;
  p.vec_a = aligned_rows(dy, out_f, 0, elem);
  p.vec_b = aligned_rows(x, in_f, 0, elem);
  pl.grid = tile_grid(p.M, p.N, 1);
  return pl;
}

// partial[z, tile, t] = Σ_{tile} (dy_z^T x_z) ⊙ W ⊙ M_t; dy: [Z, tokens, out], x: [Z, tokens, in],
// masks: [T, out, mask_ld(in)]. Z = 1 reduces over every token (per-batch scores).
inline Plan plan_mixture(const void* dy, const void* x, const void* w, const void* masks,
                         int n_tasks, float* partial, int64_t Z, int64_t tokens, int64_t out_f,
                         int64_t in_f, int elem, DType mask) {
  Plan pl;
  GemmParams& p = pl.p;
  p.a = dy, p.lda = out_f, p.a_bstride = tokens * out_f;
  p.b = x, p.ldb = in_f, p.b_bstride = tokens * in_f;
  p.w = w, p.ldw = in_f;
  p.mask = masks, p.ldm = mask_ld(in_f, mask), p.mask_tstride = out_f * p.ldm, p.n_tasks = n_tasks;
  p.partial = partial;
  p.M = out_f, p.N = in_f, p.K = tokens;
  p.vec_a = aligned_rows(dy, out_f, p.a_bstride, elem);
  p.vec_b = aligned_rows(x, in_f, p.b_bstride, elem);
  p.vec_m = aligned_rows(masks, p.ldm, p.mask_tstride, dtype_size(mask), 4);  // int8 tails as words
  pl.grid = tile_grid(p.M, p.N, Z);
  return pl;
}

// Sums the per-tile partials of plan_mixture: out[z, t] = Σ_tile partial[z, tile, t].
struct ReduceParams {
  const float* partial;
  float* out;
  int64_t batches, tiles, n_tasks;
};
constexpr int kReduceThreads = 128;
inline Grid reduce_grid(const ReduceParams& r) {
  Grid g;
  g.x = unsigned(std::max<int64_t>(1, ceil_div(r.batches * r.n_tasks, kReduceThreads)));
  return g;
}

}  // namespace softtf::cuda
