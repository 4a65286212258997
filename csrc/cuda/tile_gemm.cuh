// The per-block code of every softtf CUDA kernel, written once as templates over an execution
// context `Ctx`:
//   - on the GPU, Ctx = GpuCtx (gpu_ctx.cuh): threadIdx/blockIdx, __syncthreads, dynamic shared
//     memory, and WMMA tensor-core fragments for the MMA step;
//   - on the CPU, Ctx = CpuCtx (tests/cuda_harness/cpu_ctx.h): one std::thread per CUDA thread,
//     a std::barrier for __syncthreads, a heap buffer for shared memory, and an emulation of the
//     WMMA API for the MMA step.
// So the index computation, bounds-checked tile loads, the masked staging step (W ⊙ M formed
// while staging the W tile in shared memory, never in global memory; an int8 M dequantized in
// registers there, qmask.cuh), the MMA/FMA loops and the epilogues below are the same source
// lines in both.
//
// Ctx interface: tid(), bx(), by(), bz(), gx(), sync(), smem(), and
//   template <class T, bool A_K, bool B_K> using MmaOps = ... with FragA/FragB/FragC,
//   zero(c, C), load_a(c, A, ptr, ld), load_b(c, B, ptr, ld), mma(c, C, A, B), store(c, ptr, C, ld)
// following nvcuda::wmma semantics for 16x16x16 tiles, fp32 accumulation, and the shared-memory
// layouts chosen by A_K / B_K (see compute_tc).
#pragma once

#include "common.cuh"
#include "plan.h"
#include "qmask.cuh"

