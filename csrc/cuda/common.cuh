// Shared building blocks of the softtf CUDA kernels that compile both as CUDA (nvcc) and as plain
// host C++ (g++, for the CPU execution harness in tests/cuda_harness/).
//
// Nothing here includes torch. Under nvcc the 16-bit types are CUDA's __half / __nv_bfloat16;
// under a host compiler they are the bit-exact software types soft_half / soft_bf16 below, so
// the same kernel templates run on the CPU against the same raw bytes torch stores.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define SOFTTF_HD __host__ __device__ __forceinline__
#else
#define SOFTTF_HD inline
#endif

namespace softtf::cuda {

// Element types as runtime codes (the torch binding and the harness map their dtypes to these).
// kI8: an int8 mask (softtf_kernels/quant.py), a mask type only.
enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3, kI8 = 4 };

inline int dtype_size(DType d) {
  return d == DType::kF64 ? 8 : (d == DType::kF32 ? 4 : (d == DType::kI8 ? 1 : 2));
}

// ------------------------------------------------------------------ software 16-bit types (host)
struct soft_half {
  uint16_t bits;
};
struct soft_bf16 {
  uint16_t bits;
};

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  float f;
  if (exp == 0) {
    f = std::ldexp(float(mant), -24);  // zero or subnormal, exact
    return sign ? -f : f;
  }
  uint32_t bits = exp == 31 ? (sign | 0x7f800000u | (mant << 13))
                            : (sign | ((exp + 112u) << 23) | (mant << 13));
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round-to-nearest-even, as __float2half_rn.
inline uint16_t float_to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u);
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {                          // below 2^-14: subnormal half
    float af;
    std::memcpy(&af, &ax, 4);
    return sign | uint16_t(std::nearbyint(af * 16777216.0f));  // units of 2^-24, ties to even
  }
  uint32_t h = ((((ax >> 23) - 112u) << 10) | ((ax & 0x7fffffu) >> 13));
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return sign | uint16_t(h);
}

inline float bf16_bits_to_float(uint16_t b) {
  uint32_t bits = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {  // round-to-nearest-even, as __float2bfloat16_rn
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return uint16_t(x >> 16);
}

// ------------------------------------------------------------------ conversions to/from fp32
template <class T>
struct Num;
template <>
struct Num<float> {
  SOFTTF_HD static float to_f(float v) { return v; }
  SOFTTF_HD static float from_f(float v) { return v; }
};
template <>
struct Num<double> {  // only as an output type (grad_mask with a float64 mask)
  SOFTTF_HD static float to_f(double v) { return float(v); }
  SOFTTF_HD static double from_f(float v) { return double(v); }
};
template <>
struct Num<int8_t> {  // an int8 mask's code, read only (qmask.cuh dequantizes it)
  SOFTTF_HD static float to_f(int8_t v) { return float(v); }
};
template <>
struct Num<soft_half> {
  static inline float to_f(soft_half v) { return half_bits_to_float(v.bits); }
  static inline soft_half from_f(float v) { return soft_half{float_to_half_bits(v)}; }
};
template <>
struct Num<soft_bf16> {
  static inline float to_f(soft_bf16 v) { return bf16_bits_to_float(v.bits); }
  static inline soft_bf16 from_f(float v) { return soft_bf16{float_to_bf16_bits(v)}; }
};
#ifdef __CUDACC__
template <>
struct Num<__half> {
  SOFTTF_HD static float to_f(__half v) { return __half2float(v); }
  SOFTTF_HD static __half from_f(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  SOFTTF_HD static float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  SOFTTF_HD static __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};
#endif

// ------------------------------------------------------------------ raw copies (vector loads)
// Copies BYTES bytes; on the GPU as 16-byte (or 8/4-byte) transactions. The caller guarantees
// the alignment (min(BYTES, 16)) of both pointers.
template <int BYTES>
SOFTTF_HD void copy_bytes(void* dst, const void* src) {
#ifdef __CUDA_ARCH__
  if constexpr (BYTES % 16 == 0) {
#pragma unroll
    for (int i = 0; i < BYTES / 16; ++i)
      reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
  } else if constexpr (BYTES == 8) {
    *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(src);
  } else {
    static_assert(BYTES == 4, "copy_bytes: 4, 8 or a multiple of 16 bytes");
    *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(src);
  }
#else
  std::memcpy(dst, src, BYTES);
#endif
}

// Loads VEC elements at p (valid of them; the rest read as 0) into fp32. A 16-byte (or
// VEC*sizeof(T)-byte) vector load when the chunk is whole and the rows are aligned, else scalar.
template <class T, int VEC>
SOFTTF_HD void load_chunk(const T* p, int valid, bool vec, float (&out)[VEC]) {
  if (vec && valid == VEC) {
    alignas(16) T tmp[VEC];
    copy_bytes<VEC * int(sizeof(T))>(tmp, p);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = Num<T>::to_f(tmp[j]);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = j < valid ? Num<T>::to_f(p[j]) : 0.0f;
  }
}

// ------------------------------------------------------------------ dtype dispatch
template <class T>
struct Tag {
  using type = T;
};

// The concrete 16-bit types of a compilation: GPU (CUDA types) or CPU harness (soft types).
struct CpuTypes {
  using f16 = soft_half;
  using bf16 = soft_bf16;
};
#ifdef __CUDACC__
struct GpuTypes {
  using f16 = __half;
  using bf16 = __nv_bfloat16;
};
#endif

// Calls f(Tag<T>{}) for the type of code d; float64 only when ALLOW_F64, int8 only when ALLOW_I8.
// False if unsupported.
template <class Types, bool ALLOW_F64, bool ALLOW_I8, class F>
bool visit_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kF32:
      f(Tag<float>{});
      return true;
    case DType::kF16:
      f(Tag<typename Types::f16>{});
      return true;
    case DType::kBF16:
      f(Tag<typename Types::bf16>{});
      return true;
    case DType::kF64:
      if constexpr (ALLOW_F64) {
        f(Tag<double>{});
        return true;
      }
      return false;
    case DType::kI8:
      if constexpr (ALLOW_I8) {
        f(Tag<int8_t>{});
        return true;
      }
      return false;
  }
  return false;
}

}  // namespace softtf::cuda
