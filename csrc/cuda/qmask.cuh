// How the CUDA kernels read a mask: a float mask as stored; an int8 mask (softtf_kernels/quant.py:
// each row is `cols` int8 codes, then the row's fp32 scale and fp32 offset) dequantized in
// registers, offset + scale * code in fp32, as the W ⊙ M tile is staged in shared memory (kFwd,
// kDgrad) or as the mixture epilogue reads a task's mask tile. No kernel dequantizes a whole mask
// in memory. Compiles under nvcc and the host compiler (the CPU harness) alike.
#pragma once

#include "common.cuh"

namespace softtf::cuda {

template <class MT>
inline constexpr bool kQuantized = std::is_same_v<MT, int8_t>;

// Bytes after an int8 mask row's codes: its fp32 scale, then its fp32 offset.
inline constexpr int kQTailBytes = 8;

// Elements between a mask's rows (it is stored dense): an int8 row carries its tail.
inline int64_t mask_ld(int64_t cols, DType mask) {
  return cols + (mask == DType::kI8 ? kQTailBytes : 0);
}

struct QRow {
  float scale, offset;
};

// The tail of an int8 mask row. `aligned`: it is 4-byte aligned (the plan's vec_m guarantees it),
// so read as two words; else byte-wise (rows are cols + 8 bytes long: any alignment).
SOFTTF_HD QRow load_qrow(const int8_t* tail, bool aligned) {
  QRow q;
  if (aligned) {
    copy_bytes<4>(&q.scale, tail);
    copy_bytes<4>(&q.offset, tail + 4);
  } else {
    std::memcpy(&q.scale, tail, 4);
    std::memcpy(&q.offset, tail + 4, 4);
  }
  return q;
}

// VEC mask values of row r from column c of a mask with `cols` value columns and row stride ld
// (valid of them; the rest read as 0, or as the row's offset for an int8 mask: they meet a 0 of W).
// vec: the plan's vec_m (chunk-aligned rows, so vector loads and an aligned int8 tail).
template <class MT, int VEC>
SOFTTF_HD void load_mask_chunk(const MT* m, int64_t r, int64_t c, int64_t ld, int64_t cols,
                               int valid, bool vec, float (&out)[VEC]) {
  const MT* row = m + r * ld;
  load_chunk<MT, VEC>(row + c, valid, vec, out);
  if constexpr (kQuantized<MT>) {
    if (valid > 0) {  // an empty chunk reads nothing, not even its row's tail
      const QRow q = load_qrow(row + cols, vec);
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = q.offset + q.scale * out[j];
    }
  }
}

// One mask value M[r, c] (the mixture epilogue); `aligned` as for load_qrow.
template <class MT>
SOFTTF_HD float load_mask_value(const MT* m, int64_t r, int64_t c, int64_t ld, int64_t cols,
                                bool aligned) {
  const MT* row = m + r * ld;
  if constexpr (kQuantized<MT>) {
    const QRow q = load_qrow(row + cols, aligned);
    return q.offset + q.scale * float(row[c]);
  } else {
    return Num<MT>::to_f(row[c]);
  }
}

}  // namespace softtf::cuda