namespace softtf::cuda {

// ------------------------------------------------------------------ tile configuration
// 16-bit inputs: 64x64x32 block tile, 4 warps of 32x32 (2x2 WMMA 16x16x16 tiles), fp32 accumulation.
// fp32 inputs:   64x64x16 block tile, 128 threads, each a 4x8 micro-tile of FMAs.
template <class T>
struct TileCfg {
  static constexpr bool kTC = !std::is_same_v<T, float>;
  static constexpr int BM = kBlockM, BN = kBlockN, NT = kThreads;
  static constexpr int BK = kTC ? 32 : 16;
  static constexpr int VEC = 16 / int(sizeof(T));  // elements per 16-byte chunk
  static constexpr int PAD = VEC;                  // keeps smem rows 16-byte (and WMMA) aligned
  static constexpr int CPAD = 4;                   // fp32 C staging tile row padding
  static constexpr int LDC_S = BN + CPAD;
};

enum Epilogue : int { kEpiStore = 0, kEpiGradMask = 1, kEpiMixture = 2 };

template <int FAM>
struct FamilyTraits;
template <>
struct FamilyTraits<kFwd> {
  static constexpr bool A_K = true, B_K = true, MASK_IN_B = true;
  static constexpr int EPI = kEpiStore;
};
template <>
struct FamilyTraits<kDgrad> {
  static constexpr bool A_K = true, B_K = false, MASK_IN_B = true;
  static constexpr int EPI = kEpiStore;
};
template <>
struct FamilyTraits<kDmask> {
  static constexpr bool A_K = false, B_K = false, MASK_IN_B = false;
  static constexpr int EPI = kEpiGradMask;
};
template <>
struct FamilyTraits<kMixture> {
  static constexpr bool A_K = false, B_K = false, MASK_IN_B = false;
  static constexpr int EPI = kEpiMixture;
};

// Shared-memory layout of one block. A is staged k-contiguous [BM][BK+PAD] when A_K, else
// m-contiguous [BK][BM+PAD]; B is [BN][BK+PAD] when B_K, else [BK][BN+PAD]: always the layout of
// global memory, so global->shared copies move contiguous runs. The fp32 C tile (epilogue)
// reuses the same bytes after the main loop.
template <class T, bool A_K, bool B_K>
struct SmemLayout {
  using Cfg = TileCfg<T>;
  static constexpr int A_ROWS = A_K ? Cfg::BM : Cfg::BK, A_COLS = A_K ? Cfg::BK : Cfg::BM;
  static constexpr int B_ROWS = B_K ? Cfg::BN : Cfg::BK, B_COLS = B_K ? Cfg::BK : Cfg::BN;
  static constexpr int LDA_S = A_COLS + Cfg::PAD, LDB_S = B_COLS + Cfg::PAD;
  static constexpr int A_BYTES = ((A_ROWS * LDA_S * int(sizeof(T)) + 127) / 128) * 128;
  static constexpr int B_BYTES = B_ROWS * LDB_S * int(sizeof(T));
  static constexpr int C_BYTES = Cfg::BM * Cfg::LDC_S * 4;
  static constexpr int RED_BYTES = Cfg::NT * 4;  // block reduction scratch (after the C tile)
  static constexpr int BYTES =
      (A_BYTES + B_BYTES) > (C_BYTES + RED_BYTES) ? (A_BYTES + B_BYTES) : (C_BYTES + RED_BYTES);
};

// ------------------------------------------------------------------ bounds-checked tile loads
// Number of valid elements of the VEC-element chunk at (row, col) of a rows x cols matrix.
SOFTTF_HD int chunk_valid(int64_t row, int64_t col, int64_t rows, int64_t cols, int vec) {
  if (row >= rows || col >= cols) return 0;
  int64_t v = cols - col;
#ifdef SOFTTF_PLANT_BUG
  // Deliberate off-by-one for the harness self-test: drop the last element of a tail chunk.
  if (v < vec) v -= 1;
#endif
  return v < vec ? int(v) : vec;
}

// One R x C tile (C contiguous) of a row-major global matrix, moved global -> registers (fetch,
// optionally multiplied by a mask of the same layout, float or int8 dequantized in registers: the
// masked staging step) -> shared memory (commit). Thread t owns chunks t, t + NT, ... so
// consecutive threads read consecutive 16 bytes.
template <class T, class MT, int R, int C, int VEC, int NT>
struct TileCopy {
  static constexpr int CPR = C / VEC;
  static constexpr int CHUNKS = R * CPR / NT;
  static_assert(C % VEC == 0 && (R * CPR) % NT == 0, "tile must split evenly into chunks");
  static constexpr bool kMasked = !std::is_void_v<MT>;
  using MaskT = std::conditional_t<kMasked, MT, T>;

  alignas(16) T v[CHUNKS][VEC];

