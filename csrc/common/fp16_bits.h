// fp32 <-> IEEE fp16 bit conversions (round to nearest even, subnormals, inf/NaN), shared by the CPU code and
// the CUDA host code; device code uses __float2half_rn, which computes the same thing. The CPU tests check
// these against torch's own conversion, so both sides agree on what "round once to fp16" means.
#pragma once
#include <cstdint>
#include <cstring>

#include "common/half_float.h"

namespace llama_fast {

LF_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t u;
  if (exp == 0x1Fu) {  // inf / NaN
    u = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {  // normal
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {  // signed zero
    u = sign;
  } else {  // subnormal: renormalize
    exp = 113u;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    u = sign | (exp << 23) | ((man & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

LF_HD uint16_t float_to_half_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u);  // quiet NaN
  if (abs >= 0x47800000u) {  // >= 65536: past the largest finite after rounding -> inf
    return static_cast<uint16_t>(sign | 0x7C00u);
  }
  if (abs >= 0x38800000u) {                           // normal fp16 range (>= 2^-14)
    uint32_t r = abs + 0x0FFFu + ((abs >> 13) & 1u);  // round to nearest even at bit 13
    r -= 112u << 23;                                  // rebias 127 -> 15
    if (r >= (0x1Fu << 23)) return static_cast<uint16_t>(sign | 0x7C00u);
    return static_cast<uint16_t>(sign | (r >> 13));
  }
  // Subnormal or zero: value = abs_float * 2^24 rounded to an integer number of 2^-24 units.
  const uint32_t exp = abs >> 23;
  if (exp < 102u) return sign;  // below half of the smallest subnormal: rounds to zero
  const uint32_t man = (abs & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126u - exp;  // 2^(exp-127) * man/2^23 * 2^24 = man >> (126 - exp)
  uint32_t q = man >> shift;
  const uint32_t rem = man & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1);
  if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
  return static_cast<uint16_t>(sign | q);
}

}  // namespace llama_fast
