// The scales and offsets of a QuantWeight (cpu/kernels.h) as fp32, for the kernels that dequantize
// (quant_linear.cpp, gemm.cpp).
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "common/half_float.h"
#include "cpu/kernels.h"

namespace llama_fast {
namespace cpu {

inline float half_bits_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalize
      exp = 127 - 15 + 1;
      while ((mant & 0x400) == 0) {
        mant <<= 1;
        --exp;
      }
      u = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// Element i of a scale / offset array of the given type, as fp32.
inline float scale_at(const void* p, ScaleType t, int64_t i) {
  switch (t) {
    case ScaleType::kF32: return static_cast<const float*>(p)[i];
    case ScaleType::kF16: return half_bits_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
  }
}

}  // namespace cpu
}  // namespace llama_fast