  // Tile origin (r0, c0) of a rows x cols matrix with row stride ld (the mask's: mld); outside
  // reads as 0. vec / vec_m: the matrix's / the mask's rows take vector loads (plan.h).
  SOFTTF_HD void fetch(int tid, const T* src, int64_t ld, const MaskT* msk, int64_t mld, int64_t r0,
                       int64_t c0, int64_t rows, int64_t cols, bool vec, bool vec_m) {
#pragma unroll
    for (int i = 0; i < CHUNKS; ++i) {
      const int q = tid + i * NT;
      const int r = q / CPR, cc = (q % CPR) * VEC;
      const int64_t gr = r0 + r, gc = c0 + cc;
      const int valid = chunk_valid(gr, gc, rows, cols, VEC);
      const int64_t off = valid > 0 ? gr * ld + gc : 0;
      float f[VEC];
      load_chunk<T, VEC>(src + off, valid, vec, f);
      if constexpr (kMasked) {
        float m[VEC];
        load_mask_chunk<MT, VEC>(msk, valid > 0 ? gr : 0, valid > 0 ? gc : 0, mld, cols, valid,
                                 vec_m, m);
#pragma unroll
        for (int j = 0; j < VEC; ++j) f[j] *= m[j];
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[i][j] = Num<T>::from_f(f[j]);
    }
  }

  SOFTTF_HD void commit(int tid, T* smem, int sld) const {
#pragma unroll
    for (int i = 0; i < CHUNKS; ++i) {
      const int q = tid + i * NT;
      const int r = q / CPR, cc = (q % CPR) * VEC;
      copy_bytes<VEC * int(sizeof(T))>(smem + r * sld + cc, v[i]);
    }
  }
};

// ------------------------------------------------------------------ MMA step (16-bit, tensor cores)
// Warp w of 4 computes the 32x32 sub-tile (w / 2, w % 2) as 2x2 WMMA 16x16x16 tiles.
template <class Ops>
struct TcAcc {
  typename Ops::FragC c[2][2];
};

template <class T, bool A_K, bool B_K, class Ctx, class Ops>
SOFTTF_HD void compute_tc(Ctx& ctx, TcAcc<Ops>& acc, const T* As, const T* Bs) {
  using Cfg = TileCfg<T>;
  using L = SmemLayout<T, A_K, B_K>;
  const int warp = ctx.tid() / 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
#pragma unroll
  for (int kk = 0; kk < Cfg::BK; kk += 16) {
    typename Ops::FragA fa[2];
    typename Ops::FragB fb[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int m = wm + 16 * i;
      Ops::load_a(ctx, fa[i], A_K ? As + m * L::LDA_S + kk : As + kk * L::LDA_S + m, L::LDA_S);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int n = wn + 16 * j;
      Ops::load_b(ctx, fb[j], B_K ? Bs + n * L::LDB_S + kk : Bs + kk * L::LDB_S + n, L::LDB_S);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) Ops::mma(ctx, acc.c[i][j], fa[i], fb[j]);
  }
}

// ------------------------------------------------------------------ FMA step (fp32, SIMT)
// Thread (ty = tid / 8, tx = tid % 8) owns rows ty + 16 i (i < 4) and columns tx + 8 j (j < 8).
struct SimtAcc {
  float c[4][8];
};

template <bool A_K, bool B_K>
SOFTTF_HD void compute_simt(int tid, SimtAcc& acc, const float* As, const float* Bs) {
  using Cfg = TileCfg<float>;
  using L = SmemLayout<float, A_K, B_K>;
  const int ty = tid / 8, tx = tid % 8;
#pragma unroll
  for (int kk = 0; kk < Cfg::BK; ++kk) {
    float a[4], b[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = ty + 16 * i;
      a[i] = A_K ? As[m * L::LDA_S + kk] : As[kk * L::LDA_S + m];
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int n = tx + 8 * j;
      b[j] = B_K ? Bs[n * L::LDB_S + kk] : Bs[kk * L::LDB_S + n];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc.c[i][j] += a[i] * b[j];
  }
}

// ------------------------------------------------------------------ block reduction (mixture)
// Sum of v over the block's NT threads, returned to every thread; uses red[NT] of shared memory.
template <class Ctx>
SOFTTF_HD float block_sum(Ctx& ctx, float* red, float v) {
  const int tid = ctx.tid();
  red[tid] = v;
  ctx.sync();
#pragma unroll 1
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) red[tid] += red[tid + s];
    ctx.sync();
  }
  const float total = red[0];
  ctx.sync();  // red is reused by the next call
  return total;
}

SOFTTF_HD int64_t read_task_id(const GemmParams& p, int64_t z) {
  return p.task_ids_64 ? int64_t(static_cast<const int64_t*>(p.task_ids)[z])
                       : int64_t(static_cast<const int32_t*>(p.task_ids)[z]);
}

// ------------------------------------------------------------------ the block body
// T: x/W/dy element type. U: mask type, float or int8 (kFwd, kDgrad, kMixture), or output type
// (kDmask).
template <int FAM, class T, class U, class Ctx>
SOFTTF_HD void gemm_block(Ctx& ctx, const GemmParams& p) {
  using Cfg = TileCfg<T>;
  using F = FamilyTraits<FAM>;
  constexpr bool A_K = F::A_K, B_K = F::B_K;
  using L = SmemLayout<T, A_K, B_K>;
  using MaskB = std::conditional_t<F::MASK_IN_B, U, void>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, NT = Cfg::NT, VEC = Cfg::VEC;

  const int tid = ctx.tid();
  const int64_t z = ctx.bz();
  const int64_t m0 = int64_t(ctx.bx()) * BM, n0 = int64_t(ctx.by()) * BN;
  const T* A = static_cast<const T*>(p.a) + z * p.a_bstride;
  const T* B = static_cast<const T*>(p.b) + z * p.b_bstride;
  const U* Mb = nullptr;  // mask staged with B (W ⊙ M)
  if constexpr (F::MASK_IN_B) {
    const int64_t task = p.task_ids ? read_task_id(p, z) : 0;
    Mb = static_cast<const U*>(p.mask) + task * p.mask_tstride;
  }

  char* smem = ctx.smem();
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = reinterpret_cast<T*>(smem + L::A_BYTES);
  float* Cs = reinterpret_cast<float*>(smem);

  TileCopy<T, void, L::A_ROWS, L::A_COLS, VEC, NT> ta;
  TileCopy<T, MaskB, L::B_ROWS, L::B_COLS, VEC, NT> tb;
  const bool vec_a = p.vec_a != 0, vec_b = p.vec_b != 0, vec_m = p.vec_m != 0;
  // Global (row, col) extents and tile origins in the stored layouts.
  const int64_t a_rows = A_K ? p.M : p.K, a_cols = A_K ? p.K : p.M;
  const int64_t b_rows = B_K ? p.N : p.K, b_cols = B_K ? p.K : p.N;
  auto fetch = [&](int64_t k0) {
    ta.fetch(tid, A, p.lda, static_cast<const T*>(nullptr), 0, A_K ? m0 : k0, A_K ? k0 : m0,
             a_rows, a_cols, vec_a, false);
    tb.fetch(tid, B, p.ldb, reinterpret_cast<const typename decltype(tb)::MaskT*>(Mb), p.ldm,
             B_K ? n0 : k0, B_K ? k0 : n0, b_rows, b_cols, vec_b, vec_m);
  };
  const int64_t k_tiles = ceil_div(p.K, BK);

  if constexpr (Cfg::kTC) {
    using Ops = typename Ctx::template MmaOps<T, A_K, B_K>;
    TcAcc<Ops> acc;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) Ops::zero(ctx, acc.c[i][j]);
    if (k_tiles > 0) fetch(0);
#pragma unroll 1
    for (int64_t kt = 0; kt < k_tiles; ++kt) {
      ta.commit(tid, As, L::LDA_S);
      tb.commit(tid, Bs, L::LDB_S);
#ifndef SOFTTF_PLANT_RACE  // harness self-test: a missing __syncthreads before the MMA step
      ctx.sync();
#endif
      if (kt + 1 < k_tiles) fetch((kt + 1) * BK);  // next tile's loads overlap this tile's MMAs
      compute_tc<T, A_K, B_K>(ctx, acc, As, Bs);
      ctx.sync();
    }
    const int warp = tid / 32;
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        Ops::store(ctx, Cs + (wm + 16 * i) * Cfg::LDC_S + wn + 16 * j, acc.c[i][j], Cfg::LDC_S);
  } else {
    SimtAcc acc;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc.c[i][j] = 0.0f;
    if (k_tiles > 0) fetch(0);
#pragma unroll 1
    for (int64_t kt = 0; kt < k_tiles; ++kt) {
      ta.commit(tid, As, L::LDA_S);
      tb.commit(tid, Bs, L::LDB_S);
#ifndef SOFTTF_PLANT_RACE  // harness self-test: a missing __syncthreads before the MMA step
      ctx.sync();
#endif
      if (kt + 1 < k_tiles) fetch((kt + 1) * BK);
      compute_simt<A_K, B_K>(tid, acc, As, Bs);
      ctx.sync();
    }
    const int ty = tid / 8, tx = tid % 8;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) Cs[(ty + 16 * i) * Cfg::LDC_S + tx + 8 * j] = acc.c[i][j];
  }
  ctx.sync();

  // ---------------------------------------------------------------- epilogues (from the C tile)
  if constexpr (F::EPI == kEpiStore) {
    T* C = static_cast<T*>(p.c) + z * p.c_bstride;
    const T* bias = static_cast<const T*>(p.bias);
#pragma unroll 4
    for (int idx = tid; idx < BM * BN; idx += NT) {
      const int r = idx / BN, col = idx % BN;
      const int64_t gm = m0 + r, gn = n0 + col;
      if (gm < p.M && gn < p.N) {
        float v = Cs[r * Cfg::LDC_S + col];
        if (bias != nullptr) v += Num<T>::to_f(bias[gn]);
        C[gm * p.ldc + gn] = Num<T>::from_f(v);
      }
    }
  } else if constexpr (F::EPI == kEpiGradMask) {
    U* C = static_cast<U*>(p.c);
    const T* W = static_cast<const T*>(p.w);
#pragma unroll 4
    for (int idx = tid; idx < BM * BN; idx += NT) {
      const int r = idx / BN, col = idx % BN;
      const int64_t gm = m0 + r, gn = n0 + col;
      if (gm < p.M && gn < p.N)
        C[gm * p.ldc + gn] = Num<U>::from_f(Cs[r * Cfg::LDC_S + col] * Num<T>::to_f(W[gm * p.ldw + gn]));
    }
  } else {
    static_assert(F::EPI == kEpiMixture);
    // G ⊙ W in place (0 outside the matrix), then one pass over each task's mask tile (an int8
    // one dequantized per element from its code and its row's tail, a cached broadcast read).
    const T* W = static_cast<const T*>(p.w);
    for (int idx = tid; idx < BM * BN; idx += NT) {
      const int r = idx / BN, col = idx % BN;
      const int64_t gm = m0 + r, gn = n0 + col;
      float& g = Cs[r * Cfg::LDC_S + col];
      g = (gm < p.M && gn < p.N) ? g * Num<T>::to_f(W[gm * p.ldw + gn]) : 0.0f;
    }
    float* red = Cs + BM * Cfg::LDC_S;
    const int64_t tiles = int64_t(ctx.gx()) * ctx.gy();
    const int64_t tile = int64_t(ctx.by()) * ctx.gx() + ctx.bx();
#pragma unroll 1
    for (int t = 0; t < p.n_tasks; ++t) {
      const U* Mt = static_cast<const U*>(p.mask) + t * p.mask_tstride;
      float s = 0.0f;
      for (int idx = tid; idx < BM * BN; idx += NT) {
        const int r = idx / BN, col = idx % BN;
        const int64_t gm = m0 + r, gn = n0 + col;
        if (gm < p.M && gn < p.N)
          s += Cs[r * Cfg::LDC_S + col] * load_mask_value(Mt, gm, gn, p.ldm, p.N, p.vec_m != 0);
      }
      // (each thread reads back only the C elements it scaled itself: same idx sequence)
      s = block_sum(ctx, red, s);
      if (tid == 0) p.partial[(z * tiles + tile) * p.n_tasks + t] = s;
    }
  }
}

// out[z, t] = Σ_tile partial[z, tile, t] in a fixed order (deterministic).
template <class Ctx>
SOFTTF_HD void reduce_partials_block(Ctx& ctx, const ReduceParams& r) {
  const int64_t i = int64_t(ctx.bx()) * kReduceThreads + ctx.tid();
  if (i < r.batches * r.n_tasks) {
    const int64_t z = i / r.n_tasks, t = i % r.n_tasks;
    float s = 0.0f;
    for (int64_t tile = 0; tile < r.tiles; ++tile) s += r.partial[(z * r.tiles + tile) * r.n_tasks + t];
    r.out[i] = s;
  }
}

}  // namespace softtf::cuda
