// Fast int4 -> fp16 conversion by the magic-number trick, on the serialized int4 layout of quant_format.h.
//
// A 32-bit word of packed int4 holds 8 consecutive elements e0..e7 (byte j = e(2j) low nibble, e(2j+1) high),
// so element i sits at bits 4i..4i+3. fp16 1024.0 is 0x6400 and its 10 mantissa bits count units of 1, so
// OR-ing a 4-bit code q into its low bits gives exactly the fp16 value 1024 + q. One LOP3 does that for two
// elements at once:   ((word >> 4i) & 0x000F000F) | 0x64006400  =  half2(1024 + e_i, 1024 + e_{i+4})
// and one HSUB2 of 1024 gives the exact codes. The four pairs of a word are (e0,e4) (e1,e5) (e2,e6) (e3,e7).
#pragma once
#include <cstdint>

#include "common/half_float.h"

namespace llama_fast {
namespace quant {

constexpr uint32_t kInt4PairMask = 0x000F000Fu;
constexpr uint32_t kHalf1024x2 = 0x64006400u;  // half2(1024, 1024)

// Two fp16 bit patterns (low 16 bits: 1024 + e_i, high 16 bits: 1024 + e_{i+4}), i in 0..3.
LF_HD uint32_t int4_pair_as_half2_bits(uint32_t word, int i) {
  const uint32_t shifted = word >> (4 * i);
#if defined(__CUDA_ARCH__)
  uint32_t out;
  // lop3 immLut 0xEA = (a & b) | c
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(out) : "r"(shifted), "n"(kInt4PairMask), "n"(kHalf1024x2));
  return out;
#else
  return (shifted & kInt4PairMask) | kHalf1024x2;
#endif
}

// The element index (0..7 within the word) held by the low (hi = 0) or high (hi = 1) half of pair i.
LF_HD int int4_pair_element(int i, int hi) { return i + 4 * hi; }

}  // namespace quant
}  // namespace llama_fast
